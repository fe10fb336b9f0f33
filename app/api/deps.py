"""Request dependencies: the service context, a database session and the caller's tenant."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.core.errors import Unauthorized
from app.core.security import hash_api_key
from app.db.models import ApiKey
from app.db.session import session_factory

logger = logging.getLogger(__name__)

LOCAL_TENANT_ID = "ten_local"


def get_context(request: Request) -> ServiceContext:
    return request.app.state.context


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    session = session_factory(ctx.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant_id(request: Request, ctx: ContextDep, session: SessionDep) -> str:
    """Return the tenant of the request's bearer API key; every lookup of tenant data filters by it."""
    header = request.headers.get("authorization")
    if header is None:
        if ctx.settings.auth_disabled:
            return LOCAL_TENANT_ID
        raise Unauthorized("missing API key; send 'Authorization: Bearer <key>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed Authorization header; send 'Authorization: Bearer <key>'")
    tenant_id = session.scalar(
        select(ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_api_key(token), ApiKey.revoked_at.is_(None)
        )
    )
    if tenant_id is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant_id


TenantDep = Annotated[str, Depends(get_tenant_id)]
