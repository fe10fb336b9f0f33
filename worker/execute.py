"""Run one job: claim its lease, call the engine, publish the child, record the outcome.

Shared by the Celery task and the embedded worker loop. The engine (and with it
torch) is imported inside :func:`execute_job`, so importing this module in a
worker's parent process never initialises CUDA before the pool forks.

User errors from the engine fail the job with the engine's code and are never
retried. A storage failure requeues the job while attempts remain. Running
out of memory fails it with ``out_of_memory``, and an unexpected error with
``internal_error``. A worker that dies leaves its lease to expire, and the
reconciler requeues or fails the job (``worker_lost``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from app.context import ServiceContext
from app.core.errors import ServiceError
from app.datasets import write_dataset_file
from app.db.models import Dataset, Job, utcnow
from app.jobs import lifecycle
from app.jobs.lifecycle import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobError
from app.jobs.requests import build_engine_options, build_target
from app.storage import StorageError

logger = logging.getLogger(__name__)

# Progress is written to the job row at most this often, and a progress event
# is appended at most this often, so a fast inner loop cannot flood the database.
PROGRESS_WRITE_INTERVAL_S = 1.0
PROGRESS_EVENT_INTERVAL_S = 10.0


def worker_identity(suffix: str | None = None) -> str:
    """Return a lease owner name: host, process id and a per-run suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{suffix or uuid.uuid4().hex[:8]}"


class LeaseKeeper:
    """Background thread that renews a job's lease and watches its cancel flag.

    ``should_stop`` is what the engine polls as ``should_cancel``. It turns true
    when a cancel was requested, when the lease was lost to another worker, when
    the job ran past ``job_soft_time_limit``, or when this worker is shutting
    down. In embedded mode that check is the only time limit, because no Celery
    limits apply there.
    """

    def __init__(
        self, ctx: ServiceContext, job_id: str, owner: str, shutdown: threading.Event | None = None
    ) -> None:
        self._ctx = ctx
        self._job_id = job_id
        self._owner = owner
        self._shutdown = shutdown or threading.Event()
        self._stop = threading.Event()
        self.cancel_requested = False
        self.lease_lost = False
        self.timed_out = False
        self._deadline = time.monotonic() + ctx.settings.job_soft_time_limit
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._ctx.settings.heartbeat_interval + 5)

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def should_stop(self) -> bool:
        if not self.timed_out and time.monotonic() > self._deadline:
            logger.warning(
                "job %s: ran longer than %ss; stopping it",
                self._job_id,
                self._ctx.settings.job_soft_time_limit,
            )
            self.timed_out = True
        return self.cancel_requested or self.lease_lost or self.timed_out or self._shutdown.is_set()

    def _run(self) -> None:
        interval = self._ctx.settings.heartbeat_interval
        while not self._stop.wait(interval):
            try:
                with self._ctx.session() as session:
                    state = lifecycle.renew_lease(
                        session, self._job_id, self._owner, self._ctx.settings.lease_ttl
                    )
            except Exception:
                # A database hiccup is not a lost lease; the lease lasts lease_ttl, at
                # least two heartbeats, so the next renewal can still succeed.
                logger.exception(
                    "job %s: lease renewal failed; retrying in %.1fs", self._job_id, interval
                )
                continue
            if state.cancel_requested and not self.cancel_requested:
                logger.info("job %s: cancel requested", self._job_id)
            self.cancel_requested = state.cancel_requested
            if not state.held:
                logger.warning(
                    "job %s: lease of %s lost; stopping without recording an outcome",
                    self._job_id,
                    self._owner,
                )
                self.lease_lost = True
                return


