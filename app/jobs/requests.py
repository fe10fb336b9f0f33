"""Translation between API requests, stored jobs and the engine's value objects.

The API and the workers both build :class:`~subclone.options.SubcloneOptions`
here, so a job runs with exactly the options that were validated when it was
accepted. Engine field names are renamed to request field names so that a 422
names the field the client sent (``target.hidden_size``, ``options.keep_layers``,
``calibration.num_samples``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.core.config import Settings
from app.core.errors import ValidationFailed
from app.core.ids import looks_like_id
from subclone.errors import FieldError
from subclone.options import SubcloneOptions, Target, field_errors_from_pydantic

TARGET_FIELDS = frozenset(Target.model_fields)
OPTION_FIELDS = frozenset(SubcloneOptions.model_fields) - {"calibration"}

# Used in place of an uploaded dataset when only the request's shape is checked:
# planning reads configs, never calibration text.
PLANNING_SOURCE = "builtin:stdlib-docstrings"


def request_field(engine_field: str) -> str:
    """Map an engine field path (``hidden_size``, ``keep_layers``) to the request's (``target.hidden_size``)."""
    if engine_field.startswith(("target.", "options.", "calibration.")) or engine_field in (
        "parent",
        "revision",
    ):
        return engine_field
    head = engine_field.split(".", 1)[0]
    if head in TARGET_FIELDS:
        return f"target.{engine_field}"
    if head == "calibration":
        return engine_field
    if head in OPTION_FIELDS or not engine_field:
        return f"options.{engine_field}".rstrip(".")
    return engine_field


def check_service_bounds(settings: Settings, calibration: dict[str, Any]) -> None:
    """Apply the operator's limits on calibration size, which are tighter than the engine's."""
    errors: list[FieldError] = []
    samples = calibration.get("num_samples")
    if samples is not None and samples > settings.max_calibration_samples:
        errors.append(
            FieldError(
                "calibration.num_samples",
                samples,
                "exceeds this server's limit",
                allowed=f"1 to {settings.max_calibration_samples}",
            )
        )
    length = calibration.get("sequence_length")
    if length is not None and length > settings.max_sequence_length:
        errors.append(
            FieldError(
                "calibration.sequence_length",
                length,
                "exceeds this server's limit",
                allowed=f"8 to {settings.max_sequence_length}",
            )
        )
    texts = calibration.get("texts")
    if texts is not None and len(texts) > settings.max_inline_texts:
        errors.append(
            FieldError(
                "calibration.texts",
                f"{len(texts)} texts",
                "too many inline texts; upload a dataset instead",
                allowed=f"at most {settings.max_inline_texts}",
            )
        )
    source = calibration.get("source")
    if (
        texts is None
        and source is not None
        and not source.startswith("builtin:")
        and not looks_like_id(source, "ds")
    ):
        errors.append(
            FieldError(
                "calibration.source",
                source,
                "must be a built-in source or an uploaded dataset id",
                allowed="builtin:stdlib-docstrings or ds_...",
            )
        )
    if errors:
        raise ValidationFailed("the request exceeds this server's limits", errors=errors)


def build_engine_options(
    options: dict[str, Any],
    calibration: dict[str, Any],
    *,
    source_path: Path | None = None,
    device: str = "cpu",
    max_memory: dict[str, str] | None = None,
) -> SubcloneOptions:
    """Build engine options from stored request parts; raise ValidationFailed naming request fields.

    ``source_path`` replaces a dataset id in ``calibration.source`` with the file
    the dataset was written to. Without it a dataset id is replaced by a
    built-in source, which is enough to validate the request's shape.
    """
    calibration_fields = dict(calibration)
    source = calibration_fields.get("source")
    if calibration_fields.get("texts") is not None:
        calibration_fields["source"] = None
    elif source is not None and looks_like_id(source, "ds"):
        calibration_fields["source"] = str(source_path) if source_path else PLANNING_SOURCE
    try:
        return SubcloneOptions.model_validate(
            {
                **options,
                "calibration": calibration_fields,
                "device": device,
                "max_memory": max_memory,
            }
        )
    except ValidationError as exc:
        errors = [
            FieldError(request_field(e.field), e.value, e.message, e.allowed)
            for e in field_errors_from_pydantic(exc)
        ]
        raise ValidationFailed(
            "invalid options: " + "; ".join(str(e) for e in errors), errors=errors
        ) from None


def build_target(target: dict[str, Any]) -> Target:
    return Target.model_validate(target)
