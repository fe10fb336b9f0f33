"""Tiny random parents of every supported family, each with a word-level tokenizer."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "<|endoftext|>"]


def word_vocab(texts: list[str], size: int) -> dict[str, int]:
    counts = collections.Counter(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word, _ in counts.most_common(size - len(SPECIALS)):
        vocab[word] = len(vocab)
    return vocab


def byte_level_tokenizer(texts: list[str], size: int, style: str):
    """A byte-level BPE tokenizer trained on ``texts``, the kind decoder families ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if style == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", SPECIALS.index("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def build_tokenizer(vocab: dict[str, int], style: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        )
    if style == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    # GPT-2 style: no special tokens added, no pad token (the engine pads with eos).
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


VOCAB_SIZE = 320


def tiny_config(family: str, vocab_size: int = VOCAB_SIZE):
    import transformers as tf

    common_decoder = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
    )
    if family == "llama":
        return tf.LlamaConfig(**common_decoder, bos_token_id=5, eos_token_id=6, pad_token_id=0), tf.LlamaForCausalLM, "bos"
    if family == "mistral":
        return tf.MistralConfig(**common_decoder, sliding_window=None, bos_token_id=5, eos_token_id=6), tf.MistralForCausalLM, "bos"
    if family == "qwen2":
        cfg = dict(common_decoder, num_key_value_heads=2)
        return tf.Qwen2Config(**cfg, tie_word_embeddings=True, max_window_layers=2, bos_token_id=5, eos_token_id=6), tf.Qwen2ForCausalLM, "bos"
    if family == "qwen3":
        # head_dim 16 differs from hidden/heads (8), so the child must carry head_dim explicitly.
        cfg = dict(common_decoder, head_dim=16)
        return tf.Qwen3Config(**cfg, tie_word_embeddings=False, max_window_layers=3, bos_token_id=5, eos_token_id=6), tf.Qwen3ForCausalLM, "bos"
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=6, eos_token_id=6), tf.GPT2LMHeadModel, "plain"
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=256, pad_token_id=0), tf.BertModel, "encoder"
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=260, pad_token_id=0, bos_token_id=2,
                                eos_token_id=3), tf.RobertaModel, "encoder"
    raise ValueError(family)


FAMILIES = ["bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "qwen3"]
RMS_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]

# A reduced target per family that cuts every space and keeps the family's rules.
REDUCED = {
    "bert": dict(num_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=3),
    "roberta": dict(num_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=2),
    "gpt2": dict(num_layers=2, hidden_size=48, intermediate_size=100, num_attention_heads=3),
    "llama": dict(num_layers=2, hidden_size=40, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_layers=3, hidden_size=48, intermediate_size=50, num_attention_heads=6, num_key_value_heads=3),
    "qwen2": dict(num_layers=2, hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1),
    "qwen3": dict(num_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2),
}


def make_parent(directory: Path, family: str, texts: list[str], *, seed: int = 0, init_std: float | None = None,
                mutate=None) -> Path:
    """Save a randomly initialized ``family`` model plus tokenizer into ``directory``."""
    config, cls, style = tiny_config(family)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random init leaves norm weights at exactly 1 and biases at 0; perturb them so
    # a test can tell a sliced or rescaled vector from a fresh one.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    model.save_pretrained(directory)
    if style == "encoder":
        tokenizer = build_tokenizer(word_vocab(texts, VOCAB_SIZE), style)
    else:
        tokenizer = byte_level_tokenizer(texts, VOCAB_SIZE, style)
    tokenizer.save_pretrained(directory)
    return directory
