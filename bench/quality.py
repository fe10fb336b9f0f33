"""Zero-training STS quality of children cut from all-MiniLM-L6-v2.

For four target shapes, every child is cut from one default calibration
(256 Tiny Shakespeare documents) by reusing its scores file, so the rows of a
target differ only in the option named. A second part varies the calibration
text (Tiny Shakespeare, or sentences from sts-train) and the sample count for
the 4x256 target. All children are scored on the full sts-dev split with mean
pooling and cosine similarity.

Usage: python bench/quality.py [--samples 16,64,256,1024] [--out quality]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from subclone.api import run_subclone  # noqa: E402
from subclone.options import CalibrationOptions, SubcloneOptions, Target  # noqa: E402
from subclone.verify import load_checked, random_like  # noqa: E402

# (blocks, width): FFN is 4x width and heads are width / 32 (head size 32, as in the parent).
SHAPES = [(6, 256), (4, 256), (3, 192), (2, 128)]
CALIBRATION_SHAPE = (4, 256)
DEFAULT_SAMPLES = 256
SENTENCES_PER_DOCUMENT = 4


def target_for(blocks: int, width: int) -> Target:
    return Target(num_layers=blocks, hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 32)


def write_in_domain_corpus(sts_train: Path, out_path: Path) -> int:
    """Write unique sts-train sentences, shuffled, as documents of a few sentences separated by blank lines."""
    first, second, _ = common.read_sts(sts_train)
    sentences = sorted(set(first + second))
    random.Random(0).shuffle(sentences)
    documents = [
        " ".join(sentences[i: i + SENTENCES_PER_DOCUMENT]) for i in range(0, len(sentences), SENTENCES_PER_DOCUMENT)
    ]
    out_path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return len(documents)


class Scorer:
    """Score child directories on sts-dev and collect result rows."""

    def __init__(self, sts_dev: Path) -> None:
        self.first, self.second, self.gold = common.read_sts(sts_dev)
        self.rows: list[dict] = []

    def score_model(self, model, tokenizer) -> float:
        return common.sts_spearman(model, tokenizer, self.first, self.second, self.gold)

    def score_dir(self, directory: Path) -> float:
        model = load_checked(directory, "encoder")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return self.score_model(model, tokenizer)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(f"{row['part']:<12} {row['shape']:<6} {row['variant']:<28} spearman={row['sts_dev_spearman']:.4f}", flush=True)


def cut(parent: Path, shape: tuple[int, int], out_dir: Path, options: SubcloneOptions) -> tuple[Path, dict]:
    started = time.perf_counter()
    result = run_subclone(parent, target_for(*shape), out_dir, options)
    elapsed = time.perf_counter() - started
    return out_dir, {"run_seconds": round(elapsed, 2), "kept_layers": result.manifest.get("plan", {}).get("kept_layers")}


def shape_variants(scores_path: Path) -> list[tuple[str, SubcloneOptions]]:
    reuse = {"scores_path": str(scores_path), "verify": False}
    return [
        ("default (activation, norm, influence)", SubcloneOptions(**reuse)),
        ("rescale=fan_in", SubcloneOptions(rescale="fan_in", **reuse)),
        ("rescale=none", SubcloneOptions(rescale="none", **reuse)),
        ("layer_selection=middle", SubcloneOptions(layer_selection="middle", **reuse)),
        ("layer_selection=first", SubcloneOptions(layer_selection="first", **reuse)),
        ("influence_metric=angular", SubcloneOptions(influence_metric="angular", **reuse)),
        ("method=uniform", SubcloneOptions(method="uniform", verify=False)),
        ("method=magnitude", SubcloneOptions(method="magnitude", verify=False)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="16,64,256,1024", help="Comma-separated calibration sample counts for the 4x256 sweep.")
    parser.add_argument("--out", default="quality", help="Result name under bench/results/ (without .json).")
    args = parser.parse_args()
    sample_counts = [int(s) for s in args.samples.split(",")]

    env = common.environment()
    data = common.data_dir()
    parent = common.parent_path()
    shakespeare = data / "tinyshakespeare" / "input.txt"
    scorer = Scorer(data / "stsbenchmark" / "sts-dev.csv")
    work = Path(tempfile.mkdtemp(prefix="subclone-quality-"))
    in_domain = work / "sts-train-sentences.txt"
    in_domain_documents = write_in_domain_corpus(data / "stsbenchmark" / "sts-train.csv", in_domain)
    started = time.perf_counter()

    parent_model = load_checked(parent, "encoder")
    parent_tokenizer = AutoTokenizer.from_pretrained(str(parent))
    scorer.record({"part": "parent", "shape": "6x384", "variant": "parent", "sts_dev_spearman": scorer.score_model(parent_model, parent_tokenizer)})
    del parent_model

    # Part 1: calibration source and sample count, 4x256 target. Each run calibrates from scratch.
    calibrations: dict[tuple[str, int], dict] = {}
    for source_name, source in (("tinyshakespeare", shakespeare), ("sts-train", in_domain)):
        for samples in sample_counts:
            out_dir = work / f"calib-{source_name}-{samples}"
            options = SubcloneOptions(calibration=CalibrationOptions(source=str(source), num_samples=samples), verify=False)
            directory, info = cut(parent, CALIBRATION_SHAPE, out_dir, options)
            calibrations[(source_name, samples)] = {"dir": directory, **info}
            scorer.record({
                "part": "calibration", "shape": "4x256", "variant": f"{source_name} samples={samples}",
                "calibration_source": source_name, "num_samples": samples,
                "sts_dev_spearman": scorer.score_dir(directory), **info,
            })

    # Part 2: every option for every shape, cut from the default calibration's scores.
    default_dir = calibrations.get(("tinyshakespeare", DEFAULT_SAMPLES))
    if default_dir is None:
        out_dir = work / "calib-default"
        options = SubcloneOptions(calibration=CalibrationOptions(source=str(shakespeare), num_samples=DEFAULT_SAMPLES), verify=False)
        directory, _ = cut(parent, CALIBRATION_SHAPE, out_dir, options)
        default_dir = {"dir": directory}
    scores_path = default_dir["dir"] / "subclone_scores.safetensors"

    for blocks, width in SHAPES:
        shape_name = f"{blocks}x{width}"
        first_child = None
        for number, (variant, options) in enumerate(shape_variants(scores_path)):
            directory, info = cut(parent, (blocks, width), work / f"{shape_name}-{number}", options)
            first_child = first_child or directory
            scorer.record({"part": "options", "shape": shape_name, "variant": variant, "sts_dev_spearman": scorer.score_dir(directory), **info})
        for seed in (0, 1):
            model = random_like(first_child, "encoder", seed=seed)
            tokenizer = AutoTokenizer.from_pretrained(str(first_child))
            scorer.record({"part": "options", "shape": shape_name, "variant": f"random init seed={seed}", "sts_dev_spearman": scorer.score_model(model, tokenizer)})

    payload = {
        **env,
        "parent": str(parent),
        "evaluation": "sts-dev (1,500 pairs), mean pooling over the attention mask, cosine similarity, Spearman",
        "default_calibration": f"tinyshakespeare, {DEFAULT_SAMPLES} documents, 128 tokens each at most",
        "in_domain_corpus": f"unique sts-train sentences, shuffled, {SENTENCES_PER_DOCUMENT} per document ({in_domain_documents} documents)",
        "torch_threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": scorer.rows,
    }
    print("wrote", common.write_result(args.out, payload))


if __name__ == "__main__":
    main()
