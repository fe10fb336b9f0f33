"""Embedded mode: the API in this process and a job-table worker in a supervised child process.

No broker and no external service: SQLite and local artifacts by default. The
worker runs in its own process so that a job's memory is returned when the
process is replaced and a crash of the engine cannot take the API down. The
supervisor restarts the worker when it exits; the worker's reconciler then
requeues (or fails with ``worker_lost``) any job whose lease expired.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from app.core.config import Settings

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
# A worker that dies sooner than this after its start is crash-looping (a broken
# database URL, say), so each further restart waits twice as long, up to the cap.
HEALTHY_RUN_S = 30.0
MAX_RESTART_DELAY_S = 60.0
STOP_TIMEOUT_S = 30.0


def settings_to_env(settings: Settings) -> dict[str, str]:
    """Encode ``settings`` as ``SUBCLONE_*`` variables so that a child process reads the same values."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        env[f"SUBCLONE_{name.upper()}"] = _encode(value)
    return env


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | Path):
        return str(value)
    return json.dumps(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class WorkerSupervisor:
    """Start the embedded worker process and restart it whenever it exits, until stopped."""

    def __init__(self, settings: Settings, *, poll_interval: float = 1.0) -> None:
        self._settings = settings
        self._poll_interval = poll_interval
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._process.pid if self._process else None

    def alive(self) -> bool:
        with self._lock:
            return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to requeue its job and exit; kill it if it does not within STOP_TIMEOUT_S."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "embedded worker %d did not stop within %.0fs; killing it",
                process.pid,
                STOP_TIMEOUT_S,
            )
            process.kill()
            process.wait()

    def _spawn(self) -> None:
        env = {**os.environ, **settings_to_env(self._settings)}
        command = [
            sys.executable,
            "-m",
            "worker.embedded",
            "--parent-pid",
            str(os.getpid()),
            "--poll-interval",
            str(self._poll_interval),
        ]
        process = subprocess.Popen(command, env=env, cwd=os.getcwd())
        with self._lock:
            self._process = process
        logger.info("embedded worker started (pid %d)", process.pid)

    def _watch(self) -> None:
        delay = RESTART_DELAY_S
        while not self._stopping.is_set():
            with self._lock:
                process = self._process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            ran_for = time.monotonic() - started
            if code == 0 or ran_for >= HEALTHY_RUN_S:
                delay = RESTART_DELAY_S
            else:
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
            if code == 0:
                logger.info(
                    "embedded worker %d exited after its job limit; starting a fresh one",
                    process.pid,
                )
            else:
                logger.error(
                    "embedded worker %d exited with status %d after %.0fs; restarting in %.0fs",
                    process.pid,
                    code,
                    ran_for,
                    delay,
                )
            self.restarts += 1
            if self._stopping.wait(delay):
                return
            self._spawn()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free port, read it from ``getsockname()``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP must be explicit: CPython 3.11's asyncio enables TCP_NODELAY on accepted
    # connections only for that protocol number, and without it every keep-alive response
    # waits about 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
