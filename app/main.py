"""FastAPI application factory."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.deps import LOCAL_TENANT_ID
from app.api.limits import BodySizeLimit
from app.api.problems import install_problem_handlers
from app.api.routes import artifacts, datasets, health, jobs, parents, plans
from app.context import ServiceContext, build_context
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.db.migrate import upgrade_database
from app.metrics import build_registry
from app.tenants import ensure_tenant

logger = logging.getLogger(__name__)

API_DESCRIPTION = """Build a smaller transformer from a larger pretrained one by weight subcloning.

Submit a job naming a registry parent and a target shape, follow its status and
events, then download the child as a standard Hugging Face directory. Errors are
RFC 9457 problem details whose `errors[]` names each invalid field.
"""


def _import_engine() -> None:
    # The first plan or job request needs the engine's planner, which imports torch
    # and transformers in several seconds. Importing it at start moves that wait
    # off the first request. The API never initialises CUDA.
    try:
        import subclone.pipeline  # noqa: F401
    except Exception:
        logger.exception("importing the engine failed; plan and job requests will fail")


def create_app(
    settings: Settings | None = None, *, context: ServiceContext | None = None
) -> FastAPI:
    """Build the API for ``settings``; migrations run when the app starts."""
    settings = settings or (context.settings if context else get_settings())
    configure_logging(settings.log_level)
    ctx = context or build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade_database(settings.resolved_database_url)
        ctx.store.prepare()
        if settings.auth_disabled:
            with ctx.session() as session:
                ensure_tenant(session, "local", tenant_id=LOCAL_TENANT_ID)
            logger.warning(
                "API keys are disabled: every request to this server on %s acts as the 'local' tenant. "
                "This is only allowed in embedded mode on a loopback address.",
                settings.host,
            )
        threading.Thread(target=_import_engine, name="engine-import", daemon=True).start()
        logger.info(
            "API ready (%s mode, database %s)",
            "embedded" if settings.embedded else "celery",
            settings.resolved_database_url.split("@")[-1],
        )
        yield

    app = FastAPI(
        title="subclone job service",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.context = ctx
    app.state.metrics_registry = build_registry(ctx)
    install_problem_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    for module in (jobs, artifacts, plans, parents, datasets, health):
        app.include_router(module.router)
    return app
