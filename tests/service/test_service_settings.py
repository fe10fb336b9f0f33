"""Settings validators that reject unsafe or inconsistent configurations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import Settings
from app.embedded import settings_to_env


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth_disabled": True, "host": "0.0.0.0"}, "loopback"),
        ({"auth_disabled": True, "host": "192.168.1.4"}, "loopback"),
        ({"auth_disabled": True, "embedded": False}, "embedded mode"),
        (
            {"job_time_limit": 3600, "broker_visibility_timeout": 3600, "job_soft_time_limit": 600},
            "visibility_timeout",
        ),
        ({"job_soft_time_limit": 7200, "job_time_limit": 3600}, "job_soft_time_limit"),
        ({"heartbeat_interval": 60, "lease_ttl": 90}, "heartbeat_interval"),
        ({"log_level": "LOUD"}, "log level"),
        ({"parents": {"a/b": "/tmp"}}, "parent name"),
    ],
)
def test_unsafe_settings_rejected(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_auth_disabled_on_loopback_allowed(host: str) -> None:
    assert Settings(auth_disabled=True, host=host).auth_disabled


def test_local_artifacts_follow_state_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert settings.storage.local_root == tmp_path / "artifacts"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'subclone.db'}"


def test_settings_round_trip_through_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Settings(
        state_dir=tmp_path,
        lease_ttl=7,
        heartbeat_interval=2,
        parents={"mini": str(tmp_path)},
        webhook_allowlist=["10.0.0.0/8"],
        storage={"backend": "s3", "s3_bucket": "b", "s3_access_key": "ak", "s3_secret_key": "sk"},
    )
    for name, value in settings_to_env(original).items():
        monkeypatch.setenv(name, value)
    copy = Settings()
    assert copy.lease_ttl == 7
    assert copy.parents == {"mini": str(tmp_path)}
    assert copy.webhook_allowlist == ["10.0.0.0/8"]
    assert copy.storage.backend == "s3"
    assert copy.storage.s3_secret_key is not None
    assert copy.storage.s3_secret_key.get_secret_value() == "sk"
