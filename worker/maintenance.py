"""Reconciler and artifact cleanup, run by Celery beat or by the embedded worker loop."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from app import idempotency
from app.context import ServiceContext
from app.db.models import Job, utcnow
from app.jobs import lifecycle

logger = logging.getLogger(__name__)


def reconcile_jobs(ctx: ServiceContext) -> lifecycle.ReconcileReport:
    """Requeue or finish jobs whose worker stopped renewing its lease, and send requeued jobs out again."""
    with ctx.session() as session:
        report = lifecycle.reconcile(
            session, redispatch_after=max(60.0, ctx.settings.reconcile_interval)
        )
        webhooks = {
            job_id: url
            for job_id, url in session.execute(
                select(Job.id, Job.webhook_url).where(Job.id.in_(report.failed + report.cancelled))
            ).all()
        }
    for job_id in report.requeued + (report.redispatch if ctx.dispatcher.name != "table" else []):
        try:
            ctx.dispatcher.dispatch(job_id)
        except Exception:
            # The job stays queued with dispatched_at unset, so the next pass sends it again.
            logger.exception("job %s: could not dispatch; the next reconciler pass retries", job_id)
    for job_id in report.failed:
        if webhooks.get(job_id):
            ctx.dispatcher.send_webhook(job_id, "job.failed")
    for job_id in report.cancelled:
        if webhooks.get(job_id):
            ctx.dispatcher.send_webhook(job_id, "job.cancelled")
    if report.requeued or report.failed or report.cancelled:
        logger.warning(
            "reconciler: requeued %s, failed %s, cancelled %s",
            report.requeued,
            report.failed,
            report.cancelled,
        )
    return report


def cleanup_artifacts(ctx: ServiceContext, now: datetime | None = None) -> int:
    """Delete artifacts of jobs that finished before the retention cutoff; return how many jobs were cleaned.

    Expired Idempotency-Keys are purged in the same pass.
    """
    with ctx.session() as session:
        purged = idempotency.purge_expired(session)
    if purged:
        logger.info("cleanup: purged %d expired idempotency keys", purged)
    retention = ctx.settings.storage.retention_days
    if retention is None:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention)
    with ctx.session() as session:
        expired = list(
            session.scalars(
                select(Job.id).where(
                    Job.artifacts_published.is_(True),
                    Job.artifacts_deleted_at.is_(None),
                    Job.finished_at < cutoff,
                )
            ).all()
        )
    cleaned = 0
    for job_id in expired:
        try:
            ctx.store.delete_job(job_id)
        except Exception:
            logger.exception("job %s: could not delete expired artifacts", job_id)
            continue
        with ctx.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(artifacts_deleted_at=utcnow(), updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            lifecycle.append_event(
                session,
                job_id,
                "artifacts_deleted",
                message=f"artifacts older than {retention} days deleted",
            )
        cleaned += 1
    # Leftovers of interrupted publishes, and artifacts of jobs the table no longer has.
    ctx.store.delete_older_than(cutoff)
    if cleaned:
        logger.info(
            "cleanup: deleted artifacts of %d jobs finished before %s", cleaned, cutoff.isoformat()
        )
    return cleaned
