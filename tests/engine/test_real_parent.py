"""The real pretrained parent all-MiniLM-L6-v2 cut to 4 blocks x 256 wide, with no training."""

from __future__ import annotations

import pytest

from subclone.api import run_subclone
from subclone.options import CalibrationOptions, SubcloneOptions, Target
from subclone.verify import load_checked, random_like, sts_spearman

TARGET = Target(num_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=8)


@pytest.fixture(scope="module")
def sts_scores(minilm_path, shared_data, tmp_path_factory):
    from transformers import AutoTokenizer

    sts = shared_data / "stsbenchmark" / "sts-dev.csv"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    root = tmp_path_factory.mktemp("minilm")
    # Calibration text is Shakespeare, not STS sentences: the ranking must transfer across domains.
    calibration = CalibrationOptions(source=str(shared_data / "tinyshakespeare" / "input.txt"), num_samples=256)
    subcloned = run_subclone(minilm_path, TARGET, root / "activation", SubcloneOptions(calibration=calibration, verify=False))
    uniform = run_subclone(minilm_path, TARGET, root / "uniform", SubcloneOptions(method="uniform", verify=False))
    return {
        "activation": sts_spearman(load_checked(subcloned.out_dir, "encoder"), tokenizer, sts),
        "uniform": sts_spearman(load_checked(uniform.out_dir, "encoder"), tokenizer, sts),
        "random": sts_spearman(random_like(subcloned.out_dir, "encoder", seed=0), tokenizer, sts),
        "kept_layers": subcloned.manifest["plan"]["kept_layers"],
    }


def test_subcloned_minilm_reaches_sts_target(sts_scores):
    assert sts_scores["activation"] >= 0.78, sts_scores


def test_subcloned_minilm_beats_uniform(sts_scores):
    assert sts_scores["activation"] >= sts_scores["uniform"] + 0.05, sts_scores


def test_subcloned_minilm_beats_random_init(sts_scores):
    assert sts_scores["activation"] >= sts_scores["random"] + 0.2, sts_scores


def test_first_and_last_blocks_kept(sts_scores):
    assert sts_scores["kept_layers"][0] == 0
    assert sts_scores["kept_layers"][-1] == 5
