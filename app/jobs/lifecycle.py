"""Job state machine, leases and the append-only event log.

Every status change goes through :func:`transition`, a single conditional
``UPDATE ... WHERE status IN (allowed predecessors)``. The database applies it
atomically, so two processes racing on one job cannot both win: a duplicate
Celery delivery, a reconciler and a worker, a cancel and a finish. A terminal
status is never left, because no transition lists it as a predecessor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.core.ids import new_id
from app.db.models import Job, JobEvent, utcnow

logger = logging.getLogger(__name__)

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({RUNNING, CANCELLING})

# For each status, the statuses a job may enter it from. Terminal statuses appear
# only as keys, never as predecessors, which is what makes them final.
# running -> queued is a retry after a lost lease or a storage failure;
# cancelling -> succeeded happens when a cancel arrives after publishing began.
ALLOWED_PREDECESSORS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING}),
    RUNNING: frozenset({QUEUED}),
    CANCELLING: frozenset({RUNNING}),
    SUCCEEDED: frozenset({RUNNING, CANCELLING}),
    FAILED: frozenset({QUEUED, RUNNING, CANCELLING}),
    CANCELLED: frozenset({QUEUED, RUNNING, CANCELLING}),
}

# The worker's stages, in order, and the share of a job's progress each one gets.
STAGE_WEIGHTS: dict[str, float] = {
    "loading_parent": 5.0,
    "calibrating": 50.0,
    "ranking": 5.0,
    "extracting": 20.0,
    "verifying": 12.0,
    "storing": 8.0,
}

WORKER_LOST = "worker_lost"


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable code, a message for people and the request field at fault."""

    code: str
    message: str
    param: str | None = None


