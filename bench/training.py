"""Fine-tuning speed of a 4x256 child from subcloning, uniform selection and random init.

Task: STS regression on sts-train. Both sentences are mean-pooled and the loss
is MSE(cos(u, v), score / 5). AdamW with linear warm-up (10% of steps) and
linear decay, batch 32 pairs, no sts data used before training (the subcloned
and uniform children are calibrated on Tiny Shakespeare or not at all).
During training, Spearman is measured every ``--eval-every`` steps on a fixed
500-pair subset of sts-dev; the full sts-dev split is scored at the end.

Usage: python bench/training.py [--steps 90] [--eval-every 15] [--seeds 0,1] [--lrs "subclone=2e-5,1e-4;uniform=5e-4"] [--out NAME]

To add runs to an earlier result, pass only the new rates in --lrs and a new --out name, and list that
name in TRAINING_EXTRA in bench/report.py, which appends its runs to the table and the figure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from subclone.api import run_subclone  # noqa: E402
from subclone.options import CalibrationOptions, SubcloneOptions, Target  # noqa: E402
from subclone.verify import load_checked, random_like  # noqa: E402

TARGET = Target(num_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=8)
# The recorded results ran uniform=1e-4 in a first invocation and uniform=5e-4 in a second one
# (--lrs "uniform=5e-4" --out training-uniform-lr5e-4), which bench/report.py merges.
DEFAULT_LEARNING_RATES = "subclone=2e-5,1e-4;random=1e-4,5e-4;uniform=1e-4,5e-4"
BATCH_SIZE = 32
DEV_SUBSET = 500
MAX_LENGTH = 128


def build_children(parent: Path, shakespeare: Path, work: Path) -> dict[str, Path]:
    subcloned = work / "subclone"
    run_subclone(parent, TARGET, subcloned, SubcloneOptions(calibration=CalibrationOptions(source=str(shakespeare), num_samples=256), verify=False))
    uniform = work / "uniform"
    run_subclone(parent, TARGET, uniform, SubcloneOptions(method="uniform", verify=False))
    return {"subclone": subcloned, "uniform": uniform}


def initial_model(init: str, children: dict[str, Path], seed: int):
    if init == "random":
        # The random model has the subcloned child's config and tokenizer, so only the weights differ.
        return random_like(children["subclone"], "encoder", seed=seed)
    return load_checked(children[init], "encoder")


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return common.mean_pool(hidden, batch["attention_mask"])


def parse_learning_rates(text: str) -> dict[str, tuple[float, ...]]:
    """Parse "init=lr,lr;init=lr" into {init: (lr, ...)}."""
    rates = {}
    for part in text.split(";"):
        init, _, values = part.partition("=")
        if init.strip() not in ("subclone", "uniform", "random") or not values:
            raise SystemExit(f"invalid --lrs entry {part!r}: expected subclone|uniform|random=LR[,LR...]")
        rates[init.strip()] = tuple(float(v) for v in values.split(","))
    return rates


def train_one(model, tokenizer, train, dev_subset, dev_full, *, lr: float, seed: int, steps: int, eval_every: int) -> dict:
    """Train in place and return the dev-subset curve, the full-dev score and the time spent."""
    torch.manual_seed(seed)
    first, second, gold = train
    pairs = list(range(len(gold)))
    steps_per_epoch = len(pairs) // BATCH_SIZE
    total_steps = steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * total_steps), total_steps)

    curve = [(0, common.sts_spearman(model, tokenizer, *dev_subset))]
    train_seconds = 0.0
    step = 0
    model.train()
    epoch = 0
    while step < total_steps:
        random.Random(seed * 1000 + epoch).shuffle(pairs)
        epoch += 1
        for start in range(0, min(steps_per_epoch, total_steps - step) * BATCH_SIZE, BATCH_SIZE):
            index = pairs[start: start + BATCH_SIZE]
            began = time.perf_counter()
            u = embed(model, tokenizer, [first[i] for i in index])
            v = embed(model, tokenizer, [second[i] for i in index])
            target = torch.tensor([gold[i] / 5.0 for i in index])
            loss = torch.nn.functional.mse_loss(torch.nn.functional.cosine_similarity(u, v, dim=-1), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            train_seconds += time.perf_counter() - began
            step += 1
            if step % eval_every == 0 or step == total_steps:
                curve.append((step, common.sts_spearman(model, tokenizer, *dev_subset)))
    return {
        "curve": curve,
        "final_subset": curve[-1][1],
        "final_full_dev": common.sts_spearman(model, tokenizer, *dev_full),
        "train_seconds": round(train_seconds, 1),
        "steps": total_steps,
    }


def first_step_reaching(curve: list[tuple[int, float]], score: float) -> int | None:
    for step, value in curve:
        if value >= score:
            return step
    return None


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [step for step, _ in runs[0]["curve"]]
    return [(step, sum(run["curve"][i][1] for run in runs) / len(runs)) for i, step in enumerate(steps)]


def summarize(results: list[dict], learning_rates: dict[str, tuple[float, ...]]) -> dict:
    """Pick each init's best learning rate by mean final subset score and compute the step speed-up."""
    best: dict[str, dict] = {}
    for init in learning_rates:
        candidates = []
        for lr in learning_rates[init]:
            runs = [r for r in results if r["init"] == init and r["lr"] == lr]
            if runs:
                curve = mean_curve(runs)
                candidates.append({
                    "lr": lr, "mean_curve": curve, "mean_final_subset": curve[-1][1],
                    "mean_final_full_dev": sum(r["final_full_dev"] for r in runs) / len(runs),
                })
        if candidates:
            best[init] = max(candidates, key=lambda c: c["mean_final_subset"])
    summary: dict = {"best_lr": {init: c["lr"] for init, c in best.items()}, "speedup": {}}
    if "random" not in best:
        return summary
    random_curve = best["random"]["mean_curve"]
    random_final = random_curve[-1][1]
    random_steps = first_step_reaching(random_curve, random_final)
    for init in ("subclone", "uniform"):
        if init not in best:
            continue
        steps = first_step_reaching(best[init]["mean_curve"], random_final)
        summary["speedup"][init] = {
            "random_final_subset_score": random_final,
            "random_steps_to_final": random_steps,
            "steps_to_random_final": steps,
            # Step 0 means the child beats random's final score before any update, so the ratio has no finite value.
            "speedup": (random_steps / steps) if steps else None,
            "reached": steps is not None,
        }
    return summary


