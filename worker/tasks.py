"""Celery tasks: run a job, reconcile leases, clean up old artifacts, deliver a webhook.

Every task takes plain JSON arguments (a job id, an event type). The heavy
engine import happens inside :func:`worker.execute.execute_job`, in the pool's
child process, never at import of this module.
"""

from __future__ import annotations

import logging
import threading

from celery import Task
from celery.signals import worker_process_init, worker_ready
from celery.utils.log import get_task_logger

from app.context import (
    CLEANUP_TASK,
    RECONCILE_TASK,
    RUN_JOB_TASK,
    WEBHOOK_TASK,
    ServiceContext,
    build_context,
)
from app.core.config import get_settings
from app.db.migrate import upgrade_database
from app.db.session import dispose_engines
from worker.celery_app import celery_app
from worker.execute import execute_job, worker_identity
from worker.maintenance import cleanup_artifacts, reconcile_jobs

logger = get_task_logger(__name__)
module_logger = logging.getLogger(__name__)

_context_lock = threading.Lock()
_context: ServiceContext | None = None


def get_context() -> ServiceContext:
    """Return this process's context, built on first use (after the pool forked)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(get_settings())
        return _context


@worker_process_init.connect
def _reset_after_fork(**_: object) -> None:
    # Connections opened by the parent must not be used by a forked child.
    global _context
    dispose_engines()
    _context = None


@worker_ready.connect
def _prepare_on_start(**_: object) -> None:
    settings = get_settings()
    upgrade_database(settings.resolved_database_url)
    ctx = get_context()
    ctx.store.prepare()
    try:
        reconcile_jobs(ctx)
    except Exception:
        module_logger.exception("reconciler pass at worker start failed; the periodic pass retries")


@celery_app.task(
    name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def run_job(self: Task, job_id: str) -> None:
    """Run one subcloning job; a duplicate delivery of a job that is already leased returns at once."""
    owner = worker_identity(self.request.id)
    outcome = execute_job(get_context(), job_id, owner)
    logger.info(
        "job %s delivery %s: %s (%s)", job_id, self.request.id, outcome.status, outcome.reason
    )


@celery_app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile() -> None:
    """Requeue or fail jobs whose worker stopped renewing its lease."""
    reconcile_jobs(get_context())


@celery_app.task(name=CLEANUP_TASK, ignore_result=True)
def cleanup() -> None:
    """Delete artifacts older than the retention setting."""
    cleanup_artifacts(get_context())


@celery_app.task(name=WEBHOOK_TASK, ignore_result=True)
def deliver_webhook(job_id: str, event_type: str) -> None:
    """Send one signed job event to the job's webhook URL, retrying with backoff inside the call."""
    from app.notify import deliver_job_event

    deliver_job_event(get_settings(), job_id, event_type)
