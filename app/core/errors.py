"""Exceptions of the service, each carrying its HTTP status and problem type.

The API maps this hierarchy to RFC 9457 problem details in one handler
(:mod:`app.api.problems`). Engine errors (:class:`subclone.errors.SubcloneError`)
are converted by :func:`from_engine_error` so that a bad target or an unknown
architecture reads the same whether it was found by the API or the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from subclone.errors import FieldError, SubcloneError

PROBLEM_BASE = "https://subclone.dev/problems/"


class ServiceError(Exception):
    """Base of every error the API turns into a problem response."""

    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors or [])
        self.param = param or (self.errors[0].field if self.errors else None)
        self.headers = headers or {}

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.code.replace("_", "-")

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.errors:
            body["errors"] = [
                {
                    "field": e.field,
                    "value": _json_safe(e.value),
                    "message": e.message,
                    "allowed": e.allowed,
                }
                for e in self.errors
            ]
        return body


class ValidationFailed(ServiceError):
    status = 422
    code = "validation_failed"
    title = "Invalid request"


class NotFound(ServiceError):
    status = 404
    code = "not_found"
    title = "Not found"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    title = "Missing or invalid API key"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Conflict(ServiceError):
    status = 409
    code = "conflict"
    title = "Conflict"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    title = "Request with this Idempotency-Key is still being handled"


class IdempotencyMismatch(ServiceError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency-Key was used with a different request"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class RangeNotSatisfiable(ServiceError):
    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


class StorageError(ServiceError):
    """Artifact storage failed; an infrastructure error, retried by the worker."""

    status = 503
    code = "storage_error"
    title = "Artifact storage failed"


class InvalidTransition(ServiceError):
    """A job status change that the state machine does not allow."""

    status = 409
    code = "invalid_transition"
    title = "Job is not in a state that allows this"


# Engine error codes and the HTTP status each one gets when the API meets it
# while validating a request. Anything not listed is a 422.
_ENGINE_STATUS = {
    "parent_not_found": 422,
    "unsupported_architecture": 422,
    "unsafe_checkpoint": 422,
    "invalid_target": 422,
    "invalid_options": 422,
    "calibration_error": 422,
}

_ENGINE_TITLES = {
    "parent_not_found": "Parent not found",
    "unsupported_architecture": "Unsupported architecture",
    "unsafe_checkpoint": "Unsafe parent checkpoint",
    "invalid_target": "Invalid target shape",
    "invalid_options": "Invalid options",
    "calibration_error": "Invalid calibration data",
}


def from_engine_error(
    exc: SubcloneError, *, rename: Callable[[str], str] | None = None
) -> ServiceError:
    """Convert an engine error into a problem-carrying service error.

    ``rename`` maps engine field paths to request field paths (the engine names
    ``hidden_size`` where the request has ``target.hidden_size``).
    """
    rename = rename or (lambda name: name)
    errors = [
        FieldError(
            field=rename(e.field),
            value=e.value,
            message=e.message,
            allowed=e.allowed,
        )
        for e in getattr(exc, "errors", [])
    ]
    param = rename(exc.param) if exc.param else None
    error = ServiceError(exc.message, errors=errors, param=param)
    error.status = _ENGINE_STATUS.get(exc.code, 422)
    error.code = exc.code
    error.title = _ENGINE_TITLES.get(exc.code, "Invalid request")
    return error


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)