def append_event(
    session: Session,
    job_id: str,
    type_: str,
    *,
    message: str = "",
    status: str | None = None,
    stage: str | None = None,
    percent: float | None = None,
    duration_s: float | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Add one event to a job's log in the caller's transaction."""
    event = JobEvent(
        id=new_id("evt"),
        job_id=job_id,
        created_at=utcnow(),
        type=type_,
        status=status,
        stage=stage,
        message=message,
        percent=percent,
        duration_s=duration_s,
        data=data,
    )
    session.add(event)
    return event


def transition(
    session: Session,
    job_id: str,
    new_status: str,
    *,
    owner: str | None = None,
    where: list[ColumnElement[bool]] | None = None,
    values: dict[str, Any] | None = None,
    message: str = "",
    error: JobError | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Move a job to ``new_status`` if its current status allows it; return whether it moved.

    ``owner`` additionally requires the caller to hold the job's lease, so a
    worker whose lease was taken over cannot overwrite the new owner's work.
    ``where`` adds conditions and ``values`` columns to set in the same UPDATE.
    The status event is appended in the caller's transaction only when the row changed.
    """
    if new_status not in ALLOWED_PREDECESSORS:
        raise ValueError(
            f"unknown job status {new_status!r}; expected one of {', '.join(STATUSES)}"
        )
    now = utcnow()
    changes: dict[str, Any] = {"status": new_status, "updated_at": now}
    if new_status in TERMINAL:
        changes.update(finished_at=now, lease_owner=None, lease_expires_at=None)
    if new_status == QUEUED:
        changes.update(lease_owner=None, lease_expires_at=None)
    if error is not None:
        changes.update(error_code=error.code, error_message=error.message, error_param=error.param)
    changes.update(values or {})

    conditions = [Job.id == job_id, Job.status.in_(ALLOWED_PREDECESSORS[new_status])]
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
    conditions.extend(where or [])

    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    event_data = dict(data or {})
    if error is not None:
        event_data["error"] = {"code": error.code, "message": error.message, "param": error.param}
    append_event(
        session,
        job_id,
        "status",
        status=new_status,
        message=message or f"job {new_status}",
        data=event_data or None,
    )
    logger.info("job %s is now %s%s", job_id, new_status, f" ({error.code})" if error else "")
    return True


def claim(session: Session, job_id: str, owner: str, lease_ttl: float) -> bool:
    """Take the lease of a queued job and mark it running; return False if another process has it.

    A job whose attempts reached its cap is never claimed again, and a job held
    back for a retry is not claimed before its ``available_at``.
    """
    now = utcnow()
    return transition(
        session,
        job_id,
        RUNNING,
        where=[Job.attempts < Job.max_attempts, Job.available_at <= now],
        values={
            "lease_owner": owner,
            "lease_expires_at": now + timedelta(seconds=lease_ttl),
            "attempts": Job.attempts + 1,
            "started_at": func.coalesce(Job.started_at, now),
            "stage": None,
        },
        message=f"attempt started by {owner}",
        data={"owner": owner},
    )


def next_claimable_job(session: Session) -> str | None:
    """Return the oldest queued job that may run now, for the embedded worker loop."""
    now = utcnow()
    return session.scalars(
        select(Job.id)
        .where(Job.status == QUEUED, Job.available_at <= now, Job.attempts < Job.max_attempts)
        .order_by(Job.seq)
        .limit(1)
    ).first()


@dataclass(frozen=True)
class LeaseState:
    """Result of a heartbeat: whether the lease is still held and whether a cancel was requested."""

    held: bool
    cancel_requested: bool


def renew_lease(session: Session, job_id: str, owner: str, lease_ttl: float) -> LeaseState:
    """Extend the lease by ``lease_ttl`` seconds and read the cancel flag."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(lease_expires_at=now + timedelta(seconds=lease_ttl))
        .execution_options(synchronize_session=False)
    )
    held = result.rowcount == 1  # type: ignore[attr-defined]
    cancel_at = session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id))
    return LeaseState(held=held, cancel_requested=cancel_at is not None)


def request_cancel(session: Session, job: Job) -> bool:
    """Cancel a queued job at once or flag a running one; return False for a finished job.

    A running job moves to ``cancelling``, and its worker stops at the next check
    of the flag. The job becomes ``cancelled`` when the worker finishes it, or
    the reconciler does if the worker is gone.
    """
    now = utcnow()
    flag = {"cancel_requested_at": func.coalesce(Job.cancel_requested_at, now)}
    if transition(
        session,
        job.id,
        CANCELLED,
        where=[Job.status == QUEUED],
        values=flag,
        message="cancelled before it started",
    ):
        return True
    if transition(session, job.id, CANCELLING, values=flag, message="cancel requested"):
        return True
    current = session.scalar(select(Job.status).where(Job.id == job.id))
    return current == CANCELLING


@dataclass
class ReconcileReport:
    requeued: list[str]
    failed: list[str]
    cancelled: list[str]
    redispatch: list[str]


def reconcile(session: Session, *, redispatch_after: float = 60.0) -> ReconcileReport:
    """Finish or requeue jobs whose worker stopped renewing its lease.

    An expired ``cancelling`` job becomes ``cancelled``; an expired ``running``
    job is requeued while attempts remain and otherwise fails with
    ``worker_lost``. Queued jobs that were never handed to the broker (the API
    failed to send the task) for ``redispatch_after`` seconds are returned in
    ``redispatch`` so the caller can send them again.
    """
    now = utcnow()
    report = ReconcileReport([], [], [], [])
    expired = session.execute(
        select(Job.id, Job.status, Job.attempts, Job.max_attempts, Job.lease_owner).where(
            Job.status.in_(ACTIVE), Job.lease_expires_at < now
        )
    ).all()
    for job_id, status, attempts, max_attempts, owner in expired:
        lease_expired = [Job.lease_expires_at < now, Job.lease_owner == owner]
        if status == CANCELLING:
            if transition(
                session,
                job_id,
                CANCELLED,
                where=lease_expired,
                message="worker stopped while cancelling",
            ):
                report.cancelled.append(job_id)
        elif attempts >= max_attempts:
            error = JobError(
                WORKER_LOST,
                f"the worker running attempt {attempts} of {max_attempts} stopped without finishing the job",
            )
            if transition(
                session, job_id, FAILED, where=lease_expired, error=error, message=error.message
            ):
                report.failed.append(job_id)
        elif transition(
            session,
            job_id,
            QUEUED,
            where=lease_expired,
            values={"dispatched_at": None, "available_at": now, "stage": None},
            message=f"worker {owner} stopped renewing its lease; attempt {attempts + 1} of {max_attempts} queued",
        ):
            report.requeued.append(job_id)
            logger.warning("job %s lost its worker %s; requeued", job_id, owner)

    stale = now - timedelta(seconds=redispatch_after)
    report.redispatch = list(
        session.scalars(
            select(Job.id).where(
                Job.status == QUEUED, Job.dispatched_at.is_(None), Job.updated_at < stale
            )
        ).all()
    )
    return report


def stage_percent(stage: str, done: int, total: int) -> float:
    """Return the job-wide percent reached when ``stage`` has done ``done`` of ``total`` units."""
    completed = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
            return round(completed + weight * fraction, 2)
        completed += weight
    return round(completed, 2)


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def as_utc(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
