"""Opaque, prefixed object ids such as ``job_`` followed by 26 base32 characters."""

from __future__ import annotations

import base64
import re
import secrets

ID_BODY_LENGTH = 26  # 130 random bits in lowercase base32

_ID_PATTERN = re.compile(r"^[a-z]+_[a-z2-7]{26}$")


def new_id(prefix: str) -> str:
    """Return a fresh id such as ``job_q3...``; the random part is not derived from time or a counter."""
    body = base64.b32encode(secrets.token_bytes(17)).decode("ascii").lower()[:ID_BODY_LENGTH]
    return f"{prefix}_{body}"


def looks_like_id(value: str, prefix: str) -> bool:
    """Tell whether ``value`` has the shape of an id with ``prefix`` (it may still not exist)."""
    return value.startswith(prefix + "_") and bool(_ID_PATTERN.match(value))
