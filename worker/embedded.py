"""Embedded worker: a process that claims queued jobs from the job table and runs them one at a time.

It uses the same lease, heartbeat and reconciler as the Celery workers, so a
job survives ``kill -9`` of this process. Its lease expires, and the next
reconciler pass requeues it, or fails it with ``worker_lost`` once its
attempts are used up. That pass runs in the restarted worker process or in the
restarted service.
The process exits when its parent (the API process) goes away, and after
``worker_max_tasks_per_child`` jobs so that the supervisor starts a fresh one
and the memory of finished jobs is returned to the system.

Run by :mod:`app.embedded`; by hand: ``python -m worker.embedded``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from app.context import ServiceContext, TableDispatcher, build_context
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.db.migrate import upgrade_database
from app.jobs import lifecycle
from worker.execute import execute_job, worker_identity
from worker.maintenance import cleanup_artifacts, reconcile_jobs

logger = logging.getLogger(__name__)

CLEANUP_INTERVAL_S = 3600.0
# Five delivery attempts of at most 10 s each with short backoff take about 65 s;
# only a receiver's Retry-After makes a delivery longer. A worker that exits after
# its job limit waits this long for deliveries in flight. When the supervisor
# stops the service it kills the worker after its own, shorter timeout.
WEBHOOK_DRAIN_S = 150.0


class EmbeddedWorker:
    """The claim-run loop, with periodic reconciler and cleanup passes between jobs."""

    def __init__(
        self, ctx: ServiceContext, *, poll_interval: float = 1.0, parent_pid: int | None = None
    ) -> None:
        self.ctx = ctx
        self.poll_interval = poll_interval
        self.parent_pid = parent_pid
        self.shutdown = threading.Event()
        self._next_reconcile = 0.0
        self._next_cleanup = 0.0

    def run(self) -> int:
        """Process jobs until shutdown, a lost parent, or the per-process job limit; return how many ran."""
        limit = self.ctx.settings.worker_max_tasks_per_child
        ran = 0
        logger.info("embedded worker %d started (max %d jobs per process)", os.getpid(), limit)
        while not self.shutdown.is_set():
            if self._parent_gone():
                logger.warning("embedded worker %d: parent process exited; stopping", os.getpid())
                break
            self._maintain()
            with self.ctx.session() as session:
                job_id = lifecycle.next_claimable_job(session)
            if job_id is None:
                self.shutdown.wait(self.poll_interval)
                continue
            outcome = execute_job(self.ctx, job_id, worker_identity(), shutdown=self.shutdown)
            if outcome.status is not None:
                ran += 1
                logger.info("job %s ended %s (%s)", job_id, outcome.status, outcome.reason)
            if ran >= limit:
                logger.info(
                    "embedded worker %d ran %d jobs; exiting so a fresh process takes over",
                    os.getpid(),
                    ran,
                )
                break
        return ran

    def _maintain(self) -> None:
        now = time.monotonic()
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.ctx.settings.reconcile_interval
            try:
                reconcile_jobs(self.ctx)
            except Exception:
                logger.exception(
                    "reconciler pass failed; retrying in %.0fs",
                    self.ctx.settings.reconcile_interval,
                )
        if now >= self._next_cleanup:
            self._next_cleanup = now + CLEANUP_INTERVAL_S
            try:
                cleanup_artifacts(self.ctx)
            except Exception:
                logger.exception("artifact cleanup failed; retrying in %.0fs", CLEANUP_INTERVAL_S)

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the embedded job-table worker (started by the embedded service)."
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="Exit when this process is no longer the parent.",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="Seconds between polls of an empty queue."
    )
    args = parser.parse_args(argv)

    settings: Settings = get_settings()
    configure_logging(settings.log_level)
    upgrade_database(settings.resolved_database_url)
    ctx = build_context(settings)
    ctx.store.prepare()
    worker = EmbeddedWorker(ctx, poll_interval=args.poll_interval, parent_pid=args.parent_pid)

    def _request_shutdown(signum: int, frame: object) -> None:
        logger.info(
            "embedded worker %d: signal %d received; requeueing the running job and stopping",
            os.getpid(),
            signum,
        )
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, _request_shutdown)
    signal.signal(signal.SIGINT, _request_shutdown)
    worker.run()
    if isinstance(ctx.dispatcher, TableDispatcher):
        ctx.dispatcher.drain(WEBHOOK_DRAIN_S)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
