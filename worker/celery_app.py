"""Celery application for production: GPU jobs on the ``gpu`` queue, webhooks and maintenance on ``default``.

Run one worker process per GPU::

    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -Q gpu --pool prefork -c 1
    celery -A worker.celery_app worker -Q default --pool prefork -c 2
    celery -A worker.celery_app beat

Tasks carry only a job id. The job table is the source of truth for status, so
results are never stored. Redis redelivers a task that is not acknowledged
within ``visibility_timeout``, so a settings validator keeps the timeout above
the hard time limit. A lease on the job row makes a duplicate delivery of a
running job exit without running it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from app.context import (
    CLEANUP_TASK,
    DEFAULT_QUEUE,
    GPU_QUEUE,
    RECONCILE_TASK,
    RUN_JOB_TASK,
    WEBHOOK_TASK,
)
from app.core.config import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``."""
    app = Celery("subclone", include=["worker.tasks"])
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.broker_visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": settings.broker_health_check_interval,
        "retry_on_timeout": True,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=settings.job_soft_time_limit,
        # NOTE: a job killed by the hard limit looks like a lost worker, so it is
        # retried up to max_attempts times before it fails with worker_lost. The soft
        # limit, which fails the job at once, normally fires first.
        task_time_limit=settings.job_time_limit,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_routes={
            RUN_JOB_TASK: {"queue": GPU_QUEUE},
            RECONCILE_TASK: {"queue": DEFAULT_QUEUE},
            CLEANUP_TASK: {"queue": DEFAULT_QUEUE},
            WEBHOOK_TASK: {"queue": DEFAULT_QUEUE},
        },
        beat_schedule={
            "reconcile-leases": {"task": RECONCILE_TASK, "schedule": settings.reconcile_interval},
            "cleanup-artifacts": {"task": CLEANUP_TASK, "schedule": 3600.0},
        },
        worker_hijack_root_logger=False,
        timezone="UTC",
    )
    return app


celery_app = make_celery(get_settings())
