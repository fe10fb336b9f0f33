"""Idempotency-Key handling for POST requests.

The first request with a key inserts a row marked in progress and commits it,
so a concurrent retry finds the row and gets 409. The handler's response is
stored on the row in the same transaction that creates the job. A retry with
the same key and the same request hash replays the stored response; with a
different hash it gets 422. A request that fails deletes its row, so the
client can retry with the same key. Keys expire after ``idempotency_ttl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import IdempotencyInProgress, IdempotencyMismatch, ValidationFailed
from app.db.models import IdempotencyRecord, utcnow
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def request_hash(method: str, path: str, body: Any) -> str:
    """Hash a request by method, path and canonical JSON body, so key order and spacing do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
            errors=[FieldError("Idempotency-Key", key[:64], "invalid header value")],
        )
    return key


def begin(
    session: Session, tenant_id: str, key: str, digest: str, ttl: float
) -> StoredResponse | None:
    """Reserve ``key`` for this request, or return the stored response of an earlier identical one.

    Raises IdempotencyInProgress while the first request is still running and
    IdempotencyMismatch when the key was used with a different request.
    Commits the session.
    """
    now = utcnow()
    existing = session.get(IdempotencyRecord, (tenant_id, key))
    if existing is not None and existing.expires_at <= now:
        session.delete(existing)
        session.commit()
        existing = None
    if existing is None:
        session.add(
            IdempotencyRecord(
                tenant_id=tenant_id,
                key=key,
                request_hash=digest,
                completed=False,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
        )
        try:
            session.commit()
            return None
        except IntegrityError:
            # Another request inserted the same key between our read and our insert.
            session.rollback()
            existing = session.get(IdempotencyRecord, (tenant_id, key))
            if existing is None:
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is being handled; retry later"
                ) from None
    if existing.request_hash != digest:
        raise IdempotencyMismatch(
            "this Idempotency-Key was already used with a different request body; use a new key for a new request"
        )
    if not existing.completed or existing.response_status is None or existing.response_body is None:
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still being handled; retry later"
        )
    return StoredResponse(existing.response_status, existing.response_body)


def complete(session: Session, tenant_id: str, key: str, status: int, body: dict[str, Any]) -> None:
    """Store the response on the reserved key, in the caller's transaction."""
    record = session.get(IdempotencyRecord, (tenant_id, key))
    if record is None:
        # Purged while the request ran, so a retry with this key runs the request again.
        logger.warning("idempotency key of tenant %s was purged while its request ran", tenant_id)
        return
    record.completed = True
    record.response_status = status
    record.response_body = body


def abandon(session: Session, tenant_id: str, key: str) -> None:
    """Release a reserved key after the request failed, so the client may retry with it."""
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.tenant_id == tenant_id,
            IdempotencyRecord.key == key,
            IdempotencyRecord.completed.is_(False),
        )
    )
    session.commit()


def purge_expired(session: Session) -> int:
    result = session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
