"""One place that turns exceptions into RFC 9457 problem responses.

Service errors keep their status and fields. FastAPI's request validation
errors become 422 problems listing each invalid field by its dotted request
path. Anything unexpected becomes a 500 whose body contains nothing about the
cause, which only the log records.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import PROBLEM_BASE, ServiceError, ValidationFailed
from app.storage import ArtifactNotFound
from app.storage import RangeNotSatisfiable as StoreRangeNotSatisfiable
from app.storage import StorageError as StoreError
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_HTTP_TITLES = {
    404: "Not found",
    405: "Method not allowed",
    401: "Unauthorized",
    413: "Request body too large",
}
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    401: "unauthorized",
    413: "payload_too_large",
}


def problem_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(
        error.problem(),
        status_code=error.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=error.headers,
    )


def _field_path(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location]
    # FastAPI prefixes the location ("body", "query", ...); clients know fields by name alone.
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def validation_problem(exc: RequestValidationError) -> ServiceError:
    errors = [
        FieldError(
            field=_field_path(err.get("loc", ())),
            value=err.get("input"),
            message=err.get("msg", "invalid"),
        )
        for err in exc.errors()
    ]
    fields = ", ".join(sorted({e.field for e in errors})) or "body"
    return ValidationFailed(f"invalid request: {fields}", errors=errors)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc))

    @app.exception_handler(ArtifactNotFound)
    async def _artifact_not_found(request: Request, exc: ArtifactNotFound) -> JSONResponse:
        from app.core.errors import NotFound

        return problem_response(NotFound("no such artifact"))

    @app.exception_handler(StoreRangeNotSatisfiable)
    async def _range(request: Request, exc: StoreRangeNotSatisfiable) -> JSONResponse:
        from app.core.errors import RangeNotSatisfiable

        error = RangeNotSatisfiable(str(exc), headers={"Content-Range": f"bytes */{exc.size}"})
        return problem_response(error)

    @app.exception_handler(StoreError)
    async def _storage(request: Request, exc: StoreError) -> JSONResponse:
        from app.core.errors import StorageError

        logger.error("%s %s: artifact storage failed: %s", request.method, request.url.path, exc)
        return problem_response(StorageError("artifact storage is unavailable; retry later"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(
            str(exc.detail) if exc.detail else _HTTP_TITLES.get(exc.status_code, "Error")
        )
        error.status = exc.status_code
        error.code = _HTTP_CODES.get(exc.status_code, "http_error")
        error.title = _HTTP_TITLES.get(exc.status_code, "HTTP error")
        error.headers = dict(exc.headers or {})
        return problem_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s raised an unexpected error", request.method, request.url.path)
        error = ServiceError(
            "the server failed to handle the request; the operator's logs have the details"
        )
        return problem_response(error)


__all__ = ["PROBLEM_BASE", "PROBLEM_MEDIA_TYPE", "install_problem_handlers", "problem_response"]
