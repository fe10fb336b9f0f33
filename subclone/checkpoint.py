"""Parent checkpoints: locate, check for safety, and read tensors lazily.

A parent is a Hugging Face directory with ``config.json`` and safetensors
weights (one file, or shards listed in ``model.safetensors.index.json``), or a
Hub repo id that is downloaded into the local cache first. Pickle weights are
never opened, configs that need remote code are rejected, and shard names from
an index must be bare file names inside the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from subclone.errors import ParentNotFound, UnsafeCheckpoint, UnsupportedArchitecture
from subclone.specs import ArchitectureSpec, TensorSpec, load_spec

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.txt", "*.model", "*.tiktoken", "merges.txt", "vocab.*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ParentCheckpoint:
    """A validated parent: its directory, config, spec and the file of every tensor."""

    directory: Path
    source: str
    revision: str | None
    config: dict[str, Any]
    spec: ArchitectureSpec
    weight_files: list[Path]
    tensor_files: dict[str, Path]
    base_prefix: str
    _sha256: dict[str, str] | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def checkpoint_name(self, tensor: TensorSpec, layer: int | None = None) -> str:
        """Name of ``tensor`` (for block ``layer``) as stored in this checkpoint."""
        name = tensor.name.replace("{layer}", str(layer)) if layer is not None else tensor.name
        return self.base_prefix + name if tensor.scope == "base" else name

    def weight_sha256(self) -> dict[str, str]:
        """sha256 of every weight file, keyed by file name (computed once)."""
        if self._sha256 is None:
            self._sha256 = {p.name: sha256_file(p) for p in self.weight_files}
        return self._sha256

    def tensor_shape(self, name: str) -> list[int]:
        with safe_open(str(self.tensor_files[name]), framework="pt") as f:
            return list(f.get_slice(name).get_shape())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_parent(parent: str | os.PathLike[str], revision: str | None = None) -> ParentCheckpoint:
    """Find the parent directory (downloading a Hub repo when needed) and validate it.

    Raises ParentNotFound, UnsafeCheckpoint or UnsupportedArchitecture before any
    tensor is read.
    """
    path = Path(parent).expanduser()
    if path.exists():
        if revision is not None:
            logger.info("revision %s ignored for local parent %s", revision, path)
        return open_parent_directory(path, source=str(path), revision=None)
    text = str(parent)
    if not _REPO_ID.match(text):
        raise ParentNotFound(
            f"parent {text!r} is neither an existing directory nor a Hub repo id of the form 'owner/name'",
            param="parent",
        )
    directory, allowed_root, resolved_revision = _download_from_hub(text, revision)
    return open_parent_directory(directory, source=text, revision=resolved_revision, allowed_root=allowed_root)


def _download_from_hub(repo_id: str, revision: str | None) -> tuple[Path, Path, str | None]:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        # The config comes first so that remote code and unknown families are
        # rejected before any weight is downloaded.
        # local_files_only is passed explicitly because huggingface_hub reads HF_HUB_OFFLINE
        # only once, at import time.
        config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=offline))
        _check_config(json.loads(config_path.read_text(encoding="utf-8")), source=repo_id)
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        hint = " (HF_HUB_OFFLINE is set and the repo is not in the local cache)" if offline else ""
        raise ParentNotFound(f"Hub repo {repo_id!r} at revision {revision or 'main'} is not available{hint}: {exc}", param="parent") from None
    except HfHubHTTPError as exc:
        raise ParentNotFound(f"Hub repo {repo_id!r} at revision {revision or 'main'} could not be fetched: {exc}", param="parent") from None
    except OSError as exc:
        raise ParentNotFound(f"Hub repo {repo_id!r} could not be fetched: {exc}", param="parent") from None
    # Snapshot files are symlinks into the cache's blobs folder, two levels up.
    return snapshot, snapshot.parent.parent, snapshot.name


def _check_config(config: dict[str, Any], *, source: str) -> ArchitectureSpec:
    if "auto_map" in config:
        raise UnsafeCheckpoint(
            f"parent {source} needs remote code (config.json has 'auto_map'); only architectures built into "
            "transformers are accepted",
            param="parent",
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedArchitecture(f"config.json of {source} has no model_type", param="model_type")
    return load_spec(model_type)


def _check_inside(path: Path, root: Path, allowed_root: Path | None, source: str) -> None:
    resolved = path.resolve()
    roots = [root.resolve()] + ([allowed_root.resolve()] if allowed_root else [])
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise UnsafeCheckpoint(f"weight file {path.name} of {source} resolves outside the model directory ({resolved})", param="parent")


def open_parent_directory(
    directory: Path, *, source: str, revision: str | None, allowed_root: Path | None = None
) -> ParentCheckpoint:
    """Validate a local model directory and index its tensors (headers only)."""
    if not directory.is_dir():
        raise ParentNotFound(f"parent {source!r} is not a directory", param="parent")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ParentNotFound(f"parent {source!r} has no config.json", param="parent")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnsupportedArchitecture(f"config.json of {source} is not valid JSON: {exc}", param="parent") from None
    spec = _check_config(config, source=source)

    weight_files = _find_weight_files(directory, source, allowed_root)
    tensor_files: dict[str, Path] = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor_files[name] = path
    base_prefix = detect_prefix(spec, tensor_files, source)
    parent = ParentCheckpoint(
        directory=directory,
        source=source,
        revision=revision,
        config=config,
        spec=spec,
        weight_files=weight_files,
        tensor_files=tensor_files,
        base_prefix=base_prefix,
    )
    check_coverage(parent)
    return parent


def _find_weight_files(directory: Path, source: str, allowed_root: Path | None) -> list[Path]:
    index_path = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UnsafeCheckpoint(f"{INDEX_FILE} of {source} is malformed: {exc}", param="parent") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if (
                not isinstance(name, str)
                or name in ("", ".", "..")
                or "/" in name
                or "\\" in name
                or "\x00" in name
                or os.path.isabs(name)
            ):
                raise UnsafeCheckpoint(
                    f"{INDEX_FILE} of {source} names shard {name!r}; shard names must be bare file names "
                    "inside the model directory",
                    param="parent",
                )
            if not name.endswith(".safetensors"):
                raise UnsafeCheckpoint(f"{INDEX_FILE} of {source} names shard {name!r}, which is not a .safetensors file", param="parent")
        files = [directory / n for n in names]
    elif single.is_file():
        files = [single]
    else:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpoint(
                f"parent {source} has only pickle weights ({', '.join(pickles)}); pickle files are never loaded. "
                "Convert the checkpoint to safetensors first",
                param="parent",
            )
        raise ParentNotFound(f"parent {source} has no {SINGLE_FILE} or {INDEX_FILE}", param="parent")
    for path in files:
        if not path.exists():
            raise ParentNotFound(f"weight file {path.name} of {source} is missing", param="parent")
        _check_inside(path, directory, allowed_root, source)
    return files


def detect_prefix(spec: ArchitectureSpec, tensor_names: Collection[str], source: str) -> str:
    """Find the prefix (for example 'model.') under which this checkpoint stores base-model tensors."""
    anchor = next(t.name for t in spec.tensors if t.scope == "base" and not t.per_layer and not t.optional)
    for prefix in ["", *spec.base_prefixes]:
        if prefix + anchor in tensor_names:
            return prefix
    raise UnsupportedArchitecture(
        f"checkpoint {source} has no tensor {anchor!r} (tried prefixes {['', *spec.base_prefixes]}); "
        f"it does not look like a {spec.model_type} checkpoint",
        param="parent",
    )


def num_layers(parent: ParentCheckpoint) -> int:
    return int(parent.config[parent.spec.config.num_layers])


def expected_tensors(parent: ParentCheckpoint) -> Iterator[tuple[TensorSpec, int | None, str]]:
    """Yield (spec entry, block index or None, checkpoint name) for every tensor the spec describes."""
    for tensor in parent.spec.tensors:
        if tensor.per_layer:
            for layer in range(num_layers(parent)):
                yield tensor, layer, parent.checkpoint_name(tensor, layer)
        else:
            yield tensor, None, parent.checkpoint_name(tensor)


def check_coverage(parent: ParentCheckpoint) -> None:
    """Fail when the checkpoint has a tensor the spec does not describe, or lacks a required one."""
    described = set()
    missing = []
    for tensor, _layer, name in expected_tensors(parent):
        described.add(name)
        if name not in parent.tensor_files and not tensor.optional:
            missing.append(name)
    ignored = set()
    for template in parent.spec.ignored:
        for layer in range(num_layers(parent)) if "{layer}" in template else [None]:
            plain = template.replace("{layer}", str(layer)) if layer is not None else template
            ignored.update({plain, parent.base_prefix + plain})
    unknown = sorted(n for n in parent.tensor_files if n not in described and n not in ignored)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UnsupportedArchitecture(
            f"{parent.source}: tensors not described by the {parent.model_type} spec: {shown}", param="parent"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnsupportedArchitecture(f"{parent.source}: required tensors missing: {shown}", param="parent")


class TensorReader:
    """Reads single tensors from the parent's safetensors files.

    Each read opens the file, copies one tensor out of the memory map and closes
    it again. A handle kept open for the whole extraction would leave every page
    it touched mapped, so the process's resident memory would grow to the size
    of the parent even though only one tensor is in use at a time.
    """

    def __init__(self, parent: ParentCheckpoint) -> None:
        self._parent = parent

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def has(self, name: str) -> bool:
        return name in self._parent.tensor_files

    def get(self, name: str) -> torch.Tensor:
        path = self._parent.tensor_files[name]
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).clone()
