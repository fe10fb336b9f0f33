"""Everything a request handler or a worker needs: settings, database, parent registry, store and dispatcher.

Two dispatchers hand accepted jobs to workers. :class:`CeleryDispatcher` sends
the job id to the ``gpu`` queue. :class:`TableDispatcher` sends nothing: the
embedded worker loop claims queued rows from the job table, which is what makes
embedded mode durable without a broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Job, utcnow
from app.db.session import session_scope
from app.parents import ParentRegistry
from app.storage import ArtifactStore, build_store

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "subclone.run_job"
RECONCILE_TASK = "subclone.reconcile"
CLEANUP_TASK = "subclone.cleanup_artifacts"
WEBHOOK_TASK = "subclone.deliver_webhook"
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"


class Dispatcher(Protocol):
    name: str

    def dispatch(self, job_id: str, *, delay: float = 0.0) -> None:
        """Hand a queued job to a worker, after ``delay`` seconds."""

    def send_webhook(self, job_id: str, event_type: str) -> None:
        """Arrange delivery of a job event to the job's webhook URL."""


@dataclass
class ServiceContext:
    settings: Settings
    registry: ParentRegistry
    store: ArtifactStore
    dispatcher: Dispatcher = field(repr=False)

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.database_url) as session:
            yield session


class TableDispatcher:
    """Embedded mode: jobs wait in the table for the worker loop; webhooks go out from a thread."""

    name = "table"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def dispatch(self, job_id: str, *, delay: float = 0.0) -> None:
        # The worker loop polls the table, and available_at holds back a delayed retry.
        return None

    def send_webhook(self, job_id: str, event_type: str) -> None:
        from app.notify import deliver_job_event

        thread = threading.Thread(
            target=deliver_job_event,
            args=(self._settings, job_id, event_type),
            name=f"webhook-{job_id}",
            daemon=True,
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for webhook deliveries in flight; return how many are still running."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        pending = sum(1 for thread in threads if thread.is_alive())
        if pending:
            logger.warning(
                "%d webhook deliveries still running after %.0fs; they are abandoned",
                pending,
                timeout,
            )
        return pending


class CeleryDispatcher:
    """Production: the job id goes to the ``gpu`` queue, webhooks and cleanup to ``default``."""

    name = "celery"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def dispatch(self, job_id: str, *, delay: float = 0.0) -> None:
        from worker.celery_app import celery_app

        celery_app.send_task(RUN_JOB_TASK, args=[job_id], queue=GPU_QUEUE, countdown=delay or None)
        with session_scope(self._settings.resolved_database_url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "queued")
                .values(dispatched_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        logger.info("job %s sent to the %s queue", job_id, GPU_QUEUE)

    def send_webhook(self, job_id: str, event_type: str) -> None:
        from worker.celery_app import celery_app

        celery_app.send_task(WEBHOOK_TASK, args=[job_id, event_type], queue=DEFAULT_QUEUE)


def build_context(settings: Settings, *, dispatcher: Dispatcher | None = None) -> ServiceContext:
    """Assemble the context for ``settings``; embedded mode gets the table dispatcher, otherwise Celery."""
    if dispatcher is None:
        dispatcher = TableDispatcher(settings) if settings.embedded else CeleryDispatcher(settings)
    return ServiceContext(
        settings=settings,
        registry=ParentRegistry.from_settings(settings),
        store=build_store(settings),
        dispatcher=dispatcher,
    )
