"""The ``subclone`` command: plan, run, evaluate, and exit code 2 with one line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from subclone.cli import main


def test_plan_prints_child_shape(minilm_path, capsys):
    code = main(["plan", str(minilm_path), "--num-layers", "4", "--hidden-size", "256", "--intermediate-size", "1024",
                 "--num-attention-heads", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 blocks, width 256, FFN 1024, 8 heads" in out
    assert "6 blocks, width 384, FFN 1536, 12 heads" in out
    assert "parameters" in out
    assert "estimate calibration_bytes" in out


def test_plan_json(minilm_path, capsys):
    assert main(["plan", str(minilm_path), "--num-layers", "3", "--layer-selection", "middle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["child"]["num_layers"] == 3
    assert report["kept_layers"] == [0, 1, 5]


def test_bad_target_exits_2_with_one_line(minilm_path):
    proc = subprocess.run(
        [sys.executable, "-m", "subclone.cli", "plan", str(minilm_path), "--hidden-size", "500"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "hidden_size=500" in lines[0]
    assert "1 to 384" in lines[0]


def test_pickle_parent_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main(["plan", str(tmp_path)]) == 2
    assert "pickle" in capsys.readouterr().err


def test_run_then_evaluate(tiny_parents, corpus_file, shared_data, tmp_path, capsys):
    sts = tmp_path / "sts-sample.csv"
    lines = (shared_data / "stsbenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    sts.write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    out = tmp_path / "child"
    code = main(["run", str(tiny_parents["bert"]), "--out", str(out), "--num-layers", "2", "--hidden-size", "32",
                 "--num-attention-heads", "2", "--calibration", str(corpus_file), "--samples", "16", "--sequence-length", "32"])
    assert code == 0
    assert f"child written to {out}" in capsys.readouterr().out
    assert (out / "subclone_manifest.json").is_file()
    code = main(["evaluate", str(out), "--parent", str(tiny_parents["bert"]), "--texts", str(corpus_file), "--limit", "16",
                 "--sts", str(sts)])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert -1.0 <= metrics["sts_spearman"] <= 1.0
    assert -1.0 <= metrics["similarity_spearman"] <= 1.0
    assert metrics["eval_texts"] == 16


def test_run_reuses_scores(tiny_parents, corpus_file, tmp_path):
    first = tmp_path / "a"
    assert main(["run", str(tiny_parents["llama"]), "--out", str(first), "--num-layers", "3", "--calibration", str(corpus_file),
                 "--samples", "16", "--no-verify"]) == 0
    second = tmp_path / "b"
    assert main(["run", str(tiny_parents["llama"]), "--out", str(second), "--num-layers", "2", "--hidden-size", "32",
                 "--scores", str(first / "subclone_scores.safetensors"), "--no-verify"]) == 0
    manifest = json.loads((second / "subclone_manifest.json").read_text())
    assert manifest["calibration"]["source"] == "scores file"


def test_keep_layers_option(tiny_parents, tmp_path, capsys):
    out = tmp_path / "child"
    assert main(["run", str(tiny_parents["gpt2"]), "--out", str(out), "--keep-layers", "0,2", "--method", "uniform", "--no-verify"]) == 0
    assert json.loads((out / "subclone_manifest.json").read_text())["plan"]["kept_layers"] == [0, 2]
    assert main(["run", str(tiny_parents["gpt2"]), "--out", str(tmp_path / "x"), "--keep-layers", "0,a"]) == 2
    assert "keep_layers" in capsys.readouterr().err