def result_payload(env: dict, args: argparse.Namespace, learning_rates: dict, seeds: list[int], results: list[dict], started: float, started_cpu: float, complete: bool) -> dict:
    return {
        **env,
        "task": "sts-train cosine regression, loss MSE(cos(u, v), score / 5), mean pooling",
        "target": TARGET.model_dump(),
        "batch_size": BATCH_SIZE,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "dev_subset_pairs": DEV_SUBSET,
        "optimizer": "AdamW, weight_decay 0.01, linear warm-up over 10% of steps then linear decay",
        "learning_rates": learning_rates,
        "seeds": seeds,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "process_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "complete": complete,
        "runs": results,
        "summary": summarize(results, learning_rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=90, help="Optimizer steps of 32 pairs per run (one pass over sts-train is 179 steps).")
    parser.add_argument("--lrs", default=DEFAULT_LEARNING_RATES, help="Learning rates per init, as init=lr,lr;init=lr.")
    parser.add_argument("--eval-every", type=int, default=15, help="Steps between dev-subset evaluations.")
    parser.add_argument("--seeds", default="0,1", help="Comma-separated training seeds.")
    parser.add_argument("--out", default="training", help="Result name under bench/results/ (without .json).")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    learning_rates = parse_learning_rates(args.lrs)

    env = common.environment()
    data = common.data_dir()
    parent = common.parent_path()
    train = common.read_sts(data / "stsbenchmark" / "sts-train.csv")
    dev_first, dev_second, dev_gold = common.read_sts(data / "stsbenchmark" / "sts-dev.csv")
    subset = sorted(random.Random(0).sample(range(len(dev_gold)), DEV_SUBSET))
    dev_subset = ([dev_first[i] for i in subset], [dev_second[i] for i in subset], [dev_gold[i] for i in subset])
    dev_full = (dev_first, dev_second, dev_gold)

    work = Path(tempfile.mkdtemp(prefix="subclone-training-"))
    children = build_children(parent, data / "tinyshakespeare" / "input.txt", work)
    tokenizer = AutoTokenizer.from_pretrained(str(children["subclone"]))

    started_cpu = time.process_time()
    started = time.perf_counter()
    results = []
    for init, rates in learning_rates.items():
        for lr in rates:
            for seed in seeds:
                model = initial_model(init, children, seed)
                run = train_one(model, tokenizer, train, dev_subset, dev_full, lr=lr, seed=seed, steps=args.steps, eval_every=args.eval_every)
                results.append({"init": init, "lr": lr, "seed": seed, **run})
                print(f"{init:<9} lr={lr:<7g} seed={seed} start={run['curve'][0][1]:.4f} "
                      f"end_subset={run['final_subset']:.4f} full_dev={run['final_full_dev']:.4f} train_s={run['train_seconds']}", flush=True)
                # Rewritten after every run so that an interrupted benchmark still leaves its finished runs.
                common.write_result(args.out, result_payload(env, args, learning_rates, seeds, results, started, started_cpu, complete=False))
    path = common.write_result(args.out, result_payload(env, args, learning_rates, seeds, results, started, started_cpu, complete=True))
    print("wrote", path)




if __name__ == "__main__":
    main()
