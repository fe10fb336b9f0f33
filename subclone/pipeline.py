"""The subcloning pipeline: validate, calibrate, plan, extract, verify, publish a manifest.

:func:`run_request` drives the stages and owns the staging directory; each stage
lives in its own module and can be tested alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from subclone import __version__
from subclone.api import PlanReport, ProgressCallback, ProgressEvent, SubcloneResult
from subclone.checkpoint import (
    ParentCheckpoint,
    TensorReader,
    detect_prefix,
    expected_tensors,
    resolve_parent,
    sha256_file,
)
from subclone.errors import Cancelled, FieldError, InvalidOptions, SubcloneError
from subclone.options import SubcloneOptions, Target
from subclone.plan import Plan, default_layer_selection, make_plan, select_layers
from subclone.scores import Scores, weights_fingerprint
from subclone.shape import Shape, child_config, parent_shape, resolve_target
from subclone.specs import ArchitectureSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = "subclone_manifest.json"
SCORES_NAME = "subclone_scores.safetensors"
MANIFEST_FORMAT = 1
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json",
)


def validate_request(
    parent: ParentCheckpoint, target: Target, options: SubcloneOptions
) -> tuple[Shape, Shape]:
    """Check the target and the options against the parent; raise before any weight is read."""
    spec = parent.spec
    pshape = parent_shape(spec, parent.config)
    check_option_combinations(spec, options)
    return pshape, resolve_target(spec, pshape, target, options)


def check_option_combinations(spec: ArchitectureSpec, options: SubcloneOptions) -> None:
    errors = []
    if options.layer_selection == "influence" and options.method != "activation":
        errors.append(FieldError(
            "layer_selection", "influence", f"needs calibration, which method {options.method!r} does not run",
            allowed="middle, first, or method activation",
        ))
    if options.eval_sts_path is not None:
        if spec.task != "encoder":
            errors.append(FieldError("eval_sts_path", options.eval_sts_path, f"STS applies to encoders, not {spec.task} models"))
        elif not Path(options.eval_sts_path).is_file():
            errors.append(FieldError("eval_sts_path", options.eval_sts_path, "file does not exist"))
    if options.calibration.texts is None and options.calibration.source and not options.calibration.source.startswith("builtin:"):
        if (options.needs_calibration or options.verify) and not Path(options.calibration.source).is_file():
            errors.append(FieldError("calibration.source", options.calibration.source, "file does not exist",
                                     allowed="an existing .txt or .jsonl file, or builtin:stdlib-docstrings"))
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        errors.append(FieldError("device", options.device, "CUDA is not available on this machine", allowed="cpu"))
    if errors:
        raise InvalidOptions(errors)


def _meta_model(spec: ArchitectureSpec, config: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig

    from subclone.verify import model_class

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    config_obj = AutoConfig.for_model(spec.model_type, **fields)
    cls = model_class(config, spec.task)
    with torch.device("meta"):
        return cls._from_config(config_obj) if hasattr(cls, "_from_config") else cls.from_config(config_obj)


def _dtype_bytes(config: dict[str, Any]) -> int:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(name, 4)


def plan_from_config(
    spec: ArchitectureSpec, config: dict[str, Any], target: Target, options: SubcloneOptions
) -> tuple[PlanReport, Plan]:
    """Plan a child from the parent's config alone, on the ``meta`` device.

    Evenly spaced indices stand in for those that need scores, because the
    shapes, parameter counts and memory estimate do not depend on which indices
    are kept. Every mapped parent tensor is checked against the child model's
    own tensor shapes, so a spec or config rewrite error shows up here.
    """
    pshape = parent_shape(spec, config)
    check_option_combinations(spec, options)
    cshape = resolve_target(spec, pshape, target, options)
    shape_options = options.model_copy(update={"method": "uniform", "layer_selection": "first" if options.keep_layers is None else None})
    plan = make_plan(spec, pshape, cshape, shape_options, None)
    new_config = child_config(spec, config, cshape, plan.kept_layers, rescale=options.rescale)

    from subclone.extract import is_tied, map_tensors

    parent_model = _meta_model(spec, config)
    child_model = _meta_model(spec, new_config)
    parent_shapes = {k: tuple(v.shape) for k, v in parent_model.state_dict().items()}
    prefix = detect_prefix(spec, parent_shapes, f"meta {spec.default_architecture}")
    jobs = map_tensors(spec, plan, parent_shapes, base_prefix=prefix, tied=is_tied(spec, config))
    child_shapes = {k: tuple(v.shape) for k, v in child_model.state_dict().items()}
    for job in jobs:
        expected = child_shapes.get(job.child_name)
        if expected != job.child_shape:
            raise SubcloneError(f"internal error: {job.child_name} would be {job.child_shape} but the child model expects {expected}")

    parent_params = sum(p.numel() for p in parent_model.parameters())
    child_params = sum(p.numel() for p in child_model.parameters())
    dtype_bytes = _dtype_bytes(config)
    compute_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[options.dtype]
    cal = options.calibration
    widest = max(pshape.hidden_size, pshape.intermediate_size, pshape.num_attention_heads * pshape.head_dim)
    activations = cal.batch_size * cal.sequence_length * (8 * widest + pshape.num_attention_heads * cal.sequence_length) * compute_bytes
    largest_tensor = max(math.prod(s) for s in parent_shapes.values()) * dtype_bytes
    child_bytes = child_params * dtype_bytes
    report = PlanReport(
        parent=pshape.as_dict() | {"model_type": spec.model_type},
        child=cshape.as_dict() | {"model_type": spec.model_type},
        parent_parameters=int(parent_params),
        child_parameters=int(child_params),
        child_bytes=int(child_bytes),
        memory_estimate={
            # Estimates: weights at the compute dtype plus a rough activation bound.
            "calibration_bytes": int(parent_params * compute_bytes + activations) if options.needs_calibration else 0,
            "extraction_bytes": int(min(child_bytes, options.max_shard_size) + 2 * largest_tensor),
            "parent_weight_bytes": int(parent_params * dtype_bytes),
        },
        kept_layers=_layers_known_without_data(pshape, cshape, options),
        child_config=new_config,
    )
    return report, plan


def _layers_known_without_data(pshape: Shape, cshape: Shape, options: SubcloneOptions) -> list[int] | None:
    """Blocks the child will keep when no calibration decides them; None when influence does."""
    selection = options.layer_selection or default_layer_selection(options.method)
    if options.keep_layers is None and selection == "influence" and cshape.num_layers < pshape.num_layers:
        return None
    kept, _rule = select_layers(pshape, cshape, options, None)
    return kept


def plan_request(parent: str | Path, target: Target, options: SubcloneOptions, *, revision: str | None = None) -> PlanReport:
    checkpoint = resolve_parent(parent, revision)
    report, _ = plan_from_config(checkpoint.spec, checkpoint.config, target, options)
    return report


class _Reporter:
    def __init__(self, progress: ProgressCallback | None, should_cancel: Callable[[], bool] | None) -> None:
        self.progress = progress
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self._stage: str | None = None
        self._start = 0.0

    def stage(self, name: str, message: str = "") -> None:
        self.finish()
        self.check_cancel()
        self._stage, self._start = name, time.perf_counter()
        logger.info("stage %s started %s", name, message)
        self.emit(0, 1, message)

    def emit(self, done: int, total: int, message: str = "") -> None:
        if self.progress is not None and self._stage is not None:
            self.progress(ProgressEvent(stage=self._stage, done=done, total=total, message=message))

    def finish(self) -> None:
        if self._stage is not None:
            self.timings[self._stage] = round(time.perf_counter() - self._start, 3)
            self._stage = None

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled before stage {self._stage or 'start'}")



def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidOptions([FieldError("out", str(out_dir), "exists and is not an empty directory", allowed="a new or empty directory")])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _load_tokenizer(parent: ParentCheckpoint) -> Any:
    from transformers import AutoTokenizer

    from subclone.data import prepare_tokenizer
    from subclone.errors import CalibrationError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(parent.directory), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise CalibrationError(
            f"the parent {parent.source} has no usable tokenizer ({exc}); calibration and verification need one",
            param="parent",
        ) from None
    return prepare_tokenizer(tokenizer)


def _cache_key(parent: ParentCheckpoint, options: SubcloneOptions, texts_sha: str) -> str:
    payload = {
        "parent_weights": weights_fingerprint(parent.weight_sha256()),
        "calibration": options.calibration.model_dump(mode="json", exclude={"texts"}),
        "texts_sha256": texts_sha,
        "method": options.method,
        "dtype": options.dtype,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def magnitude_scores(parent: ParentCheckpoint, pshape: Shape) -> Scores:
    """Weight-norm importance: the L2 norm of every slice that belongs to an index (no data)."""
    hidden = torch.zeros(pshape.hidden_size, dtype=torch.float64)
    heads = [torch.zeros(pshape.num_attention_heads, dtype=torch.float64) for _ in range(pshape.num_layers)]
    ffn = [torch.zeros(pshape.intermediate_size, dtype=torch.float64) for _ in range(pshape.num_layers)]
    with TensorReader(parent) as reader:
        for tensor, layer, name in expected_tensors(parent):
            if not reader.has(name) or len(tensor.axes) < 2:
                continue
            values = reader.get(name).double()
            for axis, space in enumerate(tensor.axes):
                if not isinstance(space, str):
                    continue
                other = [d for d in range(values.dim()) if d != axis]
                squares = values.pow(2).sum(dim=other)
                if space == "hidden":
                    hidden += squares
                elif space == "ffn" and layer is not None:
                    ffn[layer] += squares
                elif space == "heads" and layer is not None:
                    heads[layer] += squares.reshape(pshape.num_attention_heads, pshape.head_dim).sum(-1)
    return Scores(hidden=hidden.sqrt(), heads=[h.sqrt() for h in heads], ffn=[f.sqrt() for f in ffn])


def run_request(
    parent_ref: str | Path,
    target: Target,
    out_dir: Path,
    options: SubcloneOptions,
    *,
    revision: str | None,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    scores_cache_dir: Path | None,
    provenance: dict[str, str],
) -> SubcloneResult:
    reporter = _Reporter(progress, should_cancel)
    started = time.perf_counter()
    reporter.stage("loading_parent")
    parent = resolve_parent(parent_ref, revision)
    spec = parent.spec
    pshape, cshape = validate_request(parent, target, options)
    staging = _prepare_out_dir(out_dir)
    try:
        manifest = _run_stages(parent, pshape, cshape, target, options, staging, reporter, scores_cache_dir, provenance)
        manifest["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
        _write_manifest(staging, manifest)
        reporter.check_cancel()
        if out_dir.exists():
            out_dir.rmdir()
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    scores_path = out_dir / SCORES_NAME if (out_dir / SCORES_NAME).exists() else None
    logger.info("child written to %s (%s)", out_dir, spec.model_type)
    return SubcloneResult(out_dir=out_dir, manifest=manifest, files=files, scores_path=scores_path)


def _run_stages(
    parent: ParentCheckpoint,
    pshape: Shape,
    cshape: Shape,
    target: Target,
    options: SubcloneOptions,
    staging: Path,
    reporter: _Reporter,
    scores_cache_dir: Path | None,
    provenance: dict[str, str],
) -> dict[str, Any]:
    from subclone.data import count_real_tokens, load_texts

    spec = parent.spec
    texts = load_texts(options.calibration, options.eval_texts) if (options.needs_calibration or options.verify) else None
    tokenizer = _load_tokenizer(parent) if texts is not None else None
    parent_sha = parent.weight_sha256()
    fingerprint = weights_fingerprint(parent_sha)
    calibration_info: dict[str, Any] = {"source": options.calibration.describe_source(), "used": False}

    scores: Scores | None = None
    if options.method == "activation":
        reporter.stage("calibrating")
        scores, calibration_info = _activation_scores(parent, pshape, options, texts, tokenizer, reporter, scores_cache_dir, fingerprint)
        scores.metadata["parent_weights_sha256"] = fingerprint
        scores.save(staging / SCORES_NAME)
    elif options.method == "magnitude":
        reporter.stage("calibrating", "weight norms")
        scores = magnitude_scores(parent, pshape)

    reporter.stage("ranking")
    plan = make_plan(spec, pshape, cshape, options, scores)
    new_config = child_config(spec, parent.config, cshape, plan.kept_layers, rescale=options.rescale)

    reporter.stage("extracting")
    from subclone.extract import is_tied, map_tensors, write_child_weights

    shapes = {name: tuple(parent.tensor_shape(name)) for name in parent.tensor_files}
    jobs = map_tensors(spec, plan, shapes, base_prefix=parent.base_prefix, tied=is_tied(spec, parent.config))
    metadata = {
        "format": "pt",
        "subclone_version": __version__,
        "parent": parent.source,
        "parent_revision": parent.revision or "",
        "parent_weights_sha256": fingerprint,
        "method": options.method,
        **{k: str(v) for k, v in sorted(provenance.items())},
    }
    write_child_weights(
        parent, jobs, staging, max_shard_size=options.max_shard_size, metadata=metadata,
        on_tensor=lambda done, total: reporter.emit(done, total), should_cancel=reporter.should_cancel,
    )
    (staging / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        source = parent.directory / name
        if source.is_file():
            shutil.copyfile(source, staging / name)

    metrics: dict[str, Any] = {}
    if options.verify:
        reporter.stage("verifying")
        metrics = _verify(parent, staging, options, texts.holdout if texts else [], tokenizer)
    reporter.finish()
    if texts is not None and calibration_info.get("used") and "real_tokens" not in calibration_info:
        calibration_info["real_tokens"] = count_real_tokens(tokenizer, texts.calibration, options.calibration.sequence_length)

    return {
        "format": MANIFEST_FORMAT,
        "subclone_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parent": {
            "source": parent.source,
            "revision": parent.revision,
            "model_type": spec.model_type,
            "weights_sha256": parent_sha,
            "shape": pshape.as_dict(),
        },
        "target": target.model_dump(),
        "child": {"shape": cshape.as_dict(), "config": "config.json"},
        "options": options.model_dump(mode="json", exclude={"calibration": {"texts"}}),
        "plan": plan.model_dump(mode="json"),
        "calibration": calibration_info,
        "provenance": provenance,
        "timings": dict(reporter.timings),
        "metrics": metrics,
    }


def _activation_scores(
    parent: ParentCheckpoint, pshape: Shape, options: SubcloneOptions, texts: Any, tokenizer: Any,
    reporter: _Reporter, scores_cache_dir: Path | None, fingerprint: str,
) -> tuple[Scores, dict[str, Any]]:
    from subclone.calibrate import calibrate, load_parent_model

    cal = options.calibration
    if options.scores_path is not None:
        path = Path(options.scores_path)
        scores = Scores.load(path)
        scores.metadata["path"] = str(path)
        scores.check_matches(hidden=pshape.hidden_size, heads=pshape.num_attention_heads, ffn=pshape.intermediate_size,
                             layers=pshape.num_layers, parent_sha=fingerprint)
        return scores, {"source": "scores file", "scores_path": str(path), "scores_sha256": sha256_file(path), "used": False,
                        "calibration_of_scores": {k: v for k, v in scores.metadata.items() if k.startswith("calibration_")}}
    info: dict[str, Any] = {
        "source": cal.describe_source(),
        "sha256": texts.sha256,
        "documents": len(texts.calibration),
        "heldout_documents": len(texts.holdout),
        "used": True,
        "cache_hit": False,
    }
    key = _cache_key(parent, options, texts.sha256)
    cached = scores_cache_dir / f"{key}.safetensors" if scores_cache_dir else None
    if cached is not None and cached.is_file():
        scores = Scores.load(cached)
        info.update(cache_hit=True, real_tokens=int(scores.metadata.get("real_tokens", 0)), cache_key=key)
        reporter.emit(1, 1, "reused cached scores")
        return scores, info
    with tempfile.TemporaryDirectory(prefix="subclone-offload-") as offload:
        model = load_parent_model(parent, device=options.device, dtype=options.dtype, max_memory=options.max_memory, offload_folder=offload)
        try:
            scores = calibrate(
                parent, model, tokenizer, texts.calibration, pshape,
                sequence_length=cal.sequence_length, batch_size=cal.batch_size,
                on_batch=lambda done, total: reporter.emit(done, total, "forward passes"),
                should_cancel=reporter.should_cancel,
            )
        finally:
            del model
    info["real_tokens"] = int(scores.metadata["real_tokens"])
    scores.metadata.update({
        "calibration_source": cal.describe_source(), "calibration_sha256": texts.sha256,
        "calibration_documents": str(len(texts.calibration)),
    })
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        scores.metadata["parent_weights_sha256"] = fingerprint
        scores.save(cached)
        info["cache_key"] = key
    return scores, info


def _verify(parent: ParentCheckpoint, child_dir: Path, options: SubcloneOptions, holdout: list[str], tokenizer: Any) -> dict[str, Any]:
    from subclone.verify import check_forward, load_checked, quality

    spec = parent.spec
    child = load_checked(child_dir, spec.task, options.device)
    texts = holdout or ["The quick brown fox jumps over the lazy dog."]
    check_forward(child, tokenizer, texts, spec.task)
    parent_model = None
    if options.max_memory is None:
        parent_model = load_checked(parent.directory, spec.task, options.device)
    sts_path = Path(options.eval_sts_path) if options.eval_sts_path else None
    metrics = quality(spec.task, child, tokenizer, texts, parent=parent_model, child_dir=child_dir, sts_path=sts_path)
    metrics["loaded_with"] = type(child).__name__
    return metrics


def _write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    files = {}
    for path in sorted(staging.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["files"] = files
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
