"""Fixtures for the service tests: real PostgreSQL and Redis, test data, and an in-process API client.

PostgreSQL and Redis on 127.0.0.1 are started if they are down. Each test run
gets its own PostgreSQL database (``subclone_test_<random>``, dropped at the
end) and its own Redis database number and key prefix. Every other file goes
into pytest's temporary directories.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import (
    REPO,
    ApiHarness,
    RedisBroker,
    WebhookReceiver,
    make_settings,
    run_webhook_receiver,
)

from app.db.session import session_scope
from app.main import create_app
from app.tenants import ensure_tenant, issue_key

SERVICE_START_TIMEOUT_S = 30.0


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_for_port(port: int, name: str) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _port_open(port):
            return
        time.sleep(0.25)
    pytest.fail(
        f"{name} did not start listening on 127.0.0.1:{port} within {SERVICE_START_TIMEOUT_S}s"
    )


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """URL of the local PostgreSQL server's maintenance database, starting the server if it is down."""
    if not _port_open(5432):
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        if not versions:
            pytest.fail(
                "PostgreSQL is not running on 127.0.0.1:5432 and no cluster is installed in /etc/postgresql"
            )
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            check=True,
        )
        _wait_for_port(5432, "PostgreSQL")
    import psycopg

    for user in ("postgres", "root"):
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port=5432 user={user} dbname=postgres", connect_timeout=5
            ):
                return f"postgresql+psycopg://{user}@127.0.0.1:5432/postgres"
        except psycopg.OperationalError:
            continue
    pytest.fail("cannot connect to PostgreSQL on 127.0.0.1:5432 as user postgres or root")


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for this test run, dropped afterwards."""
    import psycopg

    name = f"subclone_test_{secrets.token_hex(6)}"
    user = postgres_admin_url.split("//", 1)[1].split("@", 1)[0]
    conninfo = f"host=127.0.0.1 port=5432 user={user} dbname=postgres"
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}"
    from app.db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[RedisBroker]:
    """A Redis database number and key prefix of this run's own, starting Redis if it is down."""
    if not _port_open(6379):
        Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
        Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "-::1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                "/var/lib/redis",
                "--logfile",
                "/var/log/redis/ci.log",
            ],
            check=True,
        )
        _wait_for_port(6379, "Redis")
    import redis

    database = secrets.randbelow(15) + 1
    prefix = f"subclone-test-{secrets.token_hex(4)}:"
    url = f"redis://127.0.0.1:6379/{database}"
    yield RedisBroker(url=url, key_prefix=prefix)
    client = redis.Redis.from_url(url)
    try:
        # Celery prefixes every key it writes, its queue bindings included.
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """The shared data folder (tinyshakespeare, stsbenchmark); SUBCLONE_DATA_DIR overrides ../shared/data."""
    path = Path(os.environ.get("SUBCLONE_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(
            f"test data not found in {path}; set SUBCLONE_DATA_DIR to the folder with tinyshakespeare/"
        )
    return path


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    """TestClient over SQLite in a temporary directory; jobs stay queued because no worker runs."""
    settings = make_settings(tmp_path / "state")
    app = create_app(settings)
    with TestClient(app) as client:
        with session_scope(settings.resolved_database_url) as session:
            tenant_a = ensure_tenant(session, "tenant-a")
            tenant_b = ensure_tenant(session, "tenant-b")
            key_a = issue_key(session, tenant_a.id).secret
            key_b = issue_key(session, tenant_b.id).secret
        yield ApiHarness(client=client, settings=settings, key_a=key_a, key_b=key_b)
    shutil.rmtree(tmp_path / "state", ignore_errors=True)


@pytest.fixture(scope="module")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A loopback HTTP server that records the webhooks it receives."""
    with run_webhook_receiver() as receiver:
        yield receiver
