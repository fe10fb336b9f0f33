"""Dry runs: what a request would build, with nothing queued."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ContextDep, SessionDep, TenantDep
from app.api.routes.jobs import PROBLEMS
from app.api.schemas import JobCreate, PlanPublic
from app.jobs.service import plan_public, validate_request

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", response_model=PlanPublic, responses=PROBLEMS)
def create_plan(
    body: JobCreate, ctx: ContextDep, session: SessionDep, tenant_id: TenantDep
) -> dict[str, Any]:
    """Validate a job request and return the child's shape, parameter count and memory estimate; queue nothing.

    Takes the same body as POST /v1/jobs, so a client can dry-run the exact request it will submit.
    """
    return plan_public(validate_request(ctx, session, tenant_id, body))
