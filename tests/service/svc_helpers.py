"""Helpers for the service tests: start servers and workers as subprocesses, poll jobs, fetch artifacts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from app.core.config import Settings

REPO = Path(__file__).resolve().parents[2]

# The child used by every end-to-end test: small enough for a 2-core machine.
SMALL_TARGET = {
    "num_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
}
SMALL_CALIBRATION = {"num_samples": 16, "sequence_length": 64, "batch_size": 8}

# Leases and reconciler passes short enough that crash recovery shows within seconds.
FAST_RECOVERY_ENV = {
    "SUBCLONE_LEASE_TTL": "4",
    "SUBCLONE_HEARTBEAT_INTERVAL": "1",
    "SUBCLONE_RECONCILE_INTERVAL": "2",
    "SUBCLONE_MAX_ATTEMPTS": "3",
    "SUBCLONE_LOG_LEVEL": "INFO",
    "SUBCLONE_DEVICE": "cpu",
    # One worker serves both queues in these tests; replacing its process after every
    # short maintenance task would only add start-up delays.
    "SUBCLONE_WORKER_MAX_TASKS_PER_CHILD": "50",
}

STARTUP_TIMEOUT_S = 90.0
TERMINAL = {"succeeded", "failed", "cancelled"}


def clean_env(**overrides: str) -> dict[str, str]:
    """Return the current environment without SUBCLONE_* variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBCLONE_")}
    env.update(FAST_RECOVERY_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(overrides)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    """A subprocess started by a test, with its log file; stopped by pid, never by name."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    children: list[int] = field(default_factory=list)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def start_process(
    name: str, command: list[str], env: dict[str, str], log_path: Path
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("ab")
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return ManagedProcess(name, process, log_path)


@dataclass
class Service:
    """A running HTTP server of the service."""

    base_url: str
    process: ManagedProcess
    state_dir: Path

    def client(self, api_key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False
        )


def start_service(
    workdir: Path,
    env: dict[str, str],
    *,
    embedded: bool = True,
    no_auth: bool = True,
    name: str = "api",
) -> Service:
    """Start ``python -m app serve`` on 127.0.0.1 and a free port, and wait for /healthz."""
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "app",
        "serve",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--port-file",
        str(port_file),
    ]
    command.append("--embedded" if embedded else "--api-only")
    if no_auth:
        command.append("--no-auth")
    process = start_process(name, command, env, workdir / f"{name}.log")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(
                f"{name} exited with {process.process.returncode}:\n{process.log_tail()}"
            )
        if port_file.exists() and port_file.read_text().strip():
            base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(base_url + "/healthz", timeout=2, trust_env=False).status_code == 200:
                    return Service(base_url, process, Path(env.get("SUBCLONE_STATE_DIR", workdir)))
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(
        f"{name} did not answer /healthz within {STARTUP_TIMEOUT_S}s:\n{process.log_tail()}"
    )


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    statuses: set[str] | None = None,
    *,
    timeout: float = 180.0,
    stage: str | set[str] | None = None,
) -> dict[str, Any]:
    """Poll a job until its status is in ``statuses`` (default: terminal) or it reaches ``stage`` (one of a set)."""
    stages = {stage} if isinstance(stage, str) else stage
    expected = statuses or TERMINAL
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if stages is not None and job["stage"] in stages:
            return job
        if job["status"] in expected:
            return job
        time.sleep(0.1 if stage else 0.5)
    raise AssertionError(
        f"job {job_id} did not reach {stage or expected} within {timeout}s; last: {job}"
    )


def download_all(client: httpx.Client, job_id: str, target: Path) -> list[dict[str, Any]]:
    """Download every artifact of a job into ``target``, check each sha256 and size, and return the listing."""
    listing = client.get(f"/v1/jobs/{job_id}/artifacts")
    assert listing.status_code == 200, listing.text
    files = listing.json()["data"]
    target.mkdir(parents=True, exist_ok=True)
    for entry in files:
        response = client.get(entry["url"], follow_redirects=True)
        assert response.status_code == 200, (
            f"{entry['name']}: {response.status_code} {response.text[:200]}"
        )
        (target / entry["name"]).write_bytes(response.content)
        assert len(response.content) == entry["size"], entry["name"]
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"], entry["name"]
    return files


def lease_owner_pid(database_url: str, job_id: str) -> int | None:
    """Read the pid of the process holding a job's lease (owner is host:pid:suffix)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            owner = connection.execute(
                text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar()
    finally:
        engine.dispose()
    if not owner:
        return None
    return int(owner.split(":")[1])


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"service-tests-webhook-secret-32b").decode()


@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST it receives."""

    url: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.received) < count:
            time.sleep(0.2)
        return list(self.received)

    def check_event(self, job_id: str, event_type: str) -> None:
        """Assert that exactly one event arrived for ``job_id``, signed with WEBHOOK_SECRET and of ``event_type``."""
        from app.webhooks import verify_signature

        self.wait_for(1)
        matching = [
            (headers, body)
            for headers, body in self.received
            if json.loads(body)["data"]["job_id"] == job_id
        ]
        assert len(matching) == 1, self.received
        headers, body = matching[0]
        verify_signature(WEBHOOK_SECRET, headers, body)
        event = json.loads(body)
        assert event["type"] == event_type
        assert headers["webhook-id"] == event["id"]


@contextmanager
def run_webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def webhook_env() -> dict[str, str]:
    """Settings that sign webhooks with WEBHOOK_SECRET and allow the loopback receiver."""
    # Loopback is blocked by default; the tests' own receiver is allowlisted.
    return {
        "SUBCLONE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SUBCLONE_WEBHOOK_ALLOWLIST": '["127.0.0.1"]',
    }


@dataclass(frozen=True)
class RedisBroker:
    url: str
    key_prefix: str


@dataclass
class ApiHarness:
    """An in-process API (no worker) with two tenants, each with one API key."""

    client: TestClient
    settings: Settings
    key_a: str
    key_b: str

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}


def make_settings(state_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "state_dir": state_dir,
        "embedded": True,
        "max_upload_bytes": 64 * 1024,
        "max_request_bytes": 256 * 1024,
        "webhook_secret": "whsec_" + "dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0",
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
