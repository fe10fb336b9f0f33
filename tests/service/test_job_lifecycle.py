"""State machine, leases and reconciler on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app import idempotency
from app.context import ServiceContext, TableDispatcher, build_context
from app.core.config import Settings
from app.core.ids import new_id
from app.db.migrate import upgrade_database
from app.db.models import IdempotencyRecord, Job, JobEvent, utcnow
from app.db.session import session_scope
from app.jobs import lifecycle
from app.tenants import ensure_tenant
from worker.execute import LeaseKeeper, execute_job
from worker.maintenance import cleanup_artifacts


@pytest.fixture(params=["sqlite", "postgresql"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceContext]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=url,
        max_attempts=2,
        lease_ttl=30,
        heartbeat_interval=1,
        storage={"retention_days": 30, "local_root": tmp_path / "artifacts"},
    )
    upgrade_database(url)
    context = build_context(settings, dispatcher=TableDispatcher(settings))
    yield context


def add_job(ctx: ServiceContext, **values: object) -> str:
    job_id = new_id("job")
    with session_scope(ctx.database_url) as session:
        tenant = ensure_tenant(session, "lifecycle")
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant.id,
                status="queued",
                parent_name="all-minilm-l6-v2",
                target={"num_layers": 2},
                options={},
                calibration={},
                job_metadata={},
                max_attempts=ctx.settings.max_attempts,
                attempts=0,
                progress_done=0,
                progress_total=0,
                progress_percent=0.0,
                artifacts_published=False,
                available_at=utcnow(),
                **values,
            )
        )
    return job_id


def status_of(ctx: ServiceContext, job_id: str) -> str:
    with session_scope(ctx.database_url) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def expire_lease(ctx: ServiceContext, job_id: str) -> None:
    with session_scope(ctx.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_terminal_status_never_changes(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.transition(session, job_id, "cancelled")
    for status in lifecycle.STATUSES:
        with session_scope(ctx.database_url) as session:
            assert not lifecycle.transition(session, job_id, status), status
    assert status_of(ctx, job_id) == "cancelled"


def test_unknown_status_is_rejected(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with (
        session_scope(ctx.database_url) as session,
        pytest.raises(ValueError, match="unknown job status"),
    ):
        lifecycle.transition(session, job_id, "done")


def test_second_claim_of_running_job_fails(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
    with session_scope(ctx.database_url) as session:
        assert not lifecycle.claim(session, job_id, "worker-b", 30)
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert job.lease_owner == "worker-a"
        assert job.attempts == 1


def test_duplicate_delivery_does_not_run(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
        events_before = session.scalar(select(JobEvent.seq).order_by(JobEvent.seq.desc()).limit(1))
    outcome = execute_job(ctx, job_id, "worker-b")
    assert outcome.status is None
    assert outcome.reason == "not_claimed"
    with session_scope(ctx.database_url) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert (job.status, job.lease_owner, job.attempts) == ("running", "worker-a", 1)
        events_after = session.scalar(select(JobEvent.seq).order_by(JobEvent.seq.desc()).limit(1))
    assert events_after == events_before


def test_finish_requires_lease_owner(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
    with session_scope(ctx.database_url) as session:
        assert not lifecycle.transition(session, job_id, "succeeded", owner="worker-b")
    with session_scope(ctx.database_url) as session:
        assert lifecycle.transition(session, job_id, "succeeded", owner="worker-a")
    assert status_of(ctx, job_id) == "succeeded"


def test_reconcile_requeues_then_fails_worker_lost(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    for attempt in (1, 2):
        with session_scope(ctx.database_url) as session:
            assert lifecycle.claim(session, job_id, f"worker-{attempt}", 30)
        expire_lease(ctx, job_id)
        with session_scope(ctx.database_url) as session:
            report = lifecycle.reconcile(session)
        if attempt == 1:
            assert report.requeued == [job_id]
            assert status_of(ctx, job_id) == "queued"
        else:
            assert report.failed == [job_id]
    with session_scope(ctx.database_url) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert job.status == "failed"
        assert job.error_code == "worker_lost"
        assert job.lease_owner is None
        assert job.finished_at is not None
        # The cap stops any further claim.
        assert not lifecycle.claim(session, job_id, "worker-3", 30)


def test_reconcile_leaves_live_lease(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
    with session_scope(ctx.database_url) as session:
        report = lifecycle.reconcile(session)
    assert job_id not in report.requeued + report.failed + report.cancelled
    assert status_of(ctx, job_id) == "running"


def test_reconcile_finishes_cancelling_job(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
    with session_scope(ctx.database_url) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert lifecycle.request_cancel(session, job)
    assert status_of(ctx, job_id) == "cancelling"
    expire_lease(ctx, job_id)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.reconcile(session).cancelled == [job_id]
    assert status_of(ctx, job_id) == "cancelled"


def test_heartbeat_sees_cancel_and_lost_lease(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.claim(session, job_id, "worker-a", 30)
    with session_scope(ctx.database_url) as session:
        state = lifecycle.renew_lease(session, job_id, "worker-a", 30)
    assert state.held and not state.cancel_requested
    with session_scope(ctx.database_url) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        lifecycle.request_cancel(session, job)
    with session_scope(ctx.database_url) as session:
        assert lifecycle.renew_lease(session, job_id, "worker-a", 30).cancel_requested
        assert not lifecycle.renew_lease(session, job_id, "worker-b", 30).held


def test_stage_percent_is_monotonic() -> None:
    previous = -1.0
    for stage in lifecycle.STAGE_WEIGHTS:
        for done in (0, 1, 2):
            percent = lifecycle.stage_percent(stage, done, 2)
            assert percent >= previous
            previous = percent
    assert previous == 100.0


def test_lease_keeper_stops_past_time_limit(ctx: ServiceContext) -> None:
    job_id = add_job(ctx)
    keeper = LeaseKeeper(ctx, job_id, "worker-a")
    assert not keeper.should_stop()
    keeper._deadline = time.monotonic() - 1.0
    assert keeper.should_stop()
    assert keeper.timed_out


def publish_child(ctx: ServiceContext, job_id: str, directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (directory / "subclone_manifest.json").write_text(json.dumps({"format": 1}))
    ctx.store.publish(job_id, directory)


def test_cleanup_deletes_expired_artifacts(ctx: ServiceContext, tmp_path: Path) -> None:
    old = add_job(ctx)
    recent = add_job(ctx)
    for job_id, age_days in ((old, 40), (recent, 1)):
        publish_child(ctx, job_id, tmp_path / job_id)
        with session_scope(ctx.database_url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status="succeeded",
                    artifacts_published=True,
                    finished_at=utcnow() - timedelta(days=age_days),
                )
            )
    assert cleanup_artifacts(ctx) == 1
    assert ctx.store.list_files(old) == []
    assert [f.name for f in ctx.store.list_files(recent)] == [
        "config.json",
        "subclone_manifest.json",
    ]
    with session_scope(ctx.database_url) as session:
        deleted = dict(session.execute(select(Job.id, Job.artifacts_deleted_at)).all())
    assert deleted[old] is not None
    assert deleted[recent] is None


def test_cleanup_purges_expired_idempotency_keys(ctx: ServiceContext) -> None:
    add_job(ctx)
    with session_scope(ctx.database_url) as session:
        tenant_id = session.scalar(select(Job.tenant_id).limit(1))
        assert idempotency.begin(session, tenant_id, "old-key", "digest", ttl=60) is None
        session.execute(
            update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    cleanup_artifacts(ctx)
    with session_scope(ctx.database_url) as session:
        assert session.scalar(select(IdempotencyRecord.key)) is None
