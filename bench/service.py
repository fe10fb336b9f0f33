"""Benchmark the job service: read latency under load, and the delay from submission to worker start.

Needs PostgreSQL and Redis on 127.0.0.1 (defaults: user postgres on port 5432,
Redis on port 6379). The script creates its own database and uses its own
Redis database number and key prefix. At the end it drops the database,
deletes the Redis keys under its prefix and stops every process it started.

1. Seed: 10,000 jobs of one tenant, inserted through the SQLAlchemy models in
   mixed final and queued states, each with its events. No engine runs.
2. Read load: ``python -m app serve --api-only`` with API-key auth, and an
   open-loop asyncio httpx client on loopback. It sends requests at fixed
   rising rates against ``GET /v1/jobs/{id}`` and then ``GET /v1/jobs``. A
   series stops at the first step with errors or a p99 above the limit.
3. Dispatch delay: one Celery worker (queue gpu, prefork, concurrency 1). Jobs
   are submitted one at a time and each is cancelled as soon as it runs. The
   delay is the job's ``started_at`` minus its ``created_at``.
4. With ``--compare-uvicorn``, step 2 again with the API started by
   ``uvicorn --factory app.main:create_app``, which binds its own socket.

    OMP_NUM_THREADS=1 .venv/bin/python bench/service.py --compare-uvicorn
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO_ROOT, environment, write_result  # noqa: E402

SMALL_TARGET = {
    "num_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
}
SMALL_CALIBRATION = {"source": "builtin:stdlib-docstrings", "num_samples": 8, "sequence_length": 64}
PARENT = "all-minilm-l6-v2"

# Share of each status among the seeded jobs; queued jobs look dispatched, so the
# reconciler does not send them to the broker.
SEED_STATUS_WEIGHTS = {"succeeded": 0.60, "failed": 0.15, "cancelled": 0.10, "queued": 0.15}
SEED_STAGES = ("loading_parent", "calibrating", "ranking", "extracting", "verifying", "storing")

STARTUP_TIMEOUT_S = 120.0
API_COMMANDS = {
    "serve": "python -m app serve --api-only (one process), API-key auth",
    "uvicorn": "uvicorn --factory app.main:create_app (one process), API-key auth",
}
MAX_IN_FLIGHT = 200  # open requests per client; a request due while all are open counts as an error


@dataclass
class ManagedProcess:
    """A server or worker started by this script, stopped by its pid."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def start_process(
    name: str, command: list[str], env: dict[str, str], log_path: Path
) -> ManagedProcess:
    with log_path.open("ab") as handle:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name, process, log_path)


# --- Database and broker set-up ---------------------------------------------------------


