"""Storage settings and the factory that builds a store from them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from app.storage.base import ArtifactStore
from app.storage.local import LocalArtifactStore
from app.storage.s3 import MAX_PRESIGN_EXPIRY_S, S3ArtifactStore


class StorageSettings(BaseModel):
    """Artifact storage options, meant to be embedded in the service's settings class.

    Embedded as a field ``storage`` of a pydantic-settings class with prefix
    ``SUBCLONE_`` and ``env_nested_delimiter="__"``, the variables read
    ``SUBCLONE_STORAGE__BACKEND``, ``SUBCLONE_STORAGE__S3_BUCKET`` and so on.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "s3"] = Field(
        default="local", description="Which artifact store to use."
    )
    local_root: Path = Field(
        default=Path("var/artifacts"),
        description="Root directory of the local store; staging lives inside it.",
    )
    s3_bucket: str | None = Field(
        default=None, description="Bucket name; required when backend is s3."
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint the service uses, for example http://seaweedfs:8333; unset for AWS.",
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint written into presigned URLs when clients reach the bucket by another host.",
    )
    s3_region: str = Field(default="us-east-1", description="Region used for request signing.")
    s3_access_key: SecretStr | None = Field(
        default=None, description="Access key id; unset uses boto3's default credential chain."
    )
    s3_secret_key: SecretStr | None = Field(default=None, description="Secret access key.")
    s3_prefix: str = Field(
        default="", description="Key prefix for every object this service writes."
    )
    s3_create_bucket: bool = Field(
        default=False, description="Let prepare() create the bucket if it does not exist."
    )
    presign_expiry_s: int = Field(
        default=300,
        ge=1,
        le=MAX_PRESIGN_EXPIRY_S,
        description="Lifetime of presigned download URLs, in seconds.",
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete artifacts published this many days ago; unset keeps them forever.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> StorageSettings:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("s3_bucket is required when backend is 's3'")
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("set both s3_access_key and s3_secret_key, or neither")
        return self

    def retention_cutoff(self, now: datetime | None = None) -> datetime | None:
        """Return the publication time before which artifacts expire, or None when retention is off."""
        if self.retention_days is None:
            return None
        return (now or datetime.now(UTC)) - timedelta(days=self.retention_days)


def build_store(
    settings: StorageSettings | Mapping[str, Any] | Any = None, **fields: Any
) -> ArtifactStore:
    """Build the artifact store that ``settings`` selects.

    ``settings`` may be a StorageSettings, a mapping of its fields, or an object
    whose ``storage`` attribute is a StorageSettings (the service's settings).
    Keyword arguments override single fields, so ``build_store(backend="local",
    local_root=tmp)`` works without a settings object. Creates nothing and
    contacts no server; call ``prepare()`` and ``check()`` on the result for that.
    """
    resolved = _coerce_settings(settings, fields)
    if resolved.backend == "local":
        return LocalArtifactStore(resolved.local_root)

    assert resolved.s3_bucket is not None  # enforced by the model validator
    return S3ArtifactStore(
        bucket=resolved.s3_bucket,
        endpoint_url=resolved.s3_endpoint_url,
        region=resolved.s3_region,
        access_key=_secret(resolved.s3_access_key),
        secret_key=_secret(resolved.s3_secret_key),
        prefix=resolved.s3_prefix,
        presign_expiry=resolved.presign_expiry_s,
        public_endpoint_url=resolved.s3_public_endpoint_url,
        create_bucket=resolved.s3_create_bucket,
    )


def _coerce_settings(settings: Any, overrides: dict[str, Any]) -> StorageSettings:
    if settings is None:
        base = StorageSettings()
    elif isinstance(settings, StorageSettings):
        base = settings
    elif isinstance(settings, Mapping):
        base = StorageSettings.model_validate(dict(settings))
    elif isinstance(getattr(settings, "storage", None), StorageSettings):
        base = settings.storage
    else:
        raise TypeError(
            f"cannot build an artifact store from {type(settings).__name__}: expected StorageSettings, "
            "a mapping of its fields, or an object with a 'storage' attribute holding one"
        )
    if not overrides:
        return base
    return StorageSettings.model_validate({**base.model_dump(), **overrides})


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
