"""Public entry points: plan a child, run a subclone, evaluate a child.

The service and the CLI call only these functions. Each stage reports through
``progress`` and checks ``should_cancel`` so that a caller can show progress and
stop a long job between stages or inside the calibration and writing loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subclone.options import SubcloneOptions, Target

STAGES = ("loading_parent", "calibrating", "ranking", "extracting", "verifying")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: the stage, how far it is (done of total units) and a short message."""

    stage: str
    done: int
    total: int
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


@dataclass
class PlanReport:
    """Dry-run result of a request: shapes, sizes and memory estimate, computed from configs alone."""

    parent: dict[str, Any]
    child: dict[str, Any]
    parent_parameters: int
    child_parameters: int
    child_bytes: int
    memory_estimate: dict[str, int]
    kept_layers: list[int] | None
    child_config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "child": self.child,
            "parent_parameters": self.parent_parameters,
            "child_parameters": self.child_parameters,
            "child_bytes": self.child_bytes,
            "memory_estimate": self.memory_estimate,
            "kept_layers": self.kept_layers,
            "child_config": self.child_config,
        }


@dataclass
class SubcloneResult:
    """A written child: its directory, the manifest that was stored in it and the scores used."""

    out_dir: Path
    manifest: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    scores_path: Path | None = None


def plan_subclone(
    parent: str | Path,
    target: Target,
    options: SubcloneOptions | None = None,
    *,
    revision: str | None = None,
) -> PlanReport:
    """Validate a request against the parent's config and report the child's shape and cost."""
    from subclone.pipeline import plan_request

    return plan_request(parent, target, options or SubcloneOptions(), revision=revision)


def run_subclone(
    parent: str | Path,
    target: Target,
    out_dir: str | Path,
    options: SubcloneOptions | None = None,
    *,
    revision: str | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    scores_cache_dir: str | Path | None = None,
    provenance: dict[str, str] | None = None,
) -> SubcloneResult:
    """Build the child checkpoint in ``out_dir`` (which must not exist or be empty).

    Raises a :class:`subclone.errors.SubcloneError` subclass on bad input, before
    any weight is read where the error can be seen from configs and options. On
    any error ``out_dir`` is left absent or empty: the child is assembled in a
    sibling staging directory and renamed into place only after verification.
    With ``scores_cache_dir``, scores from an earlier calibration with the same
    parent weights, calibration data and options are reused.
    """
    from subclone.pipeline import run_request

    return run_request(
        parent,
        target,
        Path(out_dir),
        options or SubcloneOptions(),
        revision=revision,
        progress=progress,
        should_cancel=should_cancel,
        scores_cache_dir=Path(scores_cache_dir) if scores_cache_dir else None,
        provenance=provenance or {},
    )


def evaluate_child(
    child: str | Path,
    *,
    parent: str | Path | None = None,
    sts_path: str | Path | None = None,
    texts: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure a child's zero-training quality, next to the parent's when one is given."""
    from subclone.verify import evaluate_directory

    return evaluate_directory(
        Path(child), parent=Path(parent) if parent else None, sts_path=sts_path, texts=texts, device=device
    )
