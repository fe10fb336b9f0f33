"""Verification and quality: reload a child with stock transformers and measure it with no training.

Encoders are scored by how well the child's mean-pooled embeddings keep the
order of the parent's pairwise similarities (Spearman), and by STS Spearman
when sentence pairs are given. Language models are scored by perplexity on
held-out text. Each number comes with a randomly initialized model of the
same shape as the baseline.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from subclone.data import iter_batches, prepare_tokenizer
from subclone.errors import VerificationFailed

logger = logging.getLogger(__name__)


def model_class(config: dict[str, Any], task: str) -> Any:
    """Return the stock transformers class named in config.json, or the Auto class for the task."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModel


def load_checked(directory: Path, task: str, device: str = "cpu") -> Any:
    """Load a child with stock transformers and fail on any missing, unexpected or resized weight."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    cls = model_class(config, task)
    try:
        model, info = cls.from_pretrained(
            str(directory), output_loading_info=True, trust_remote_code=False, use_safetensors=True, device_map={"": device}
        )
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise VerificationFailed(f"stock transformers could not load the child: {type(exc).__name__}: {exc}") from exc
    problems = {key: list(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise VerificationFailed(f"child does not load cleanly with {cls.__name__}: {problems}")
    model.eval()
    return model


def random_like(directory: Path, task: str, seed: int = 0) -> Any:
    """Build a randomly initialized model with the child's config (the no-transfer baseline)."""
    from transformers import AutoConfig

    config_dict = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    cls = model_class(config_dict, task)
    config = AutoConfig.from_pretrained(str(directory))
    torch.manual_seed(seed)
    model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    model.eval()
    return model


@torch.inference_mode()
def mean_pooled(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """Mean of the last hidden state over attention-mask tokens, as sentence-transformers pools: (texts, hidden)."""
    device = next(model.parameters()).device
    out = []
    for batch in iter_batches(tokenizer, texts, sequence_length=max_length, batch_size=batch_size):
        mask = batch.attention_mask.to(device)
        hidden = model(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu())
    return torch.cat(out)


def _pairwise_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    normed = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sims = normed @ normed.T
    rows, cols = torch.triu_indices(len(sims), len(sims), offset=1)
    return sims[rows, cols]


def similarity_order_spearman(child: torch.Tensor, parent: torch.Tensor) -> float:
    """Spearman correlation between the child's and the parent's pairwise cosine similarities."""
    value = spearmanr(_pairwise_cosines(child).numpy(), _pairwise_cosines(parent).numpy()).statistic
    return float(value)


def read_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """Read an STS-benchmark file: tab-separated genre, file, years, id, score, sentence 1, sentence 2."""
    first, second, gold = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise VerificationFailed(f"{path.name} line {number} has {len(fields)} tab-separated fields, expected 7")
        gold.append(float(fields[4]))
        first.append(fields[5])
        second.append(fields[6])
    return first, second, gold


def sts_spearman(model: Any, tokenizer: Any, path: Path) -> float:
    """STS Spearman of mean-pooled cosine similarity against the gold scores."""
    first, second, gold = read_sts(path)
    a = mean_pooled(model, tokenizer, first)
    b = mean_pooled(model, tokenizer, second)
    cosine = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(spearmanr(cosine.numpy(), gold).statistic)


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token negative log-likelihood) over real tokens of ``texts``."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in iter_batches(tokenizer, texts, sequence_length=max_length, batch_size=batch_size):
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    if total_tokens == 0:
        return float("nan")
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def check_forward(model: Any, tokenizer: Any, texts: list[str], task: str) -> None:
    """Run one forward pass and fail on non-finite outputs."""
    device = next(model.parameters()).device
    batch = next(iter_batches(tokenizer, texts[:4] or ["subclone verification"], sequence_length=64, batch_size=4))
    outputs = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    values = outputs.logits if task == "causal_lm" else outputs.last_hidden_state
    if not torch.isfinite(values).all():
        raise VerificationFailed("the child's forward pass produced non-finite values (NaN or inf)")


def quality(
    task: str,
    child: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    parent: Any | None = None,
    child_dir: Path | None = None,
    sts_path: Path | None = None,
) -> dict[str, Any]:
    """Zero-training quality of ``child`` next to a random model of its shape (and the parent when given)."""
    metrics: dict[str, Any] = {"eval_texts": len(texts)}
    baseline = random_like(child_dir, task) if child_dir is not None else None
    if task == "causal_lm":
        metrics["perplexity"] = perplexity(child, tokenizer, texts)
        if baseline is not None:
            metrics["random_init_perplexity"] = perplexity(baseline, tokenizer, texts)
        if parent is not None:
            metrics["parent_perplexity"] = perplexity(parent, tokenizer, texts)
    else:
        if parent is not None and len(texts) >= 3:
            reference = mean_pooled(parent, tokenizer, texts)
            metrics["similarity_spearman"] = similarity_order_spearman(mean_pooled(child, tokenizer, texts), reference)
            if baseline is not None:
                metrics["random_init_similarity_spearman"] = similarity_order_spearman(mean_pooled(baseline, tokenizer, texts), reference)
        if sts_path is not None:
            metrics["sts_spearman"] = sts_spearman(child, tokenizer, sts_path)
            if baseline is not None:
                metrics["random_init_sts_spearman"] = sts_spearman(baseline, tokenizer, sts_path)
            if parent is not None:
                metrics["parent_sts_spearman"] = sts_spearman(parent, tokenizer, sts_path)
    return metrics


def evaluate_directory(
    child_dir: Path, *, parent: Path | None, sts_path: str | Path | None, texts: list[str] | None, device: str = "cpu"
) -> dict[str, Any]:
    """Quality of a written child directory (the ``subclone evaluate`` command)."""
    from transformers import AutoTokenizer

    from subclone.data import CalibrationOptions, load_texts
    from subclone.specs import load_spec

    config = json.loads((child_dir / "config.json").read_text(encoding="utf-8"))
    spec = load_spec(str(config.get("model_type")))
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(child_dir)))
    if texts is None:
        texts = load_texts(CalibrationOptions(num_samples=1), eval_texts=64).holdout
    model = load_checked(child_dir, spec.task, device)
    parent_model = load_checked(parent, spec.task, device) if parent is not None else None
    return quality(spec.task, model, tokenizer, texts, parent=parent_model, child_dir=child_dir, sts_path=Path(sts_path) if sts_path else None)
