"""Calibration statistics: padding invariance, data sources, scores reuse and caching."""

from __future__ import annotations

import json

import pytest
import torch

from subclone.api import run_subclone
from subclone.calibrate import calibrate, load_parent_model
from subclone.checkpoint import resolve_parent
from subclone.data import load_texts, read_documents, stdlib_docstrings
from subclone.errors import CalibrationError, InvalidOptions
from subclone.options import CalibrationOptions, SubcloneOptions, Target
from subclone.pipeline import _load_tokenizer
from subclone.shape import parent_shape


def scores_for(parent_dir, texts, *, batch_size, padding_side, max_memory=None):
    parent = resolve_parent(parent_dir)
    model = load_parent_model(parent, device="cpu", dtype="float32", max_memory=max_memory)
    tokenizer = _load_tokenizer(parent)
    return calibrate(parent, model, tokenizer, texts, parent_shape(parent.spec, parent.config),
                     sequence_length=40, batch_size=batch_size, padding_side=padding_side)


def assert_same_scores(a, b):
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-9)
    for x, y in zip(a.heads + a.ffn, b.heads + b.ffn, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
    for metric in ("relative", "angular"):
        torch.testing.assert_close(a.influence[metric], b.influence[metric], rtol=1e-5, atol=1e-9)
    assert a.metadata["real_tokens"] == b.metadata["real_tokens"]


@pytest.mark.parametrize("family", ["llama", "bert", "roberta", "gpt2"])
def test_padding_does_not_change_scores(family, tiny_parents, corpus):
    # Documents of very different lengths, so batches carry a lot of padding.
    texts = [corpus[i][: 20 + 37 * (i % 5)] for i in range(12)]
    unpadded = scores_for(tiny_parents[family], texts, batch_size=1, padding_side="right")
    right = scores_for(tiny_parents[family], texts, batch_size=6, padding_side="right")
    left = scores_for(tiny_parents[family], texts, batch_size=6, padding_side="left")
    assert_same_scores(unpadded, right)
    assert_same_scores(unpadded, left)


def test_offloaded_calibration_matches_in_memory(tiny_parents, corpus):
    # A budget far below the model's size makes accelerate keep blocks off the execution device.
    texts = corpus[:8]
    in_memory = scores_for(tiny_parents["llama"], texts, batch_size=4, padding_side="right")
    offloaded = scores_for(tiny_parents["llama"], texts, batch_size=4, padding_side="right", max_memory={"cpu": "60KB"})
    assert_same_scores(in_memory, offloaded)


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\ncontinues here\n\nsecond doc\n\n\n\nthird", encoding="utf-8")
    assert read_documents(path) == ["first line continues here", "second doc", "third"]


def test_jsonl_documents_and_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert read_documents(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="line 2 has no string field 'text'"):
        read_documents(bad)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_stdlib_docstrings_are_real_text():
    docs = stdlib_docstrings(limit=50, seed=3)
    assert len(docs) == 50
    assert all(len(d) >= 200 for d in docs)
    assert docs == stdlib_docstrings(limit=50, seed=3)
    assert docs != stdlib_docstrings(limit=50, seed=4)


def test_holdout_is_disjoint_from_calibration(corpus_file):
    texts = load_texts(CalibrationOptions(source=str(corpus_file), num_samples=100), eval_texts=20)
    assert len(texts.calibration) == 100
    assert len(texts.holdout) == 20
    assert not set(texts.calibration) & set(texts.holdout)


def test_scores_file_reused_for_another_shape(tiny_parents, corpus_file, tmp_path):
    options = SubcloneOptions(calibration=CalibrationOptions(source=str(corpus_file), num_samples=16, sequence_length=32), verify=False)
    first = run_subclone(tiny_parents["llama"], Target(num_layers=3, hidden_size=48), tmp_path / "a", options)
    assert first.scores_path is not None
    reuse = SubcloneOptions(scores_path=str(first.scores_path), verify=False)
    second = run_subclone(tiny_parents["llama"], Target(num_layers=3, hidden_size=48), tmp_path / "b", reuse)
    assert second.manifest["plan"] == first.manifest["plan"]
    assert second.manifest["timings"].get("calibrating", 0) < first.manifest["timings"]["calibrating"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    third = run_subclone(tiny_parents["llama"], Target(num_layers=2, hidden_size=32), tmp_path / "c", reuse)
    assert len(third.manifest["plan"]["hidden"]) == 32
    # Scores from another parent shape are rejected.
    with pytest.raises(InvalidOptions, match="scores describe a parent"):
        run_subclone(tiny_parents["bert"], Target(), tmp_path / "d", reuse)


def test_scores_cache_skips_forward_passes(tiny_parents, corpus_file, tmp_path):
    options = SubcloneOptions(calibration=CalibrationOptions(source=str(corpus_file), num_samples=16, sequence_length=32), verify=False)
    cache = tmp_path / "cache"
    first = run_subclone(tiny_parents["gpt2"], Target(num_layers=2), tmp_path / "a", options, scores_cache_dir=cache)
    second = run_subclone(tiny_parents["gpt2"], Target(num_layers=3), tmp_path / "b", options, scores_cache_dir=cache)
    assert first.manifest["calibration"]["cache_hit"] is False
    assert second.manifest["calibration"]["cache_hit"] is True
    assert second.manifest["calibration"]["real_tokens"] == first.manifest["calibration"]["real_tokens"]
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_single_word_calibration_counts_real_tokens(tiny_parents, tmp_path):
    # One word gives [CLS] word [SEP]: only the word is a real token.
    options = SubcloneOptions(calibration=CalibrationOptions(texts=("x",), num_samples=1, sequence_length=8), verify=False)
    result = run_subclone(tiny_parents["bert"], Target(num_layers=2), tmp_path / "ok", options)
    assert result.manifest["calibration"]["real_tokens"] == 1


def test_whitespace_only_texts_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least one non-empty document"):
        CalibrationOptions(texts=("   ", "\n"))


def test_tokenizer_beyond_vocabulary_rejected(tiny_parents, tmp_path, corpus):
    import shutil

    parent_dir = tmp_path / "parent"
    shutil.copytree(tiny_parents["llama"], parent_dir)
    config = json.loads((parent_dir / "config.json").read_text())
    config["vocab_size"] = 8  # the tokenizer emits ids far above 8
    (parent_dir / "config.json").write_text(json.dumps(config))
    from subclone.checkpoint import resolve_parent as resolve

    parent = resolve(parent_dir)
    with pytest.raises(CalibrationError, match="vocab_size is 8"):
        calibrate(parent, load_parent_model(resolve(tiny_parents["llama"]), device="cpu", dtype="float32"),
                  _load_tokenizer(parent), corpus[:4], parent_shape(parent.spec, parent.config),
                  sequence_length=16, batch_size=2)