def create_database(admin_conninfo: str) -> str:
    import psycopg

    name = f"subclone_bench_{secrets.token_hex(5)}"
    with psycopg.connect(admin_conninfo, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(admin_conninfo: str, name: str) -> None:
    import psycopg

    from app.db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(admin_conninfo, autocommit=True) as connection:
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')


def delete_broker_keys(url: str, prefix: str) -> int:
    """Delete every key under this run's prefix, so other users of the same Redis database keep theirs."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        for key in keys:
            client.delete(key)
        return len(keys)
    finally:
        client.close()


def service_env(
    state_dir: Path, database_url: str, broker_url: str, key_prefix: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBCLONE_")}
    env.update(
        {
            "SUBCLONE_STATE_DIR": str(state_dir),
            "SUBCLONE_DATABASE_URL": database_url,
            "SUBCLONE_BROKER_URL": broker_url,
            "SUBCLONE_BROKER_KEY_PREFIX": key_prefix,
            "SUBCLONE_EMBEDDED": "false",
            "SUBCLONE_DEVICE": "cpu",
            # A 1 s heartbeat lets the worker see a cancel within about a second.
            "SUBCLONE_HEARTBEAT_INTERVAL": "1",
            "SUBCLONE_LEASE_TTL": "10",
            "SUBCLONE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    return env


def create_key(env: dict[str, str], tenant_name: str) -> tuple[str, str]:
    """Create a tenant and an API key with the CLI; return (secret, tenant id)."""
    created = subprocess.run(
        [sys.executable, "-m", "app", "create-key", "--tenant-name", tenant_name],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    secret = created.stdout.strip().splitlines()[-1]
    match = re.search(r"for tenant (ten_\w+)", created.stderr)
    if not secret.startswith("sk_") or match is None:
        raise RuntimeError(
            f"create-key printed no key or tenant id:\n{created.stdout}\n{created.stderr}"
        )
    return secret, match.group(1)


def compute_plan() -> dict[str, Any]:
    """Return the engine's plan for the small target, as the API stores it on a job."""
    from common import parent_path

    from app.api.schemas import JobCreate
    from app.jobs.requests import build_engine_options
    from subclone.api import plan_subclone

    body = JobCreate(parent=PARENT, target=SMALL_TARGET, calibration=SMALL_CALIBRATION)
    options = build_engine_options(body.options.model_dump(), body.calibration.model_dump())
    report = plan_subclone(parent_path(), body.target, options)
    return {key: value for key, value in report.as_dict().items() if key != "child_config"}


def seed_jobs(database_url: str, tenant_id: str, count: int, seed: int) -> list[str]:
    """Insert ``count`` jobs with their events and metadata rows; return their ids, oldest first."""
    from sqlalchemy import insert

    from app.core.ids import new_id
    from app.db.models import Job, JobEvent, JobMetadata
    from app.db.session import session_scope

    rng = random.Random(seed)
    plan = compute_plan()
    calibration = dict(SMALL_CALIBRATION)
    calibration.update({"texts": None, "batch_size": None})
    statuses = list(SEED_STATUS_WEIGHTS)
    weights = list(SEED_STATUS_WEIGHTS.values())
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / count

    jobs: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    metadata: list[dict[str, Any]] = []
    for index in range(count):
        status = rng.choices(statuses, weights)[0]
        created = start + step * index
        job_id = new_id("job")
        row: dict[str, Any] = {
            "id": job_id,
            "tenant_id": tenant_id,
            "status": status,
            "stage": None,
            "progress_done": 0,
            "progress_total": 0,
            "progress_percent": 0.0,
            "parent_name": PARENT,
            "parent_revision": None,
            "target": SMALL_TARGET,
            "options": {},
            "calibration": calibration,
            "job_metadata": {"experiment": f"bench-{index % 20}"},
            "webhook_url": None,
            "plan": plan,
            "result": None,
            "error_code": None,
            "error_message": None,
            "error_param": None,
            "attempts": 0,
            "max_attempts": 3,
            "lease_owner": None,
            "lease_expires_at": None,
            "cancel_requested_at": None,
            "available_at": created,
            "dispatched_at": created,
            "artifacts_published": False,
            "artifacts_deleted_at": None,
            "created_at": created,
            "updated_at": created,
            "started_at": None,
            "finished_at": None,
        }
        events.append(
            {
                "id": new_id("evt"),
                "job_id": job_id,
                "created_at": created,
                "type": "status",
                "status": "queued",
                "message": "job accepted",
            }
        )
        if status != "queued":
            started = created + timedelta(seconds=rng.uniform(0.5, 5))
            finished = started + timedelta(seconds=rng.uniform(10, 120))
            row.update(
                {
                    "attempts": 1,
                    "started_at": started,
                    "finished_at": finished,
                    "updated_at": finished,
                    "progress_percent": 100.0 if status == "succeeded" else rng.uniform(0, 90),
                }
            )
            events.append(
                {
                    "id": new_id("evt"),
                    "job_id": job_id,
                    "created_at": started,
                    "type": "status",
                    "status": "running",
                    "message": "job started",
                }
            )
            message = {
                "succeeded": "job succeeded",
                "failed": "job failed",
                "cancelled": "job cancelled",
            }[status]
            events.append(
                {
                    "id": new_id("evt"),
                    "job_id": job_id,
                    "created_at": finished,
                    "type": "status",
                    "status": status,
                    "message": message,
                }
            )
        if status == "succeeded":
            row.update(
                {
                    "artifacts_published": True,
                    "result": {"files": 6, "total_bytes": 2_400_000, "kept_layers": [0, 5]},
                }
            )
        elif status == "failed":
            row.update(
                {
                    "error_code": "calibration_error",
                    "error_message": "calibration produced no tokens",
                    "stage": rng.choice(SEED_STAGES),
                }
            )
        jobs.append(row)
        metadata.append({"job_id": job_id, "key": "experiment", "value": f"bench-{index % 20}"})

    with session_scope(database_url) as session:
        for begin in range(0, count, 2000):
            session.execute(insert(Job), jobs[begin : begin + 2000])
        session.flush()
        for begin in range(0, len(events), 5000):
            session.execute(insert(JobEvent), events[begin : begin + 5000])
        session.execute(insert(JobMetadata), metadata)
    return [row["id"] for row in jobs]


# --- Servers --------------------------------------------------------------------------


def start_api(workdir: Path, env: dict[str, str], server: str) -> tuple[ManagedProcess, str]:
    """Start the API with ``python -m app serve --api-only`` or, for comparison, the uvicorn command line."""
    port_file = workdir / "api.port"
    if server == "serve":
        command = [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--api-only",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ]
    else:
        # uvicorn binds the socket itself here; the app factory reads the same SUBCLONE_* settings.
        port = free_port()
        port_file.write_text(str(port))
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "info",
        ]
    api = start_process("api", command, env, workdir / "api.log")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if api.process.poll() is not None:
            raise RuntimeError(
                f"API exited with {api.process.returncode}:\n{api.log_text()[-3000:]}"
            )
        if port_file.exists() and port_file.read_text().strip():
            base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(base_url + "/healthz", timeout=2, trust_env=False).status_code == 200:
                    return api, base_url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    api.stop()
    raise RuntimeError(
        f"API did not respond to /healthz within {STARTUP_TIMEOUT_S}s:\n{api.log_text()[-3000:]}"
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(workdir: Path, env: dict[str, str]) -> ManagedProcess:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        "gpu",
        "--pool",
        "prefork",
        "-c",
        "1",
        "--loglevel",
        "INFO",
        "-n",
        f"bench-{os.getpid()}@%h",
    ]
    worker = start_process("worker", command, env, workdir / "worker.log")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"Celery worker exited:\n{worker.log_text()[-3000:]}")
        if " ready." in worker.log_text():
            return worker
        time.sleep(0.25)
    worker.stop()
    raise RuntimeError(
        f"Celery worker not ready within {STARTUP_TIMEOUT_S}s:\n{worker.log_text()[-3000:]}"
    )