class ProgressRecorder:
    """Engine progress callback that writes stage, progress and stage-duration events."""

    def __init__(self, ctx: ServiceContext, job_id: str, owner: str) -> None:
        self._ctx = ctx
        self._job_id = job_id
        self._owner = owner
        self.stage: str | None = None
        self._stage_started = 0.0
        self._last_write = 0.0
        self._last_event = 0.0

    def __call__(self, event: Any) -> None:
        stage, done, total = event.stage, int(event.done), int(event.total)
        now = time.monotonic()
        stage_changed = stage != self.stage
        finished = total > 0 and done >= total
        if not (stage_changed or finished or now - self._last_write >= PROGRESS_WRITE_INTERVAL_S):
            return
        percent = lifecycle.stage_percent(stage, done, total)
        try:
            with self._ctx.session() as session:
                if stage_changed:
                    self._close_stage(session, now)
                    self.stage = stage
                    self._stage_started = now
                    lifecycle.append_event(
                        session,
                        self._job_id,
                        "stage_started",
                        stage=stage,
                        percent=percent,
                        message=event.message or f"{stage} started",
                    )
                elif now - self._last_event >= PROGRESS_EVENT_INTERVAL_S or finished:
                    lifecycle.append_event(
                        session,
                        self._job_id,
                        "progress",
                        stage=stage,
                        percent=percent,
                        message=event.message or f"{stage}: {done}/{total}",
                        data={"done": done, "total": total},
                    )
                    self._last_event = now
                session.execute(
                    update(Job)
                    .where(Job.id == self._job_id, Job.lease_owner == self._owner)
                    .values(
                        stage=stage,
                        progress_done=done,
                        progress_total=total,
                        progress_percent=percent,
                        updated_at=utcnow(),
                    )
                    .execution_options(synchronize_session=False)
                )
            self._last_write = now
        except Exception:
            # Progress is informational; a failed write must not fail the job.
            logger.exception("job %s: progress write failed at stage %s", self._job_id, stage)

    def close(self) -> None:
        """Record the duration of the stage that is still open, if any."""
        if self.stage is None:
            return
        with self._ctx.session() as session:
            self._close_stage(session, time.monotonic())
        self.stage = None

    def _close_stage(self, session: Any, now: float) -> None:
        if self.stage is None:
            return
        duration = round(now - self._stage_started, 3)
        lifecycle.append_event(
            session,
            self._job_id,
            "stage_finished",
            stage=self.stage,
            duration_s=duration,
            message=f"{self.stage} took {duration:.1f}s",
        )


@dataclass(frozen=True)
class ExecutionOutcome:
    """Outcome of one delivery: the status it left the job in (None when it did not run) and the reason."""

    status: str | None
    reason: str


