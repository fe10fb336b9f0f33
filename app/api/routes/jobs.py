"""Jobs: submit, list, read, cancel, and read the event log."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import idempotency
from app.api.deps import ContextDep, SessionDep, TenantDep
from app.api.pagination import cursor_page
from app.api.schemas import EventList, JobCreate, JobList, JobPublic, Problem
from app.core.errors import InvalidTransition, ValidationFailed
from app.db.models import Job, JobEvent, JobMetadata
from app.jobs import lifecycle
from app.jobs.service import create_job, event_public, get_job, job_public, validate_request
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or invalid API key."},
    404: {"model": Problem, "description": "No such job for this tenant."},
    422: {"model": Problem, "description": "Invalid request; errors[] names each field."},
}

_METADATA_FILTER = re.compile(r"^metadata\[(?P<key>[^\]]{1,64})\]$")


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        **PROBLEMS,
        409: {"model": Problem, "description": "Same Idempotency-Key still in progress."},
    },
)
def submit_job(
    body: JobCreate,
    ctx: ContextDep,
    session: SessionDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Validate a subcloning request against its parent and queue it.

    With an Idempotency-Key header, a retry with the same body returns the first
    response, a retry with a different body gets 422, and a retry while the first
    request is still being handled gets 409.
    """
    if idempotency_key is not None:
        idempotency.validate_key(idempotency_key)
        digest = idempotency.request_hash("POST", "/v1/jobs", body.model_dump(mode="json"))
        stored = idempotency.begin(
            session, tenant_id, idempotency_key, digest, ctx.settings.idempotency_ttl
        )
        if stored is not None:
            return JSONResponse(
                stored.body,
                status_code=stored.status,
                headers={
                    "Idempotent-Replayed": "true",
                    "Location": f"/v1/jobs/{stored.body.get('id')}",
                },
            )

    try:
        validated = validate_request(ctx, session, tenant_id, body)
        job = create_job(ctx, session, tenant_id, body, validated)
        public = job_public(job)
        if idempotency_key is not None:
            idempotency.complete(session, tenant_id, idempotency_key, 202, public)
        session.commit()
    except BaseException:
        session.rollback()
        if idempotency_key is not None:
            idempotency.abandon(session, tenant_id, idempotency_key)
        raise

    logger.info("job %s accepted for tenant %s (parent %s)", job.id, tenant_id, job.parent_name)
    try:
        ctx.dispatcher.dispatch(job.id)
    except Exception:
        # The job is stored as queued; the reconciler sends jobs that were never dispatched.
        logger.exception("job %s: dispatch failed; the reconciler will send it again", job.id)
    return JSONResponse(public, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", response_model=JobList, responses=PROBLEMS)
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    after: Annotated[
        str | None, Query(description="Return jobs created before this job id (the cursor).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    status: Annotated[
        str | None,
        Query(
            description="Only jobs in this status.",
            pattern="^(queued|running|succeeded|failed|cancelling|cancelled)$",
        ),
    ] = None,
) -> dict[str, Any]:
    """List the tenant's jobs, newest first. Filter by status and by metadata with ``metadata[key]=value``."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    filters = _metadata_filters(request)
    for key, value in filters.items():
        query = query.where(
            Job.id.in_(
                select(JobMetadata.job_id).where(JobMetadata.key == key, JobMetadata.value == value)
            )
        )
    return cursor_page(session, query, Job, tenant_id=tenant_id, after=after, limit=limit, kind="job", render=job_public)


@router.get("/{job_id}", response_model=JobPublic, responses=PROBLEMS)
def read_job(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict[str, Any]:
    """Return one job with its status, stage, progress and error."""
    return job_public(get_job(session, tenant_id, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={**PROBLEMS, 409: {"model": Problem, "description": "The job already finished."}},
)
def cancel_job(
    job_id: str, ctx: ContextDep, session: SessionDep, tenant_id: TenantDep
) -> dict[str, Any]:
    """Cancel a job: a queued job is cancelled at once, a running one stops at the worker's next check."""
    job = get_job(session, tenant_id, job_id)
    if lifecycle.is_terminal(job.status):
        raise InvalidTransition(
            f"job {job_id} already {job.status}; only queued or running jobs can be cancelled"
        )
    accepted = lifecycle.request_cancel(session, job)
    session.commit()
    session.expire_all()
    job = get_job(session, tenant_id, job_id)
    if not accepted:
        raise InvalidTransition(
            f"job {job_id} already {job.status}; only queued or running jobs can be cancelled"
        )
    if job.status == lifecycle.CANCELLED and job.webhook_url:
        ctx.dispatcher.send_webhook(job.id, "job.cancelled")
    logger.info("job %s: cancel requested by tenant %s; status %s", job_id, tenant_id, job.status)
    return job_public(job)


@router.get("/{job_id}/events", response_model=EventList, responses=PROBLEMS)
def list_events(
    job_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    after: Annotated[
        str | None, Query(description="Return events after this event id (the cursor).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
) -> dict[str, Any]:
    """Return the job's event log, oldest first: status changes, stage starts and ends, progress."""
    get_job(session, tenant_id, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        cursor = session.scalar(
            select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job_id)
        )
        if cursor is None:
            raise ValidationFailed(
                f"cursor {after!r} is not an event of job {job_id}",
                errors=[FieldError("after", after, "unknown event id")],
            )
        query = query.where(JobEvent.seq > cursor)
    rows = list(session.scalars(query.order_by(JobEvent.seq).limit(limit + 1)).all())
    return {
        "object": "list",
        "data": [event_public(e) for e in rows[:limit]],
        "has_more": len(rows) > limit,
    }


def _metadata_filters(request: Request) -> dict[str, str]:
    filters: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        match = _METADATA_FILTER.match(name)
        if match:
            filters[match.group("key")] = value
        elif name.startswith("metadata"):
            raise ValidationFailed(
                f"query parameter {name!r} is not a metadata filter; use metadata[key]=value",
                errors=[
                    FieldError(
                        name, value, "malformed metadata filter", allowed="metadata[key]=value"
                    )
                ],
            )
    return filters
