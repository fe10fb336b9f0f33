"""Tenants and their API keys: creation for the management CLI and the embedded mode."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.ids import new_id
from app.core.security import generate_api_key, hash_api_key
from app.db.models import ApiKey, Tenant, utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssuedKey:
    """A newly created key: ``secret`` is shown once and only its sha256 is stored."""

    key_id: str
    tenant_id: str
    secret: str


def ensure_tenant(session: Session, name: str, *, tenant_id: str | None = None) -> Tenant:
    """Return the tenant called ``name``, creating it first if needed."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        now = utcnow()
        tenant = Tenant(id=tenant_id or new_id("ten"), name=name, created_at=now, updated_at=now)
        session.add(tenant)
        session.flush()
        logger.info("tenant %s created (%s)", name, tenant.id)
    return tenant


def issue_key(session: Session, tenant_id: str, *, name: str = "") -> IssuedKey:
    """Create an API key for an existing tenant."""
    if session.get(Tenant, tenant_id) is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    secret = generate_api_key()
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        key_hash=hash_api_key(secret),
        display_prefix=secret[:10],
        name=name,
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    logger.info("API key %s issued for tenant %s", key.id, tenant_id)
    return IssuedKey(key_id=key.id, tenant_id=tenant_id, secret=secret)


def revoke_key(session: Session, key_id: str) -> None:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id!r} not found")
    key.revoked_at = key.revoked_at or utcnow()
    logger.info("API key %s revoked", key_id)
