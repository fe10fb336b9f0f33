"""Importance scores: what calibration measures and what ranking consumes.

Scores are saved as a safetensors file so that one calibration can cut several
child shapes (``--scores``) without running the parent again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from subclone.errors import FieldError, InvalidOptions

INFLUENCE_METRICS = ("relative", "angular")


@dataclass
class Scores:
    """Per-space importance scores, where a higher score means keep.

    ``hidden`` holds one global score per residual dimension (D,). ``heads[i]``
    (H,) and ``ffn[i]`` (F,) belong to parent block i. ``influence[metric]``
    (N,) measures how much each block changes the residual stream.
    """

    hidden: torch.Tensor
    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    influence: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def save(self, path: Path) -> None:
        tensors = {"hidden": self.hidden.double().contiguous()}
        for i, (heads, ffn) in enumerate(zip(self.heads, self.ffn, strict=True)):
            tensors[f"heads.{i}"] = heads.double().contiguous()
            tensors[f"ffn.{i}"] = ffn.double().contiguous()
        for metric, values in self.influence.items():
            tensors[f"influence.{metric}"] = values.double().contiguous()
        from subclone.extract import canonicalize_header

        metadata = {"format": "subclone-scores", "num_layers": str(self.num_layers), **self.metadata}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        canonicalize_header(tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Scores:
        if not path.is_file():
            raise InvalidOptions([FieldError("scores_path", str(path), "file does not exist")])
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != "subclone-scores":
                raise InvalidOptions([FieldError("scores_path", str(path), "is not a subclone scores file")])
            layers = int(metadata["num_layers"])
            keys = set(f.keys())
            return cls(
                hidden=f.get_tensor("hidden"),
                heads=[f.get_tensor(f"heads.{i}") for i in range(layers)],
                ffn=[f.get_tensor(f"ffn.{i}") for i in range(layers)],
                influence={m: f.get_tensor(f"influence.{m}") for m in INFLUENCE_METRICS if f"influence.{m}" in keys},
                metadata={k: v for k, v in metadata.items() if k not in ("format", "num_layers")},
            )

    def check_matches(self, *, hidden: int, heads: int, ffn: int, layers: int, parent_sha: str | None) -> None:
        """Fail when these scores were measured on a parent of another shape or other weights."""
        shape = (self.hidden.numel(), self.heads[0].numel() if self.heads else 0, self.ffn[0].numel() if self.ffn else 0, self.num_layers)
        if shape != (hidden, heads, ffn, layers):
            raise InvalidOptions([FieldError(
                "scores_path", self.metadata.get("path", ""),
                f"scores describe a parent with (hidden, heads, ffn, layers)={shape}, but this parent has {(hidden, heads, ffn, layers)}",
            )])
        recorded = self.metadata.get("parent_weights_sha256")
        if parent_sha is not None and recorded is not None and recorded != parent_sha:
            raise InvalidOptions([FieldError(
                "scores_path", self.metadata.get("path", ""), "scores were measured on different parent weights (sha256 differs)",
            )])


def weights_fingerprint(file_hashes: dict[str, str]) -> str:
    """Hash the per-file sha256 values into one digest, independent of file order."""
    import hashlib

    return hashlib.sha256(json.dumps(file_hashes, sort_keys=True).encode()).hexdigest()
