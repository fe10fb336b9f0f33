"""Extraction: slice every parent tensor by the plan and write the child's safetensors.

The mapping from parent tensors to child tensors (:func:`map_tensors`) uses
names and shapes only, so it also runs on a ``meta`` model to check a plan for
a parent far larger than memory. The writer reads one parent tensor at a time
and keeps at most one output shard in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from subclone.checkpoint import ParentCheckpoint, TensorReader
from subclone.errors import Cancelled
from subclone.plan import Plan
from subclone.specs import ArchitectureSpec, Axis, TensorSpec

DTYPE_SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8, torch.int64: 8, torch.int32: 4, torch.uint8: 1, torch.int8: 1}


@dataclass(frozen=True)
class TensorJob:
    """One child tensor: where it comes from and how to cut and scale it."""

    child_name: str
    parent_name: str
    indices: tuple[torch.Tensor | None, ...]  # per axis; None keeps the axis whole
    child_shape: tuple[int, ...]
    scale: float  # multiply the stored values (1.0: copy as is)
    offset: float  # norm weights stored as w mean (offset + w): scale (offset + w), subtract offset


def _space_indices(space: str, plan: Plan, layer_position: int | None) -> tuple[list[int] | None, int]:
    """Kept indices of one space (None when kept whole) and the parent's size of that space."""
    parent, child = plan.parent, plan.child
    head_dim = parent["head_dim"]
    if space == "hidden":
        return (plan.hidden if child["hidden_size"] < parent["hidden_size"] else None), parent["hidden_size"]
    if space not in ("heads", "kv_heads", "ffn"):
        return None, -1  # vocab and keep: never cut
    if layer_position is None:
        raise ValueError(f"space {space!r} used by a tensor that is not per block")
    if space == "ffn":
        kept = plan.ffn[layer_position]
        return (kept if len(kept) < parent["intermediate_size"] else None), parent["intermediate_size"]
    heads = plan.heads[layer_position] if space == "heads" else plan.kv_heads[layer_position]
    total = parent["num_attention_heads"] if space == "heads" else parent["num_key_value_heads"]
    entries = [h * head_dim + d for h in heads for d in range(head_dim)]
    return (entries if len(heads) < total else None), total * head_dim


def _axis_indices(axis: Axis, plan: Plan, layer_position: int | None, parent_size: int) -> torch.Tensor | None:
    if isinstance(axis, str):
        kept, _size = _space_indices(axis, plan, layer_position)
        return None if kept is None else torch.tensor(kept, dtype=torch.long)
    # A fused axis: several spaces laid end to end (GPT-2 c_attn: q, k, v).
    pieces: list[int] = []
    offset, any_cut = 0, False
    for space in axis:
        kept, size = _space_indices(space, plan, layer_position)
        if kept is None:
            kept = list(range(size))
        else:
            any_cut = True
        pieces.extend(offset + k for k in kept)
        offset += size
    if offset != parent_size:
        raise ValueError(f"fused axis {axis} covers {offset} entries but the tensor has {parent_size}")
    return torch.tensor(pieces, dtype=torch.long) if any_cut else None


def is_tied(spec: ArchitectureSpec, config: dict) -> bool:
    key = spec.config.tie_word_embeddings
    return bool(config.get(key, spec.config.tie_default)) if key else False


def map_tensors(
    spec: ArchitectureSpec,
    plan: Plan,
    parent_shapes: dict[str, tuple[int, ...]],
    *,
    base_prefix: str,
    tied: bool,
) -> list[TensorJob]:
    """List the child's tensors in a fixed order, from parent names and shapes alone."""
    jobs: list[TensorJob] = []

    def add(tensor: TensorSpec, parent_layer: int | None, position: int | None) -> None:
        def full(t: TensorSpec, layer: int | None) -> str:
            name = t.name.replace("{layer}", str(layer)) if layer is not None else t.name
            return base_prefix + name if t.scope == "base" else name

        parent_name = full(tensor, parent_layer)
        if parent_name not in parent_shapes:
            if tensor.optional:
                return
            raise KeyError(parent_name)
        if tensor.tied_to is not None and tied:
            return  # stored once, under the tensor it is tied to
        shape = parent_shapes[parent_name]
        if len(shape) != len(tensor.axes):
            raise ValueError(f"{parent_name} has {len(shape)} axes but the {spec.model_type} spec lists {len(tensor.axes)}")
        indices = tuple(_axis_indices(axis, plan, position, size) for axis, size in zip(tensor.axes, shape, strict=True))
        child_shape = tuple(size if idx is None else int(idx.numel()) for size, idx in zip(shape, indices, strict=True))
        scale, offset = 1.0, 0.0
        if plan.rescale == "norm" and tensor.norm and plan.child["hidden_size"] < plan.parent["hidden_size"]:
            # Dropping residual dimensions raises the RMS a norm computes by sqrt(D/d) when the
            # dropped dimensions are near zero; scaling the norm weight undoes that.
            scale, offset = math.sqrt(plan.residual_ratio()), spec.norm.weight_offset
        elif plan.rescale == "fan_in" and tensor.fan_in_axis is not None:
            ratio = shape[tensor.fan_in_axis] / child_shape[tensor.fan_in_axis]
            if ratio > 1:
                scale = math.sqrt(ratio)
        child_layer = position if parent_layer is not None else None
        jobs.append(TensorJob(
            child_name=full(tensor, child_layer),
            parent_name=parent_name,
            indices=indices,
            child_shape=child_shape,
            scale=scale,
            offset=offset,
        ))

    for tensor in spec.tensors:
        if not tensor.per_layer:
            add(tensor, None, None)
    for position, parent_layer in enumerate(plan.kept_layers):
        for tensor in spec.tensors:
            if tensor.per_layer:
                add(tensor, parent_layer, position)
    return jobs


