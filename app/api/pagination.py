"""Cursor pagination shared by the list routes: newest first, ``after`` is an object id."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.core.errors import ValidationFailed
from subclone.errors import FieldError


def cursor_page(
    session: Session,
    query: Select[Any],
    model: Any,
    *,
    tenant_id: str,
    after: str | None,
    limit: int,
    kind: str,
    render: Callable[[Any], Any],
) -> dict[str, Any]:
    """Return one page of ``query`` (rows of ``model``) older than the ``after`` object, as a list object."""
    if after is not None:
        cursor = session.scalar(select(model.seq).where(model.id == after, model.tenant_id == tenant_id))
        if cursor is None:
            raise ValidationFailed(
                f"cursor {after!r} is not a {kind} of this tenant",
                errors=[FieldError("after", after, f"unknown {kind} id")],
            )
        query = query.where(model.seq < cursor)
    rows = list(session.scalars(query.order_by(model.seq.desc()).limit(limit + 1)).all())
    return {
        "object": "list",
        "data": [render(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }
