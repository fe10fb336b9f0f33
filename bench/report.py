"""Draw the figures for docs/benchmarks.md and print its tables as Markdown, from bench/results/*.json.

Usage: python bench/report.py  (writes docs/benchmarks/*.png, prints tables to stdout)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FIGURES = common.REPO_ROOT / "docs" / "benchmarks"
# Result files of later invocations that add runs or parents to the main result file, in the order they ran.
TRAINING_EXTRA = ("training-uniform-lr5e-4",)
COST_EXTRA = ("cost-1.5b", "cost-1.48b")


def load(name: str) -> dict | None:
    path = common.RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def header(result: dict) -> str:
    machine = result["machine"]
    return (f"Command: `{result['command']}`; {result['date_utc']}; {machine['cores']} cores ({machine['cpu_model']}), "
            f"GPU: {machine['gpu']}, torch {result['packages']['torch']}, transformers {result['packages']['transformers']}.")


def quality_tables(result: dict) -> None:
    rows = result["rows"]
    print(header(result))
    print()
    shapes = [s for s in dict.fromkeys(r["shape"] for r in rows if r["part"] == "options")]
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["part"] == "options"))
    print("| variant | " + " | ".join(shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    for variant in variants:
        cells = []
        for shape in shapes:
            match = [r for r in rows if r["part"] == "options" and r["shape"] == shape and r["variant"] == variant]
            cells.append(f"{match[0]['sts_dev_spearman']:.4f}" if match else "not measured")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    parent = [r for r in rows if r["part"] == "parent"]
    if parent:
        print(f"\nParent (6x384): {parent[0]['sts_dev_spearman']:.4f}\n")
    print("| calibration text | samples | STS-dev Spearman (4x256) | run seconds |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if r["part"] == "calibration":
            print(f"| {r['calibration_source']} | {r['num_samples']} | {r['sts_dev_spearman']:.4f} | {r['run_seconds']} |")
    print()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for source in dict.fromkeys(r["calibration_source"] for r in rows if r["part"] == "calibration"):
        points = [(r["num_samples"], r["sts_dev_spearman"]) for r in rows if r["part"] == "calibration" and r["calibration_source"] == source]
        ax.plot(*zip(*points, strict=True), marker="o", label=source)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration documents")
    ax.set_ylabel("STS-dev Spearman, no training")
    ax.set_title("4x256 child of all-MiniLM-L6-v2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(FIGURES / "quality_calibration.png", dpi=110)
    plt.close(fig)


def training_tables(result: dict, extra: list[dict]) -> None:
    """Print the training table and draw its figure. ``extra`` contains results of other invocations, whose runs are appended.

    The best learning rate and the speed-up are recomputed over the runs of all invocations. That is valid
    for the scores and step counts, which do not depend on machine load, but not for training seconds.
    """
    import training

    print(header(result))
    for other in extra:
        print(f"Also: {header(other)}")
    print()
    print("| init | lr | seed | invocation | dev subset before | dev subset after | full dev after | train seconds |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    invocations = [result, *extra]
    runs = []
    learning_rates: dict[str, list[float]] = {}
    for number, invocation in enumerate(invocations, start=1):
        for r in invocation["runs"]:
            runs.append(r)
            print(f"| {r['init']} | {r['lr']:g} | {r['seed']} | {number} ({invocation['date_utc']}) | {r['curve'][0][1]:.4f} | "
                  f"{r['final_subset']:.4f} | {r['final_full_dev']:.4f} | {r['train_seconds']} |")
        for init, rates in invocation["learning_rates"].items():
            learning_rates.setdefault(init, [])
            learning_rates[init] += [lr for lr in rates if lr not in learning_rates[init]]
    print()
    summary = training.summarize(runs, learning_rates) if extra else result["summary"]
    print("Summary:", json.dumps(summary))
    print()

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"subclone": "tab:blue", "uniform": "tab:orange", "random": "tab:gray"}
    styles = {}
    for r in runs:
        key = (r["init"], r["lr"])
        styles.setdefault(key, ["-", "--"][len([k for k in styles if k[0] == r["init"]]) % 2])
        steps, values = zip(*r["curve"], strict=True)
        label = f"{r['init']} lr={r['lr']:g}" if r["seed"] == result["seeds"][0] else None
        ax.plot(steps, values, styles[key], color=colors[r["init"]], alpha=0.8, label=label)
    ax.set_xlabel("training step (batch 32 pairs)")
    ax.set_ylabel("Spearman, 500-pair sts-dev subset")
    ax.set_title("Fine-tuning a 4x256 child on sts-train (each seed one line)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURES / "training_curves.png", dpi=110)
    plt.close(fig)


def cost_tables(result: dict, extra: list[dict]) -> None:
    """Print the cost table and draw its figure. ``extra`` contains results of other invocations, whose rows are appended."""
    print(header(result))
    for other in extra:
        print(f"Also: {header(other)}")
    print()
    print("| parent | parameters | weights on disk (bf16 except MiniLM fp32) | calibration tokens | subclone run (s) | engine stages (s) | "
          "lower bound (s) = read + forward + write | run / lower bound | peak RSS of run | peak RSS / parent bytes | "
          "lower-bound process peak RSS | extraction from scores: s, peak RSS |")
    print("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
    rows = result["rows"] + [row for other in extra for row in other["rows"]]
    for r in rows:
        bound = r["lower_bound"]
        stages = ", ".join(f"{k} {v}" for k, v in (r["run_stage_seconds"] or {}).items())
        if "extraction_only_wall_seconds" in r:
            extraction = f"{r['extraction_only_wall_seconds']} s, {r['extraction_only_peak_rss_bytes'] / 2**20:.0f} MiB"
        else:
            extraction = "not measured"
        print(f"| {r['parent']} | {r['parent_parameters'] / 1e6:.1f} M | {r['parent_weight_bytes'] / 2**20:.0f} MiB | "
              f"{r['calibration'].get('real_tokens')} | {r['run_wall_seconds']} | {stages} | "
              f"{bound['total_seconds']} = {bound['read_seconds']} + {bound['forward_seconds']} + {bound['write_seconds']} | {r['time_ratio']} | "
              f"{r['run_peak_rss_bytes'] / 2**20:.0f} MiB | {r['peak_rss_over_parent_bytes']} | "
              f"{r['lower_bound_process_peak_rss_bytes'] / 2**20:.0f} MiB | {extraction} |")
    print()

    llama = [r for r in rows if r["parent"].startswith("llama")]
    if len(llama) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        params = [r["parent_parameters"] / 1e6 for r in llama]
        # Wall times depend on the load from other jobs, so only parents of the same invocation are joined by a line.
        main_rows = [r for r in llama if r in result["rows"]]
        other_rows = [r for r in llama if r not in result["rows"]]
        main_params = [r["parent_parameters"] / 1e6 for r in main_rows]
        axes[0].plot(main_params, [r["run_wall_seconds"] for r in main_rows], marker="o", color="tab:blue", label="subclone run")
        axes[0].plot(main_params, [r["lower_bound"]["total_seconds"] for r in main_rows], marker="s", color="tab:orange", label="lower bound")
        if other_rows:
            other_params = [r["parent_parameters"] / 1e6 for r in other_rows]
            axes[0].plot(other_params, [r["run_wall_seconds"] for r in other_rows], "o", color="tab:blue", fillstyle="none",
                         label="subclone run, separate invocations")
            axes[0].plot(other_params, [r["lower_bound"]["total_seconds"] for r in other_rows], "s", color="tab:orange", fillstyle="none",
                         label="lower bound, separate invocations")
        axes[0].set_xlabel("parent parameters (M)")
        axes[0].set_ylabel("seconds")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        axes[1].plot(params, [r["run_peak_rss_bytes"] / 2**20 for r in llama], marker="o", label="peak RSS, subclone run")
        with_extraction = [r for r in llama if "extraction_only_peak_rss_bytes" in r]
        if with_extraction:
            axes[1].plot([r["parent_parameters"] / 1e6 for r in with_extraction],
                         [r["extraction_only_peak_rss_bytes"] / 2**20 for r in with_extraction], marker="^", label="peak RSS, extraction from scores")
        axes[1].plot(params, [r["parent_weight_bytes"] / 2**20 for r in llama], marker="s", label="parent weights on disk (bf16)")
        axes[1].set_xlabel("parent parameters (M)")
        axes[1].set_ylabel("MiB")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
        fig.suptitle("Random Llama parents, 32 calibration documents (at most 128 tokens each)")
        fig.tight_layout()
        fig.savefig(FIGURES / "cost_scaling.png", dpi=110)
        plt.close(fig)


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    print("## quality\n")
    quality = load("quality")
    if quality is None:
        print("not measured: no result file\n")
    else:
        quality_tables(quality)
    print("## training\n")
    training_result = load("training")
    if training_result is None:
        print("not measured: no result file\n")
    else:
        # Learning rates run in a later invocation (--lrs with --out) are appended.
        extra = [result for result in map(load, TRAINING_EXTRA) if result is not None]
        training_tables(training_result, extra)
    print("## cost\n")
    cost = load("cost")
    if cost is None:
        print("not measured: no result file\n")
    else:
        # Parents measured in a separate invocation (the largest one takes longest) are appended.
        extra = [result for result in map(load, COST_EXTRA) if result is not None]
        cost_tables(cost, extra)


if __name__ == "__main__":
    main()