def cut_tensor(tensor: torch.Tensor, job: TensorJob) -> torch.Tensor:
    """Apply one job to the parent tensor: index_select per cut axis, then rescale."""
    out = tensor
    for axis, idx in enumerate(job.indices):
        if idx is not None:
            out = out.index_select(axis, idx)
    if job.scale != 1.0:
        dtype = out.dtype
        out = ((out.float() + job.offset) * job.scale - job.offset).to(dtype)
    return out.contiguous()


def shard_layout(jobs: list[TensorJob], dtypes: dict[str, torch.dtype], max_shard_size: int) -> list[list[TensorJob]]:
    """Group jobs into shards of at most ``max_shard_size`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        nbytes = math.prod(job.child_shape) * DTYPE_SIZES[dtypes[job.parent_name]]
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += nbytes
    return shards


def write_child_weights(
    parent: ParentCheckpoint,
    jobs: list[TensorJob],
    out_dir: Path,
    *,
    max_shard_size: int,
    metadata: dict[str, str],
    on_tensor: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[Path]:
    """Write ``model.safetensors`` or numbered shards plus ``model.safetensors.index.json``."""
    dtypes = {}
    with TensorReader(parent) as reader:
        from safetensors import safe_open

        for job in jobs:
            with safe_open(str(parent.tensor_files[job.parent_name]), framework="pt") as f:
                dtypes[job.parent_name] = _dtype_of(f.get_slice(job.parent_name).get_dtype())
        shards = shard_layout(jobs, dtypes, max_shard_size)
        names = (
            ["model.safetensors"] if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        written: list[Path] = []
        weight_map: dict[str, str] = {}
        total_size = 0
        done = 0
        for name, shard in zip(names, shards, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for job in shard:
                if should_cancel is not None and should_cancel():
                    raise Cancelled("cancelled while writing weights")
                tensors[job.child_name] = cut_tensor(reader.get(job.parent_name), job)
                total_size += tensors[job.child_name].numel() * tensors[job.child_name].element_size()
                weight_map[job.child_name] = name
                done += 1
                if on_tensor is not None:
                    on_tensor(done, len(jobs))
            path = out_dir / name
            save_file(tensors, str(path), metadata=metadata)
            canonicalize_header(path)
            written.append(path)
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        index_path = out_dir / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(index_path)
    return written


def canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted metadata keys, in place.

    safetensors 0.8 serializes ``__metadata__`` from a hash map whose order
    changes between calls, so two identical saves can differ in their header
    bytes. The rewritten header has the same length and the tensor data is not
    touched, which makes identical inputs give byte-identical files.
    """
    with path.open("r+b") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
        metadata = header.pop("__metadata__", None)
        ordered: dict[str, object] = {}
        if metadata is not None:
            ordered["__metadata__"] = dict(sorted(metadata.items()))
        for name in sorted(header, key=lambda n: (header[n]["data_offsets"][0], n)):
            ordered[name] = header[name]
        text = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
        if len(text) > length:
            raise RuntimeError(f"canonical header of {path.name} is longer than the original ({len(text)} > {length} bytes)")
        fh.seek(8)
        fh.write(text + b" " * (length - len(text)))


_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8,
}


def _dtype_of(name: str) -> torch.dtype:
    return _SAFETENSORS_DTYPES[name]
