"""The parent registry."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from app.api.deps import ContextDep, TenantDep
from app.api.routes.jobs import PROBLEMS
from app.api.schemas import ParentList, ParentPublic

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/parents", tags=["parents"])


@router.get("", response_model=ParentList, responses=PROBLEMS)
def list_parents(ctx: ContextDep, tenant_id: TenantDep) -> dict[str, Any]:
    """List the parents jobs may name, with model_type, layers, widths, heads and parameter count."""
    data = []
    for name in ctx.registry.names():
        try:
            data.append(ctx.registry.summary(name))
        except (OSError, ValueError, KeyError) as exc:
            logger.error("parent %s could not be read: %s", name, exc)
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{name}", response_model=ParentPublic, responses=PROBLEMS)
def read_parent(name: str, ctx: ContextDep, tenant_id: TenantDep) -> dict[str, Any]:
    """Return one parent's architecture summary."""
    return ctx.registry.summary(name)
