"""Command-line tool: ``subclone plan``, ``subclone run`` and ``subclone evaluate``.

Bad input exits with status 2 and a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from subclone.errors import FieldError, InvalidOptions, SubcloneError
from subclone.options import SubcloneOptions, Target, field_errors_from_pydantic

EXIT_BAD_INPUT = 2


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target shape (each defaults to the parent's value)")
    group.add_argument("--num-layers", type=int, help="number of transformer blocks")
    group.add_argument("--hidden-size", type=int, help="residual-stream width")
    group.add_argument("--intermediate-size", type=int, help="FFN width per block")
    group.add_argument("--num-attention-heads", type=int, help="query heads per block")
    group.add_argument("--num-key-value-heads", type=int, help="key/value heads per block (grouped-query models)")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parent", help="parent model directory or Hub repo id (owner/name)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the parent")
    parser.add_argument("--method", choices=["activation", "uniform", "magnitude"], default="activation",
                        help="how indices are ranked (default: activation)")
    parser.add_argument("--rescale", choices=["norm", "fan_in", "none"], default="norm",
                        help="weight rescaling after cutting (default: norm)")
    parser.add_argument("--layer-selection", choices=["influence", "middle", "first"],
                        help="which blocks to keep (default: influence for activation, middle for magnitude, first for uniform)")
    parser.add_argument("--influence-metric", choices=["relative", "angular"], default="relative",
                        help="block influence measure for --layer-selection influence")
    parser.add_argument("--keep-layers", help="comma-separated parent block indices to keep, e.g. 0,1,4,5")
    parser.add_argument("--calibration", default="builtin:stdlib-docstrings",
                        help="calibration text: a .txt or .jsonl file, or builtin:stdlib-docstrings")
    parser.add_argument("--samples", type=int, default=256, help="calibration documents (default: 256)")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per calibration sequence (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling calibration documents")
    parser.add_argument("--scores", help="reuse a scores file from an earlier run instead of calibrating")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute dtype for calibration (default: float32)")
    parser.add_argument("--max-memory", action="append", metavar="DEVICE=SIZE",
                        help="memory budget per device for calibration, e.g. 0=20GiB or cpu=64GiB (repeatable)")
    parser.add_argument("--max-shard-size", type=int, default=5 * 1024**3, help="largest weight shard in bytes")
    _add_target(parser)


def _options_from(args: argparse.Namespace, *, verify: bool = True) -> tuple[Target, SubcloneOptions]:
    data: dict[str, Any] = {
        "method": args.method,
        "rescale": args.rescale,
        "layer_selection": args.layer_selection,
        "influence_metric": args.influence_metric,
        "scores_path": args.scores,
        "device": args.device,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "verify": verify,
        "calibration": {
            "source": args.calibration,
            "num_samples": args.samples,
            "sequence_length": args.sequence_length,
            "batch_size": args.batch_size,
            "seed": args.seed,
        },
    }
    if args.keep_layers:
        try:
            data["keep_layers"] = [int(x) for x in args.keep_layers.split(",") if x.strip()]
        except ValueError:
            raise InvalidOptions([FieldError("keep_layers", args.keep_layers, "must be comma-separated integers", allowed="e.g. 0,1,4,5")]) from None
    if args.max_memory:
        budget = {}
        for item in args.max_memory:
            device, sep, size = item.partition("=")
            if not sep:
                raise SystemExit(f"subclone: error: --max-memory {item!r} must look like DEVICE=SIZE, e.g. cpu=8GiB")
            budget[device] = size
        data["max_memory"] = budget
    target_data = {
        key: getattr(args, key)
        for key in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        if getattr(args, key) is not None
    }
    try:
        target = Target.model_validate(target_data)
    except ValidationError as exc:
        raise InvalidOptions(field_errors_from_pydantic(exc)) from None
    try:
        options = SubcloneOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidOptions(field_errors_from_pydantic(exc)) from None
    return target, options


def _format_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _cmd_plan(args: argparse.Namespace) -> int:
    from subclone.api import plan_subclone

    target, options = _options_from(args)
    report = plan_subclone(args.parent, target, options, revision=args.revision)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(f"parent  {report.parent['model_type']}: {_shape_line(report.parent)}  ({_format_count(report.parent_parameters)} parameters)")
    print(f"child   {report.child['model_type']}: {_shape_line(report.child)}  ({_format_count(report.child_parameters)} parameters)")
    print(f"child weights: {report.child_bytes / 2**20:.1f} MiB")
    for key, value in report.memory_estimate.items():
        print(f"estimate {key}: {value / 2**20:.1f} MiB")
    if report.kept_layers is not None:
        print(f"kept blocks: {report.kept_layers}")
    else:
        print("kept blocks: chosen from calibration")
    return 0


def _shape_line(shape: dict[str, Any]) -> str:
    return (
        f"{shape['num_layers']} blocks, width {shape['hidden_size']}, FFN {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} key/value), head size {shape['head_dim']}"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from subclone.api import ProgressEvent, run_subclone

    target, options = _options_from(args, verify=not args.no_verify)
    if args.eval_sts:
        options = options.model_copy(update={"eval_sts_path": args.eval_sts})
    bars: dict[str, tqdm] = {}

    def progress(event: ProgressEvent) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr, leave=True)
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        bar.refresh()

    try:
        result = run_subclone(
            args.parent, target, args.out, options, revision=args.revision, progress=progress,
            scores_cache_dir=args.scores_cache,
        )
    finally:
        for bar in bars.values():
            bar.close()
    print(f"child written to {result.out_dir}")
    metrics = result.manifest.get("metrics") or {}
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from subclone.api import evaluate_child

    texts = None
    if args.texts:
        from subclone.data import read_documents

        texts = read_documents(Path(args.texts))[: args.limit]
    metrics = evaluate_child(args.child, parent=args.parent, sts_path=args.sts, texts=texts, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse parser whose usage errors are one line on stderr with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="subclone", description="Initialize a smaller transformer from a larger pretrained one.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    plan = sub.add_parser("plan", help="validate a target and print the child's shape, size and memory estimate")
    _add_options(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    run = sub.add_parser("run", help="build the child checkpoint")
    _add_options(run)
    run.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    run.add_argument("--scores-cache", type=Path, help="directory that caches calibration scores between runs")
    run.add_argument("--no-verify", action="store_true", help="skip reloading the child and measuring quality")
    run.add_argument("--eval-sts", help="STS-benchmark file (tab-separated) for an STS Spearman check of encoder children")
    run.set_defaults(func=_cmd_run)

    evaluate = sub.add_parser("evaluate", help="measure a child's zero-training quality")
    evaluate.add_argument("child", type=Path, help="child model directory")
    evaluate.add_argument("--parent", type=Path, help="parent directory to compare with")
    evaluate.add_argument("--sts", type=Path, help="STS-benchmark file (tab-separated) for STS Spearman")
    evaluate.add_argument("--texts", type=Path, help=".txt or .jsonl texts for the similarity-order or perplexity check")
    evaluate.add_argument("--limit", type=int, default=64, help="texts used from --texts (default: 64)")
    evaluate.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SubcloneError as exc:
        print(f"subclone: error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
