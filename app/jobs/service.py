"""Job operations behind the routes: validate a request against its parent, create, find and render jobs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.schemas import JobCreate, PlanCreate
from app.context import ServiceContext
from app.core.errors import NotFound, ValidationFailed, from_engine_error
from app.core.ids import new_id
from app.db.models import Dataset, Job, JobEvent, JobMetadata, utcnow
from app.jobs import lifecycle
from app.jobs.lifecycle import as_utc
from app.jobs.requests import build_engine_options, check_service_bounds, request_field
from app.parents import ParentRef
from subclone.errors import FieldError, SubcloneError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidatedRequest:
    parent: ParentRef
    plan: dict[str, Any]


def validate_request(
    ctx: ServiceContext, session: Session, tenant_id: str, body: PlanCreate
) -> ValidatedRequest:
    """Check a request against the server's limits and the parent's config; raise ValidationFailed naming fields.

    Calls the engine's config-only planner, so a target that does not fit the
    parent is rejected here rather than after the job waited in the queue.
    """
    parent = ctx.registry.resolve(body.parent, body.revision)
    calibration = body.calibration.model_dump()
    check_service_bounds(ctx.settings, calibration)
    source = calibration.get("source")
    if calibration.get("texts") is None and source and source.startswith("ds_"):
        exists = session.scalar(
            select(Dataset.id).where(Dataset.id == source, Dataset.tenant_id == tenant_id)
        )
        if exists is None:
            raise ValidationFailed(
                f"calibration dataset {source!r} not found; upload one with POST /v1/datasets",
                errors=[FieldError("calibration.source", source, "unknown dataset id")],
            )
    if isinstance(body, JobCreate) and body.webhook_url is not None:
        from app.notify import check_webhook_url

        check_webhook_url(ctx.settings, body.webhook_url)

    options = build_engine_options(body.options.model_dump(), calibration)
    from subclone.api import plan_subclone

    try:
        report = plan_subclone(parent.location, body.target, options, revision=parent.revision)
    except SubcloneError as exc:
        raise from_engine_error(exc, rename=request_field) from None
    return ValidatedRequest(parent=parent, plan=report.as_dict())


def plan_public(validated: ValidatedRequest) -> dict[str, Any]:
    plan = validated.plan
    return {
        "object": "plan",
        "parent": validated.parent.name,
        "revision": validated.parent.revision,
        "parent_shape": plan.get("parent", {}),
        "child_shape": plan.get("child", {}),
        "parent_parameters": plan.get("parent_parameters", 0),
        "child_parameters": plan.get("child_parameters", 0),
        "child_bytes": plan.get("child_bytes", 0),
        "memory_estimate": plan.get("memory_estimate", {}),
        "kept_layers": plan.get("kept_layers"),
        "child_config": plan.get("child_config", {}),
    }


def create_job(
    ctx: ServiceContext,
    session: Session,
    tenant_id: str,
    body: JobCreate,
    validated: ValidatedRequest,
) -> Job:
    """Add a queued job with its metadata rows and first event to the session (not committed)."""
    now = utcnow()
    plan = {key: value for key, value in validated.plan.items() if key != "child_config"}
    calibration = body.calibration.model_dump(mode="json")
    if calibration.get("texts") is not None:
        calibration["source"] = (
            None  # inline texts take precedence, so the default source is not used
        )
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        status=lifecycle.QUEUED,
        stage=None,
        progress_done=0,
        progress_total=0,
        progress_percent=0.0,
        parent_name=validated.parent.name,
        parent_revision=validated.parent.revision,
        target=body.target.model_dump(),
        options=body.options.model_dump(mode="json"),
        calibration=calibration,
        job_metadata=dict(body.metadata),
        webhook_url=body.webhook_url,
        plan=plan,
        attempts=0,
        max_attempts=ctx.settings.max_attempts,
        available_at=now,
        artifacts_published=False,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    for key, value in body.metadata.items():
        session.add(JobMetadata(job_id=job.id, key=key, value=value))
    lifecycle.append_event(
        session, job.id, "status", status=lifecycle.QUEUED, message="job accepted"
    )
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """Return the tenant's job; another tenant's id is reported as not found, like an unknown one."""
    job = session.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).first()
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job


def job_public(job: Job) -> dict[str, Any]:
    error = None
    if job.error_code:
        error = {
            "code": job.error_code,
            "message": job.error_message or "",
            "param": job.error_param,
        }
    return {
        "object": "job",
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": {
            "percent": round(float(job.progress_percent or 0.0), 2),
            "done": job.progress_done or 0,
            "total": job.progress_total or 0,
        },
        "parent": job.parent_name,
        "revision": job.parent_revision,
        "target": job.target,
        "options": job.options,
        "calibration": job.calibration,
        "metadata": job.job_metadata or {},
        "webhook_url": job.webhook_url,
        "plan": job.plan,
        "result": job.result,
        "error": error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": as_utc(job.created_at),
        "updated_at": as_utc(job.updated_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
    }


def event_public(event: JobEvent) -> dict[str, Any]:
    return {
        "object": "job.event",
        "id": event.id,
        "job_id": event.job_id,
        "created_at": as_utc(event.created_at),
        "type": event.type,
        "status": event.status,
        "stage": event.stage,
        "message": event.message,
        "percent": event.percent,
        "duration_s": event.duration_s,
        "data": event.data,
    }
