"""Every supported family: identity, reduced children that load in stock transformers, spec coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import FAMILIES, REDUCED

from subclone.api import run_subclone
from subclone.checkpoint import resolve_parent
from subclone.options import CalibrationOptions, SubcloneOptions, Target
from subclone.specs import available_model_types, load_spec


def quick_options(**overrides) -> SubcloneOptions:
    calibration = CalibrationOptions(texts=None, source=overrides.pop("source"), num_samples=24, sequence_length=32, batch_size=8)
    return SubcloneOptions(calibration=calibration, eval_texts=8, **overrides)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name.startswith("subclone_"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def test_every_required_family_has_a_spec():
    assert set(FAMILIES) <= set(available_model_types())


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_covers_tiny_checkpoint(family, tiny_parents):
    # resolve_parent fails on any tensor the spec does not describe or any required one missing.
    parent = resolve_parent(tiny_parents[family])
    spec = load_spec(family)
    assert parent.spec == spec
    assert parent.tensor_files


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_bit_exact(family, tiny_parents, corpus_file, tmp_path):
    parent_dir = tiny_parents[family]
    result = run_subclone(parent_dir, Target(), tmp_path / "child", quick_options(source=str(corpus_file)))
    parent_tensors = read_all(parent_dir)
    child_tensors = read_all(result.out_dir)
    assert set(child_tensors) <= set(parent_tensors)
    # Only the tied alias may be absent from the child; everything else is copied unchanged.
    assert len(parent_tensors) - len(child_tensors) <= 1
    for name, tensor in child_tensors.items():
        assert tensor.dtype == parent_tensors[name].dtype, name
        assert torch.equal(tensor, parent_tensors[name]), name
    parent_config = json.loads((parent_dir / "config.json").read_text())
    child_config = json.loads((result.out_dir / "config.json").read_text())
    spec = load_spec(family)
    assert child_config[spec.config.num_layers] == parent_config[spec.config.num_layers]
    assert child_config[spec.config.hidden_size] == parent_config[spec.config.hidden_size]


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_child_loads_in_stock_transformers(family, tiny_parents, corpus_file, tmp_path):
    import transformers

    target = Target(**REDUCED[family])
    result = run_subclone(tiny_parents[family], target, tmp_path / "child", quick_options(source=str(corpus_file)))
    config = json.loads((result.out_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(str(result.out_dir), output_loading_info=True, trust_remote_code=False)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    spec = load_spec(family)
    assert config[spec.config.num_layers] == target.num_layers
    assert config[spec.config.hidden_size] == target.hidden_size
    assert config[spec.config.num_attention_heads] == target.num_attention_heads
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    metrics = result.manifest["metrics"]
    assert metrics["loaded_with"] == cls.__name__
    manifest = json.loads((result.out_dir / "subclone_manifest.json").read_text())
    assert manifest["plan"]["kept_layers"][0] == 0
    assert len(manifest["plan"]["kept_layers"]) == target.num_layers
    assert manifest["files"]
    for name, entry in manifest["files"].items():
        assert (result.out_dir / name).stat().st_size == entry["size"]


def test_qwen3_child_writes_head_dim_and_layer_lists(tiny_parents, corpus_file, tmp_path):
    target = Target(**REDUCED["qwen3"])
    result = run_subclone(tiny_parents["qwen3"], target, tmp_path / "child", quick_options(source=str(corpus_file)))
    config = json.loads((result.out_dir / "config.json").read_text())
    kept = result.manifest["plan"]["kept_layers"]
    assert config["head_dim"] == 16
    assert len(config["layer_types"]) == target.num_layers
    assert config["max_window_layers"] == sum(1 for i in kept if i < 3)


def test_tied_embeddings_stored_once_and_still_tied(tiny_parents, corpus_file, tmp_path):
    import transformers

    for family in ("gpt2", "qwen2"):
        result = run_subclone(tiny_parents[family], Target(**REDUCED[family]), tmp_path / family, quick_options(source=str(corpus_file)))
        names = set(read_all(result.out_dir))
        assert "lm_head.weight" not in names, family
        cls = getattr(transformers, json.loads((result.out_dir / "config.json").read_text())["architectures"][0])
        model = cls.from_pretrained(str(result.out_dir))
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), family
