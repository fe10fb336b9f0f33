"""Parents that would need unpickling, remote code or files outside their directory are rejected."""

from __future__ import annotations

import json
import shutil

import pytest

from subclone.api import plan_subclone
from subclone.checkpoint import resolve_parent
from subclone.errors import ParentNotFound, UnsafeCheckpoint, UnsupportedArchitecture
from subclone.options import Target


@pytest.fixture
def llama_copy(tiny_parents, tmp_path):
    target = tmp_path / "parent"
    shutil.copytree(tiny_parents["llama"], target)
    return target


def test_pickle_only_checkpoint_rejected(llama_copy, monkeypatch):
    import torch

    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(UnsafeCheckpoint) as excinfo:
        resolve_parent(llama_copy)
    assert "pytorch_model.bin" in str(excinfo.value)
    assert "safetensors" in str(excinfo.value)


def test_remote_code_config_rejected(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpoint, match="auto_map"):
        resolve_parent(llama_copy)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/dir.safetensors", ".."])
def test_index_shard_names_must_be_bare(llama_copy, shard):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpoint, match="bare file names|not a .safetensors"):
        resolve_parent(llama_copy)


def test_symlinked_weights_outside_directory_rejected(llama_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (llama_copy / "model.safetensors").rename(outside)
    (llama_copy / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeCheckpoint, match="outside the model directory"):
        resolve_parent(llama_copy)


def test_unsupported_model_type_lists_supported(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "mamba"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture) as excinfo:
        plan_subclone(llama_copy, Target())
    message = str(excinfo.value)
    assert "'mamba'" in message
    for family in ("bert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "roberta"):
        assert family in message


def test_unknown_tensor_rejected(llama_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(llama_copy / "model.safetensors"))
    tensors["model.layers.0.mystery.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(UnsupportedArchitecture, match="mystery"):
        resolve_parent(llama_copy)


def test_missing_parent_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ParentNotFound):
        resolve_parent(tmp_path / "does-not-exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ParentNotFound, match="HF_HUB_OFFLINE"):
        resolve_parent("someone/not-cached-model", revision="main")


def test_sharded_parent_reads_like_single_file(tiny_parents, tmp_path):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_parents["llama"]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(tiny_parents["llama"] / "tokenizer.json", sharded)
    shutil.copy(tiny_parents["llama"] / "tokenizer_config.json", sharded)
    parent = resolve_parent(sharded)
    assert len(parent.weight_files) > 1
    single = resolve_parent(tiny_parents["llama"])
    assert set(parent.tensor_files) == set(single.tensor_files)
