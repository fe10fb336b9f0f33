"""Exception hierarchy of the engine.

Every error a caller can cause derives from :class:`SubcloneError` and carries a
stable ``code`` so that the HTTP layer and the worker's retry policy each map
the hierarchy in one place. ``user_error`` separates mistakes in a request
(never retried) from infrastructure failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One invalid request field: its dotted name, the rejected value and what is allowed."""

    field: str
    value: Any
    message: str
    allowed: str | None = None

    def __str__(self) -> str:
        text = f"{self.field}={self.value!r}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "value": self.value, "message": self.message, "allowed": self.allowed}


class SubcloneError(Exception):
    """Base class of every error raised on purpose by the engine."""

    code = "subclone_error"
    user_error = True

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _FieldErrors(SubcloneError):
    def __init__(self, errors: list[FieldError], *, subject: str) -> None:
        self.errors = list(errors)
        details = "; ".join(str(e) for e in self.errors)
        super().__init__(
            f"invalid {subject}: {details}", param=self.errors[0].field if self.errors else None
        )


class InvalidTarget(_FieldErrors):
    """The target shape does not fit the parent; ``errors`` lists every violation."""

    code = "invalid_target"

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(errors, subject="target")


class InvalidOptions(_FieldErrors):
    """An option (method, calibration, rescaling, ...) is out of range or contradicts another."""

    code = "invalid_options"

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(errors, subject="options")


class ParentNotFound(SubcloneError):
    """The parent directory or Hub repository does not exist or cannot be reached."""

    code = "parent_not_found"


class UnsupportedArchitecture(SubcloneError):
    """The parent's ``model_type`` has no spec, or a tensor is not covered by its spec."""

    code = "unsupported_architecture"


class UnsafeCheckpoint(SubcloneError):
    """The parent would need unpickling, remote code or files outside its directory."""

    code = "unsafe_checkpoint"


class CalibrationError(SubcloneError):
    """Calibration data is missing, empty or could not be tokenized."""

    code = "calibration_error"


class VerificationFailed(SubcloneError):
    """The written child did not reload cleanly in stock transformers or gave non-finite outputs."""

    code = "verification_failed"
    user_error = False


class Cancelled(SubcloneError):
    """The caller asked to stop; raised between stages and inside long loops."""

    code = "cancelled"
    user_error = False
