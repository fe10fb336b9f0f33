"""Planning on the meta device, reproducible output, sharding, manifest and staging."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors import safe_open

from subclone.api import run_subclone
from subclone.errors import InvalidOptions, InvalidTarget
from subclone.options import CalibrationOptions, SubcloneOptions, Target
from subclone.pipeline import plan_from_config
from subclone.specs import load_spec

LLAMA_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_70b_llama_plans_on_meta_device():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    target = Target(num_layers=40, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=4)
    report, plan = plan_from_config(load_spec("llama"), LLAMA_70B, target, SubcloneOptions())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 70.0e9 < report.parent_parameters < 71.0e9
    # 40 blocks of width 4096 with 4 KV groups of 8 query heads of size 128, plus embeddings and head.
    per_block = 4096 * 4096 + 2 * 4096 * 512 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    expected = 40 * per_block + 2 * 128256 * 4096 + 4096
    assert report.child_parameters == expected
    assert report.memory_estimate["parent_weight_bytes"] == report.parent_parameters * 2
    assert len(plan.kept_layers) == 40
    assert all(len(h) == 32 for h in plan.heads)
    assert all(len(kv) == 4 for kv in plan.kv_heads)
    # 4096 / 32 heads is the parent's head size 128, so head_dim need not be written.
    assert report.child_config.get("head_dim", 128) == 128
    assert report.child_config["num_key_value_heads"] == 4
    # Planning allocates no weights: far less than one block of the parent (~1.7 GB in bf16).
    assert grown_mib < 1024


def test_70b_invalid_target_rejected_on_meta():
    with pytest.raises(InvalidTarget) as excinfo:
        plan_from_config(load_spec("llama"), LLAMA_70B, Target(num_attention_heads=30, num_key_value_heads=4), SubcloneOptions())
    assert excinfo.value.errors[0].field == "num_attention_heads"


def file_digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors*"))}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_same_inputs_give_identical_weights(family, tiny_parents, corpus_file, tmp_path):
    options = SubcloneOptions(calibration=CalibrationOptions(source=str(corpus_file), num_samples=24, sequence_length=32, seed=7), verify=False)
    target = Target(num_layers=2, hidden_size=32, num_attention_heads=2 if family == "bert" else 4)
    a = run_subclone(tiny_parents[family], target, tmp_path / "a", options)
    b = run_subclone(tiny_parents[family], target, tmp_path / "b", options)
    assert file_digests(a.out_dir) == file_digests(b.out_dir)
    assert a.manifest["files"]["model.safetensors"] == b.manifest["files"]["model.safetensors"]
    other_seed = options.model_copy(update={"calibration": options.calibration.model_copy(update={"seed": 8})})
    c = run_subclone(tiny_parents[family], target, tmp_path / "c", other_seed)
    assert c.manifest["calibration"]["sha256"] != a.manifest["calibration"]["sha256"]


def test_small_shards_written_and_loadable(tiny_parents, tmp_path, monkeypatch):
    import transformers

    # model_construct skips the 1 MiB floor on shard size so that a tiny model is split into several shards.
    defaults = SubcloneOptions().model_dump()
    defaults.update(method="uniform", max_shard_size=30_000, eval_texts=4, calibration=CalibrationOptions(num_samples=8))
    options = SubcloneOptions.model_construct(**defaults)
    result = run_subclone(tiny_parents["llama"], Target(num_layers=3), tmp_path / "child", options)
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    model = transformers.LlamaForCausalLM.from_pretrained(str(result.out_dir))
    assert model.config.num_hidden_layers == 3
    with safe_open(str(result.out_dir / shards[0]), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["method"] == "uniform"
    assert metadata["format"] == "pt"
    assert metadata["parent_weights_sha256"] == hashlib.sha256(
        json.dumps(result.manifest["parent"]["weights_sha256"], sort_keys=True).encode()).hexdigest()


def test_manifest_records_provenance(tiny_parents, corpus_file, tmp_path):
    options = SubcloneOptions(calibration=CalibrationOptions(source=str(corpus_file), num_samples=16, sequence_length=32), eval_texts=8)
    result = run_subclone(tiny_parents["gpt2"], Target(num_layers=2, hidden_size=32, num_attention_heads=2), tmp_path / "child",
                          options, provenance={"job_id": "job_test"})
    manifest = json.loads((result.out_dir / "subclone_manifest.json").read_text())
    parent_sha = hashlib.sha256((tiny_parents["gpt2"] / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["parent"]["weights_sha256"] == {"model.safetensors": parent_sha}
    assert manifest["target"]["num_layers"] == 2
    assert manifest["options"]["method"] == "activation"
    assert manifest["calibration"]["sha256"]
    assert manifest["calibration"]["real_tokens"] > 0
    assert manifest["provenance"] == {"job_id": "job_test"}
    assert set(manifest["timings"]) >= {"loading_parent", "calibrating", "ranking", "extracting", "verifying", "total_seconds"}
    metrics = manifest["metrics"]
    assert metrics["perplexity"] < metrics["random_init_perplexity"] * 10  # both are finite numbers
    assert metrics["parent_perplexity"] > 0
    with safe_open(str(result.out_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["job_id"] == "job_test"
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((result.out_dir / name).read_bytes()).hexdigest() == entry["sha256"]
    assert (result.out_dir / "tokenizer.json").is_file()


def test_failed_run_leaves_no_output(tiny_parents, tmp_path):
    out = tmp_path / "child"
    with pytest.raises(InvalidTarget):
        run_subclone(tiny_parents["llama"], Target(hidden_size=1000), out, SubcloneOptions(method="uniform"))
    assert not out.exists()
    cancelled_at = []

    def cancel_when_extracting(event):
        cancelled_at.append(event.stage)

    from subclone.errors import Cancelled

    with pytest.raises(Cancelled):
        run_subclone(tiny_parents["llama"], Target(num_layers=2), out, SubcloneOptions(method="uniform"),
                     progress=cancel_when_extracting, should_cancel=lambda: "extracting" in cancelled_at)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".child.staging")]


def test_existing_output_rejected(tiny_parents, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InvalidOptions, match="not an empty directory"):
        run_subclone(tiny_parents["llama"], Target(num_layers=2), out, SubcloneOptions(method="uniform"))
    assert (out / "keep.txt").read_text() == "user data"


def test_bfloat16_parent_gives_bfloat16_child(corpus, tmp_path):
    import torch
    import transformers
    from tiny import make_parent

    parent_dir = make_parent(tmp_path / "parent", "llama", corpus)
    model = transformers.LlamaForCausalLM.from_pretrained(str(parent_dir), dtype=torch.bfloat16)
    model.save_pretrained(parent_dir)
    options = SubcloneOptions(dtype="bfloat16", calibration=CalibrationOptions(texts=tuple(corpus[:16]), num_samples=16, sequence_length=32), eval_texts=4)
    result = run_subclone(parent_dir, Target(num_layers=2, hidden_size=32), tmp_path / "child", options)
    with safe_open(str(result.out_dir / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    assert result.manifest["metrics"]["perplexity"] > 0


def test_missing_calibration_file_rejected_before_loading(tiny_parents, tmp_path):
    out = tmp_path / "child"
    options = SubcloneOptions(calibration=CalibrationOptions(source=str(tmp_path / "missing.txt")))
    with pytest.raises(InvalidOptions) as excinfo:
        run_subclone(tiny_parents["llama"], Target(num_layers=2), out, options)
    assert excinfo.value.errors[0].field == "calibration.source"
    assert not out.exists()


def test_norm_offset_rescaling():
    import torch

    from subclone.extract import TensorJob, cut_tensor

    stored = torch.tensor([0.5, -0.2, 0.0, 1.0])  # the norm multiplies by (1 + stored)
    job = TensorJob("w", "w", (torch.tensor([0, 1]),), (2,), scale=2.0, offset=1.0)
    # (1 + 0.5) * 2 - 1 = 2.0 and (1 - 0.2) * 2 - 1 = 0.6
    torch.testing.assert_close(cut_tensor(stored, job), torch.tensor([2.0, 0.6]))
