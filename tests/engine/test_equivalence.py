"""A parent whose removable parts are exactly zero must give a child with the parent's logits.

This pins both the ranking (zero dimensions, neurons and heads score lowest and
are removed) and the norm rescaling rule: RMSNorm over d of D dimensions,
with weight scaled by sqrt(D/d) and epsilon by D/d, equals the parent's norm
when the dropped dimensions are zero.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import RMS_FAMILIES, make_parent

from subclone.api import run_subclone
from subclone.options import CalibrationOptions, SubcloneOptions, Target

DEAD_HIDDEN = [3, 10, 17, 22, 31, 40, 47, 50, 58, 63]  # 10 of 64 residual dimensions
DEAD_FFN = list(range(0, 96, 4))  # 24 of 96 neurons per block


def kill_parts(model) -> dict[str, int]:
    """Zero every weight that writes into the dead spaces; return the shape that remains."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // kv
    base = model.model
    base.embed_tokens.weight[:, DEAD_HIDDEN] = 0
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj.weight[DEAD_HIDDEN, :] = 0
        mlp.down_proj.weight[DEAD_HIDDEN, :] = 0
        # FFN: a neuron whose gate and up rows are zero outputs exactly zero.
        mlp.gate_proj.weight[DEAD_FFN, :] = 0
        mlp.up_proj.weight[DEAD_FFN, :] = 0
        mlp.down_proj.weight[:, DEAD_FFN] = 0
        # Attention: drop the last KV group whole, and the last query head of every other group.
        dead_heads = list(range((kv - 1) * per_group, heads)) + [g * per_group + per_group - 1 for g in range(kv - 1)]
        for h in dead_heads:
            cols = slice(h * head_dim, (h + 1) * head_dim)
            attn.q_proj.weight[cols, :] = 0
            if attn.q_proj.bias is not None:
                attn.q_proj.bias[cols] = 0
            attn.o_proj.weight[:, cols] = 0
        kv_cols = slice((kv - 1) * head_dim, kv * head_dim)
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[kv_cols, :] = 0
            if proj.bias is not None:
                proj.bias[kv_cols] = 0
    return {
        "hidden_size": config.hidden_size - len(DEAD_HIDDEN),
        "intermediate_size": config.intermediate_size - len(DEAD_FFN),
        "num_key_value_heads": kv - 1,
        "num_attention_heads": (kv - 1) * (per_group - 1),
    }


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_dead_dimensions_give_equal_logits(family, corpus, tmp_path):
    import transformers

    remaining: dict[str, int] = {}

    def mutate(model):
        remaining.update(kill_parts(model))

    # A larger init std than the default 0.02 keeps activations well above float noise.
    parent_dir = make_parent(tmp_path / "parent", family, corpus, seed=1, init_std=0.2, mutate=mutate)
    target = Target(**remaining)
    options = SubcloneOptions(calibration=CalibrationOptions(texts=tuple(corpus[:40]), num_samples=32, sequence_length=48, batch_size=8), eval_texts=4)
    result = run_subclone(parent_dir, target, tmp_path / "child", options)

    plan = result.manifest["plan"]
    assert sorted(set(range(64)) - set(plan["hidden"])) == DEAD_HIDDEN
    for kept in plan["ffn"]:
        assert sorted(set(range(96)) - set(kept)) == DEAD_FFN

    config = json.loads((parent_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    parent = cls.from_pretrained(str(parent_dir)).eval()
    child = cls.from_pretrained(str(result.out_dir)).eval()
    ids = torch.randint(7, config["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = parent(input_ids=ids).logits
        actual = child(input_ids=ids).logits
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_dead_dimensions_differ_without_rescaling(corpus, tmp_path):
    # The same parent with rescale="none" must not match: the check above depends on the rule.
    import transformers

    remaining: dict[str, int] = {}
    parent_dir = make_parent(tmp_path / "parent", "llama", corpus, seed=1, init_std=0.2, mutate=lambda m: remaining.update(kill_parts(m)))
    options = SubcloneOptions(rescale="none", calibration=CalibrationOptions(texts=tuple(corpus[:40]), num_samples=32, sequence_length=48), verify=False)
    result = run_subclone(parent_dir, Target(**remaining), tmp_path / "child", options)
    parent = transformers.LlamaForCausalLM.from_pretrained(str(parent_dir)).eval()
    child = transformers.LlamaForCausalLM.from_pretrained(str(result.out_dir)).eval()
    ids = torch.randint(7, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(child(input_ids=ids).logits, parent(input_ids=ids).logits, atol=1e-4)
