"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import ContextDep
from app.api.problems import PROBLEM_MEDIA_TYPE
from app.core.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, ctx: ContextDep) -> JSONResponse:
    """Readiness: the database, the broker (or the embedded worker) and artifact storage all respond."""
    checks: dict[str, str] = {}
    try:
        with ctx.session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        logger.warning("readiness: database check failed: %s", exc)
        checks["database"] = "unavailable"
    checks["broker"] = _broker_status(request, ctx)
    try:
        ctx.store.check()
        checks["storage"] = "ok"
    except Exception as exc:
        logger.warning("readiness: storage check failed: %s", exc)
        checks["storage"] = "unavailable"

    if all(value == "ok" for value in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    failing = ", ".join(name for name, value in checks.items() if value != "ok")
    body: dict[str, Any] = ServiceUnavailable(f"not ready: {failing}").problem()
    body["checks"] = checks
    return JSONResponse(body, status_code=503, media_type=PROBLEM_MEDIA_TYPE)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus metrics: jobs by status, stage durations, queue depth."""
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )


def _broker_status(request: Request, ctx: ContextDep) -> str:
    if ctx.dispatcher.name == "table":
        supervisor = getattr(request.app.state, "supervisor", None)
        if supervisor is None or supervisor.alive():
            return "ok"
        return "unavailable"
    try:
        import redis

        client = redis.Redis.from_url(
            ctx.settings.broker_url, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except Exception as exc:
        logger.warning("readiness: broker check failed: %s", exc)
        return "unavailable"
