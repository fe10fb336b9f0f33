"""Prometheus metrics in Celery mode: queue depth read from Redis, job counts from PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from svc_helpers import RedisBroker

from app.context import GPU_QUEUE, RUN_JOB_TASK, CeleryDispatcher, build_context
from app.core.config import Settings
from app.db.migrate import upgrade_database
from app.metrics import build_registry
from worker.celery_app import make_celery


def test_queue_depth_counts_broker_messages(
    tmp_path: Path, postgres_url: str, redis_broker: RedisBroker
) -> None:
    # A prefix no worker of this test run consumes, so the message stays queued.
    settings = Settings(
        state_dir=tmp_path,
        embedded=False,
        database_url=postgres_url,
        broker_url=redis_broker.url,
        broker_key_prefix=redis_broker.key_prefix + "metrics:",
    )
    upgrade_database(postgres_url)
    ctx = build_context(settings, dispatcher=CeleryDispatcher(settings))
    celery = make_celery(settings)
    for _ in range(2):
        celery.send_task(RUN_JOB_TASK, args=["job_probe"], queue=GPU_QUEUE)

    text = generate_latest(build_registry(ctx)).decode()
    assert 'subclone_queue_depth{queue="gpu"} 2.0' in text
    assert 'subclone_queue_depth{queue="default"} 0.0' in text
    assert 'subclone_jobs{status="running"}' in text
