"""API keys: generation and the sha256 digest that is the only form stored."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk_"


def generate_api_key() -> str:
    """Return a new random API key; it is shown once and never stored in clear."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Return the hex sha256 of ``key``, the value kept in the database."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