# --- Read load ------------------------------------------------------------------------


@dataclass
class StepResult:
    target_rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def percentile(values: list[float], quantile: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 2)

        return {
            "target_rate": self.target_rate,
            "achieved_rate": round(self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            "duration_s": round(self.duration_s, 2),
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
            "p50_ms": percentile(self.latencies_ms, 0.50),
            "p90_ms": percentile(self.latencies_ms, 0.90),
            "p99_ms": percentile(self.latencies_ms, 0.99),
            "max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else None,
            "send_lag_p99_ms": percentile(self.send_lag_ms, 0.99),
        }


async def run_step(
    client: httpx.AsyncClient, make_path: Any, rate: float, seconds: float
) -> StepResult:
    """Send ``rate * seconds`` requests on a fixed schedule (open loop) and time each one.

    Latency runs from the moment a request is sent to the end of its body. When
    the client falls behind its own schedule, ``send_lag_ms`` grows, and the
    achieved rate drops below the target.
    """
    result = StepResult(target_rate=rate, duration_s=0.0)
    total = int(rate * seconds)
    in_flight: set[asyncio.Task[None]] = set()

    async def send_one(path: str, scheduled: float) -> None:
        begin = time.perf_counter()
        result.send_lag_ms.append((begin - scheduled) * 1000)
        try:
            response = await client.get(path)
            elapsed = (time.perf_counter() - begin) * 1000
            if response.status_code == 200:
                result.ok += 1
                result.latencies_ms.append(elapsed)
            else:
                result.errors += 1
                result.error_samples.append(f"HTTP {response.status_code}: {response.text[:200]}")
        except httpx.HTTPError as exc:
            result.errors += 1
            result.error_samples.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= MAX_IN_FLIGHT:
            result.errors += 1
            result.error_samples.append(
                f"client had {MAX_IN_FLIGHT} requests open; request not sent"
            )
            continue
        task = asyncio.create_task(send_one(make_path(), scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        result.sent += 1
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)
    for task in list(in_flight):
        task.cancel()
        result.errors += 1
    result.duration_s = time.perf_counter() - start
    return result


async def wait_until_idle(client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    """Wait until /healthz responds within 0.5 s, so that requests left over from a saturated step are done."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        begin = time.perf_counter()
        try:
            response = await client.get("/healthz", timeout=30.0)
            if response.status_code == 200 and time.perf_counter() - begin < 0.5:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1.0)
    raise RuntimeError(
        f"the API did not become idle within {timeout_s}s after the previous load step"
    )


async def run_series(
    base_url: str,
    api_key: str,
    make_path: Any,
    rates: list[float],
    seconds: float,
    p99_limit_ms: float,
) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10.0,
        limits=limits,
        trust_env=False,
    ) as client:
        await wait_until_idle(client)
        for _ in range(50):  # warm-up: open connections, fill caches
            await client.get(make_path())
        steps = []
        for rate in rates:
            step = (await run_step(client, make_path, rate, seconds)).summary()
            steps.append(step)
            print(f"  {rate:>6.0f} req/s target: {step}", flush=True)
            if step["errors"] or (step["p99_ms"] or 0) > p99_limit_ms:
                step["stopped_series"] = True
                break
            await asyncio.sleep(1.0)
        return steps


async def measure_sequential(
    base_url: str, api_key: str, paths: dict[str, Any], count: int
) -> dict[str, Any]:
    """Time ``count`` requests per path sent one at a time, as a no-queueing baseline for the rate steps."""
    baseline = {}
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10.0,
        trust_env=False,
    ) as client:
        for name, make_path in paths.items():
            latencies = []
            for _ in range(count):
                begin = time.perf_counter()
                response = await client.get(make_path())
                response.raise_for_status()
                latencies.append((time.perf_counter() - begin) * 1000)
            ordered = sorted(latencies)
            baseline[name] = {
                "requests": count,
                "p50_ms": round(ordered[len(ordered) // 2], 2),
                "p90_ms": round(ordered[int(0.9 * len(ordered))], 2),
                "max_ms": round(ordered[-1], 2),
            }
            print(f"  sequential {name}: {baseline[name]}", flush=True)
    return baseline


# --- Dispatch delay -------------------------------------------------------------------


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def measure_dispatch(
    base_url: str, api_key: str, count: int, timeout_s: float
) -> list[dict[str, Any]]:
    """Submit ``count`` jobs one after another, cancel each once it runs, and record its start delay."""
    body = {
        "parent": PARENT,
        "target": SMALL_TARGET,
        "calibration": SMALL_CALIBRATION,
        "metadata": {"experiment": "bench-dispatch"},
    }
    samples = []
    with httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
        trust_env=False,
    ) as client:
        for index in range(count):
            posted = client.post("/v1/jobs", json=body)
            if posted.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs failed with {posted.status_code}: {posted.text}")
            job = posted.json()
            deadline = time.monotonic() + timeout_s
            while job["status"] == "queued" and time.monotonic() < deadline:
                time.sleep(0.02)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            cancel_status = None
            if job["status"] == "running":
                cancel_status = client.post(f"/v1/jobs/{job['id']}/cancel").status_code
            while (
                job["status"] not in ("succeeded", "failed", "cancelled")
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
                job = client.get(f"/v1/jobs/{job['id']}").json()
            events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()[
                "data"
            ]
            running = [e for e in events if e["type"] == "status" and e["status"] == "running"]
            sample = {
                "job_id": job["id"],
                "final_status": job["status"],
                "cancel_http_status": cancel_status,
                "start_delay_s": (
                    round(
                        (
                            parse_time(job["started_at"]) - parse_time(job["created_at"])
                        ).total_seconds(),
                        3,
                    )
                    if job["started_at"]
                    else None
                ),
                "first_running_event_delay_s": (
                    round(
                        (
                            parse_time(running[0]["created_at"]) - parse_time(job["created_at"])
                        ).total_seconds(),
                        3,
                    )
                    if running
                    else None
                ),
            }
            samples.append(sample)
            print(f"  job {index + 1}/{count}: {sample}", flush=True)
    return samples


# --- Main -----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs", type=int, default=10_000, help="Jobs to seed for the read benchmark."
    )
    parser.add_argument(
        "--rates",
        default="25,35,50,75,100,200,400",
        help="Request rates per step, in requests per second.",
    )
    parser.add_argument(
        "--step-seconds", type=float, default=15.0, help="Duration of each rate step in seconds."
    )
    parser.add_argument(
        "--p99-limit-ms",
        type=float,
        default=100.0,
        help="A series stops after a step whose p99 latency exceeds this many milliseconds.",
    )
    parser.add_argument(
        "--sequential-requests",
        type=int,
        default=100,
        help="Requests per path sent one at a time before the rate steps.",
    )
    parser.add_argument(
        "--compare-uvicorn",
        action="store_true",
        help="Also measure the reads with the API started by the uvicorn command line, which binds its own socket.",
    )
    parser.add_argument(
        "--dispatch-jobs",
        type=int,
        default=10,
        help="Jobs submitted one at a time to time worker start.",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=180.0,
        help="Seconds to wait for one dispatched job to start and finish.",
    )
    parser.add_argument(
        "--postgres",
        default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        help="libpq connection string of a database from which to create and drop the benchmark's database.",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="Redis database for the Celery broker.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for job states and request choices."
    )
    parser.add_argument("--out", default="service", help="Result name under bench/results/.")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    env_record = environment()
    rng = random.Random(args.seed)
    key_prefix = f"subclone-bench-{secrets.token_hex(4)}:"
    user = re.search(r"user=(\S+)", args.postgres)
    db_name = create_database(args.postgres)
    database_url = (
        f"postgresql+psycopg://{user.group(1) if user else 'postgres'}@127.0.0.1:5432/{db_name}"
    )
    print(f"database {db_name}, broker {args.redis_url} prefix {key_prefix}", flush=True)

    processes: list[ManagedProcess] = []
    with ExitStack() as cleanup, tempfile.TemporaryDirectory(prefix="subclone-bench-") as tmp:
        cleanup.callback(drop_database, args.postgres, db_name)
        cleanup.callback(delete_broker_keys, args.redis_url, key_prefix)
        cleanup.callback(lambda: [p.stop() for p in reversed(processes)])
        workdir = Path(tmp)
        env = service_env(workdir / "state", database_url, args.redis_url, key_prefix)
        os.environ.update({k: v for k, v in env.items() if k.startswith("SUBCLONE_")})

        api_key, tenant_id = create_key(env, "bench")
        began = time.perf_counter()
        job_ids = seed_jobs(database_url, tenant_id, args.jobs, args.seed)
        seed_seconds = time.perf_counter() - began
        print(f"seeded {len(job_ids)} jobs in {seed_seconds:.1f} s", flush=True)

        def job_path() -> str:
            return f"/v1/jobs/{rng.choice(job_ids)}"

        def list_path() -> str:
            # 70% first page, 30% a page after a random job's id (the cursor).
            if rng.random() < 0.7:
                return "/v1/jobs?limit=20"
            return f"/v1/jobs?limit=20&after={rng.choice(job_ids)}"

        def measure_reads(base_url: str) -> dict[str, Any]:
            sequential = asyncio.run(
                measure_sequential(
                    base_url,
                    api_key,
                    {
                        "/healthz": lambda: "/healthz",
                        "GET /v1/jobs/{id}": job_path,
                        "GET /v1/jobs?limit=20": list_path,
                    },
                    args.sequential_requests,
                )
            )
            series = {}
            for name, make_path in (("get_job", job_path), ("list_jobs", list_path)):
                print(name, flush=True)
                series[name] = asyncio.run(
                    run_series(
                        base_url, api_key, make_path, rates, args.step_seconds, args.p99_limit_ms
                    )
                )
            return {"api": API_COMMANDS["serve"], "sequential": sequential, **series}

        api, base_url = start_api(workdir, env, "serve")
        processes.append(api)
        print(f"reads through {API_COMMANDS['serve']}", flush=True)
        reads = measure_reads(base_url)

        samples = []
        if args.dispatch_jobs > 0:
            worker = start_worker(workdir, env)
            processes.append(worker)
            print("POST /v1/jobs to worker start", flush=True)
            samples = measure_dispatch(base_url, api_key, args.dispatch_jobs, args.job_timeout)

        comparison = None
        if args.compare_uvicorn:
            api.stop()
            processes.remove(api)
            api, base_url = start_api(workdir, env, "uvicorn")
            processes.append(api)
            print(f"reads through {API_COMMANDS['uvicorn']}", flush=True)
            comparison = measure_reads(base_url)
            comparison["api"] = API_COMMANDS["uvicorn"]
        delays = [s["start_delay_s"] for s in samples if s["start_delay_s"] is not None]

        payload = {
            "benchmark": "service",
            **env_record,
            "setup": {
                "database": "PostgreSQL on 127.0.0.1 (own database, dropped at the end)",
                "broker": "Redis on 127.0.0.1, own database number and key prefix",
                "seeded_jobs": len(job_ids),
                "seed_status_weights": SEED_STATUS_WEIGHTS,
                "seed_seconds": round(seed_seconds, 2),
                "load_generator": f"asyncio httpx, open loop, at most {MAX_IN_FLIGHT} requests open, same machine",
                "step_seconds": args.step_seconds,
                "p99_limit_ms": args.p99_limit_ms,
                "worker": "celery -A worker.celery_app worker -Q gpu --pool prefork -c 1",
                "dispatch_job": {
                    "parent": PARENT,
                    "target": SMALL_TARGET,
                    "calibration": SMALL_CALIBRATION,
                },
            },
            "reads": reads,
            "reads_uvicorn_socket": comparison,
            "dispatch": {
                "samples": samples,
                "median_s": round(statistics.median(delays), 3) if delays else None,
                "max_s": round(max(delays), 3) if delays else None,
                "min_s": round(min(delays), 3) if delays else None,
            },
        }
        path = write_result(args.out, payload)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