def resolve_device(setting: str) -> str:
    """Turn the ``device`` setting into a torch device; ``auto`` picks CUDA when a GPU is visible to the process."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def execute_job(
    ctx: ServiceContext, job_id: str, owner: str, *, shutdown: threading.Event | None = None
) -> ExecutionOutcome:
    """Run ``job_id`` if its lease can be taken; otherwise return at once without touching it."""
    settings = ctx.settings
    with ctx.session() as session:
        claimed = lifecycle.claim(session, job_id, owner, settings.lease_ttl)
    if not claimed:
        with ctx.session() as session:
            row = session.execute(
                select(Job.status, Job.lease_owner).where(Job.id == job_id)
            ).first()
        state = f"status {row[0]}, lease held by {row[1]}" if row else "no such job"
        logger.info("job %s not claimed by %s (%s); skipping this delivery", job_id, owner, state)
        return ExecutionOutcome(None, "not_claimed")

    with ctx.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        session.expunge(job)
    logger.info(
        "job %s: attempt %d of %d started by %s", job_id, job.attempts, job.max_attempts, owner
    )

    keeper = LeaseKeeper(ctx, job_id, owner, shutdown)
    recorder = ProgressRecorder(ctx, job_id, owner)
    scratch = settings.resolved_work_dir / job_id / f"attempt-{job.attempts}-{uuid.uuid4().hex[:6]}"
    keeper.start()
    try:
        return _run_claimed(ctx, job, owner, keeper, recorder, scratch)
    finally:
        keeper.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            scratch.parent.rmdir()
        except OSError:
            pass  # another attempt's scratch directory is still there


def _run_claimed(
    ctx: ServiceContext,
    job: Job,
    owner: str,
    keeper: LeaseKeeper,
    recorder: ProgressRecorder,
    scratch: Path,
) -> ExecutionOutcome:
    from subclone.errors import Cancelled, SubcloneError

    try:
        result = _build_child(ctx, job, keeper, recorder, scratch)
        recorder.close()
        if keeper.lease_lost:
            return ExecutionOutcome(None, "lease_lost")
        if keeper.cancel_requested:
            return _finish(ctx, job, owner, CANCELLED, message="cancelled before publishing")
        if keeper.shutting_down:
            return _requeue_for_shutdown(ctx, job, owner)
        return _publish(ctx, job, owner, recorder, result)
    except Cancelled:
        recorder.close()
        if keeper.lease_lost:
            return ExecutionOutcome(None, "lease_lost")
        if keeper.cancel_requested:
            return _finish(
                ctx,
                job,
                owner,
                CANCELLED,
                message=f"cancelled during {recorder.stage or 'start-up'}",
            )
        if keeper.timed_out:
            return _fail(ctx, job, owner, _time_limit_error(ctx))
        return _requeue_for_shutdown(ctx, job, owner)
    except ServiceError as exc:
        # Request checks that pass at submission can fail later (a dataset deleted, a
        # parent removed from the registry); these are user errors.
        return _fail(ctx, job, owner, JobError(exc.code, exc.detail, exc.param))
    except SubcloneError as exc:
        from app.jobs.requests import request_field

        param = request_field(exc.param) if exc.param else None
        return _fail(ctx, job, owner, JobError(exc.code, exc.message, param))
    except StorageError as exc:
        logger.error("job %s: storage failed: %s", job.id, exc)
        return _retry_or_fail(
            ctx, job, owner, JobError("storage_error", f"artifact storage failed: {exc}")
        )
    except MemoryError:
        logger.exception("job %s: out of host memory", job.id)
        return _fail(
            ctx,
            job,
            owner,
            JobError(
                "out_of_memory",
                "the worker ran out of host memory; use a smaller calibration batch or a larger worker",
            ),
        )
    except Exception as exc:
        if _is_cuda_oom(exc):
            logger.error("job %s: out of GPU memory: %s", job.id, exc)
            return _fail(
                ctx,
                job,
                owner,
                JobError(
                    "out_of_memory",
                    "the worker ran out of GPU memory; use a smaller calibration batch_size or set max_memory",
                ),
            )
        if type(exc).__name__ == "SoftTimeLimitExceeded":
            return _fail(ctx, job, owner, _time_limit_error(ctx))
        logger.exception("job %s: unexpected error", job.id)
        return _fail(
            ctx,
            job,
            owner,
            JobError(
                "internal_error",
                "the worker failed unexpectedly; the operator's logs have the details",
            ),
        )


def _build_child(
    ctx: ServiceContext, job: Job, keeper: LeaseKeeper, recorder: ProgressRecorder, scratch: Path
) -> Any:
    from subclone.api import run_subclone

    settings = ctx.settings
    parent = ctx.registry.resolve(job.parent_name, job.parent_revision)
    source_path = _materialize_dataset(ctx, job, scratch)
    options = build_engine_options(
        job.options,
        job.calibration,
        source_path=source_path,
        device=resolve_device(settings.device),
        max_memory=settings.max_memory,
    )
    scores_cache = settings.resolved_scores_cache_dir
    scores_cache.mkdir(parents=True, exist_ok=True)
    return run_subclone(
        parent.location,
        build_target(job.target),
        scratch / "child",
        options,
        revision=parent.revision,
        progress=recorder,
        should_cancel=keeper.should_stop,
        scores_cache_dir=scores_cache,
        provenance={"job_id": job.id, "parent": parent.name, "revision": parent.revision or ""},
    )


def _materialize_dataset(ctx: ServiceContext, job: Job, scratch: Path) -> Path | None:
    source = job.calibration.get("source")
    if job.calibration.get("texts") is not None or not source or not source.startswith("ds_"):
        return None
    with ctx.session() as session:
        dataset = session.scalars(
            select(Dataset).where(Dataset.id == source, Dataset.tenant_id == job.tenant_id)
        ).first()
        if dataset is None:
            from app.core.errors import NotFound

            raise NotFound(
                f"calibration dataset {source!r} no longer exists", param="calibration.source"
            )
        return write_dataset_file(scratch / "data", dataset.id, dataset.format, dataset.content)


def _publish(
    ctx: ServiceContext, job: Job, owner: str, recorder: ProgressRecorder, result: Any
) -> ExecutionOutcome:
    recorder(_StageEvent("storing", 0, 1, "publishing artifacts"))
    # An earlier attempt may have published and then lost its lease before
    # recording success; publishing again starts from a clean slate.
    ctx.store.delete_job(job.id)
    files = ctx.store.publish(job.id, Path(result.out_dir))
    recorder(_StageEvent("storing", 1, 1, f"published {len(files)} files"))
    recorder.close()
    summary = _result_summary(result.manifest, files)
    outcome = _finish(
        ctx,
        job,
        owner,
        SUCCEEDED,
        values={
            "result": summary,
            "artifacts_published": True,
            "progress_percent": 100.0,
            "stage": None,
        },
    )
    if outcome.status is None:
        # The lease moved on while publishing; the next attempt publishes its own copy.
        logger.warning(
            "job %s: lease lost after publishing; removing this attempt's artifacts", job.id
        )
        ctx.store.delete_job(job.id)
    return outcome


@dataclass(frozen=True)
class _StageEvent:
    stage: str
    done: int
    total: int
    message: str = ""


def _result_summary(manifest: dict[str, Any], files: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "files": len(files),
        "total_bytes": sum(f.size for f in files),
    }
    for key in ("metrics", "quality", "child", "kept_layers", "parameters", "child_parameters"):
        if key in manifest:
            summary[key] = manifest[key]
    return summary


def _finish(
    ctx: ServiceContext,
    job: Job,
    owner: str,
    status: str,
    *,
    error: JobError | None = None,
    message: str = "",
    values: dict[str, Any] | None = None,
) -> ExecutionOutcome:
    with ctx.session() as session:
        moved = lifecycle.transition(
            session, job.id, status, owner=owner, error=error, message=message, values=values
        )
    if not moved:
        logger.warning(
            "job %s: could not record %s; another process changed the job first", job.id, status
        )
        return ExecutionOutcome(None, "lease_lost")
    _notify(ctx, job, status)
    return ExecutionOutcome(status, error.code if error else status)


def _fail(ctx: ServiceContext, job: Job, owner: str, error: JobError) -> ExecutionOutcome:
    logger.info("job %s failed: %s: %s", job.id, error.code, error.message)
    return _finish(ctx, job, owner, FAILED, error=error, message=error.message)


def _retry_or_fail(ctx: ServiceContext, job: Job, owner: str, error: JobError) -> ExecutionOutcome:
    if job.attempts >= job.max_attempts:
        return _fail(ctx, job, owner, error)
    delay = ctx.settings.retry_backoff * 2 ** (job.attempts - 1)
    # The table worker loop waits for available_at. A broker delivers the retry
    # after its countdown instead, and the row stays claimable at once, so a clock
    # difference between machines cannot make the retried delivery skip the job.
    available_at = (
        utcnow() + timedelta(seconds=delay) if ctx.dispatcher.name == "table" else utcnow()
    )
    with ctx.session() as session:
        moved = lifecycle.transition(
            session,
            job.id,
            QUEUED,
            owner=owner,
            values={"available_at": available_at, "dispatched_at": None, "stage": None},
            message=f"{error.message}; retrying in {delay:.0f}s",
            data={"error_code": error.code},
        )
    if not moved:
        return ExecutionOutcome(None, "lease_lost")
    logger.warning("job %s: %s; retrying in %.0fs", job.id, error.code, delay)
    ctx.dispatcher.dispatch(job.id, delay=delay)
    return ExecutionOutcome(QUEUED, error.code)


def _requeue_for_shutdown(ctx: ServiceContext, job: Job, owner: str) -> ExecutionOutcome:
    # A deliberate shutdown is not the job's fault, so the attempt is given back.
    with ctx.session() as session:
        moved = lifecycle.transition(
            session,
            job.id,
            QUEUED,
            owner=owner,
            values={"attempts": Job.attempts - 1, "dispatched_at": None, "stage": None},
            message="worker shut down; job requeued",
        )
    if moved:
        ctx.dispatcher.dispatch(job.id)
        return ExecutionOutcome(QUEUED, "shutdown")
    return ExecutionOutcome(None, "lease_lost")


def _notify(ctx: ServiceContext, job: Job, status: str) -> None:
    if not job.webhook_url or status not in lifecycle.TERMINAL:
        return
    try:
        ctx.dispatcher.send_webhook(job.id, f"job.{status}")
    except Exception:
        logger.exception("job %s: could not schedule the job.%s webhook", job.id, status)


def _time_limit_error(ctx: ServiceContext) -> JobError:
    return JobError(
        "time_limit_exceeded",
        f"the job ran longer than the server's limit of {ctx.settings.job_soft_time_limit}s; use a smaller calibration",
    )


def _is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
