"""Production layout end to end: API server, a Celery prefork worker, Redis and PostgreSQL, all real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from svc_helpers import (
    REPO,
    SMALL_CALIBRATION,
    SMALL_TARGET,
    ManagedProcess,
    RedisBroker,
    Service,
    WebhookReceiver,
    clean_env,
    download_all,
    lease_owner_pid,
    start_process,
    start_service,
    wait_for_job,
    webhook_env,
)

pytestmark = pytest.mark.slow

WORKER_READY_TIMEOUT_S = 90.0
EARLY_STAGES = {"loading_parent", "calibrating"}


@dataclass
class CeleryStack:
    api: Service
    worker: ManagedProcess
    api_key: str
    database_url: str

    def client(self) -> httpx.Client:
        return self.api.client(self.api_key)


def _wait_for_worker(worker: ManagedProcess) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"celery worker exited:\n{worker.log_tail()}")
        if " ready." in worker.log_path.read_text(errors="replace"):
            return
        time.sleep(0.25)
    raise RuntimeError(
        f"celery worker not ready within {WORKER_READY_TIMEOUT_S}s:\n{worker.log_tail()}"
    )


@pytest.fixture(scope="module")
def celery_stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_broker: RedisBroker
) -> Iterator[CeleryStack]:
    workdir = tmp_path_factory.mktemp("celery")
    env = clean_env(
        SUBCLONE_STATE_DIR=str(workdir / "state"),
        SUBCLONE_DATABASE_URL=postgres_url,
        SUBCLONE_BROKER_URL=redis_broker.url,
        SUBCLONE_BROKER_KEY_PREFIX=redis_broker.key_prefix,
        SUBCLONE_EMBEDDED="false",
        SUBCLONE_JOB_SOFT_TIME_LIMIT="600",
        SUBCLONE_JOB_TIME_LIMIT="900",
        SUBCLONE_BROKER_VISIBILITY_TIMEOUT="1200",
        **webhook_env(),
    )
    created = subprocess.run(
        [sys.executable, "-m", "app", "create-key", "--tenant-name", "celery-e2e"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    api_key = created.stdout.strip().splitlines()[-1]
    assert api_key.startswith("sk_")

    worker = start_process(
        "worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            "gpu,default",
            "--pool",
            "prefork",
            "-c",
            "1",
            "--loglevel",
            "INFO",
            "-n",
            f"e2e-{os.getpid()}@%h",
            "-B",
            "-s",
            str(workdir / "beat-schedule"),
        ],
        env,
        workdir / "worker.log",
    )
    api: Service | None = None
    try:
        _wait_for_worker(worker)
        api = start_service(workdir, env, embedded=False, no_auth=False)
        yield CeleryStack(api=api, worker=worker, api_key=api_key, database_url=postgres_url)
    finally:
        if api is not None:
            api.process.stop()
        worker.stop(timeout=60)


def test_celery_job_end_to_end(
    celery_stack: CeleryStack, webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    with celery_stack.client() as client:
        assert client.get("/readyz").json()["checks"] == {
            "database": "ok",
            "broker": "ok",
            "storage": "ok",
        }
        body = {
            "parent": "all-minilm-l6-v2",
            "target": SMALL_TARGET,
            "calibration": {**SMALL_CALIBRATION, "source": "builtin:stdlib-docstrings"},
            "metadata": {"suite": "celery"},
            "webhook_url": webhook_receiver.url,
        }
        job = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "celery-e2e-1"})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        done = wait_for_job(client, job_id, timeout=240)
        assert done["status"] == "succeeded", (done, celery_stack.worker.log_tail())
        assert done["attempts"] == 1
        files = download_all(client, job_id, tmp_path / "child")
        assert {"config.json", "model.safetensors", "subclone_manifest.json"} <= {
            f["name"] for f in files
        }
        # Delivered by the deliver_webhook task on the default queue.
        webhook_receiver.check_event(job_id, "job.succeeded")
        listed = client.get("/v1/jobs", params={"metadata[suite]": "celery"}).json()["data"]
        assert [item["id"] for item in listed] == [job_id]
        # Unauthenticated requests are refused in this mode.
        assert httpx.get(celery_stack.api.base_url + "/v1/jobs", trust_env=False).status_code == 401

    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "child")
    assert model.config.num_hidden_layers == 2
    assert model.config.intermediate_size == 512


def test_celery_worker_kill9_redelivery(celery_stack: CeleryStack) -> None:
    with celery_stack.client() as client:
        body = {
            "parent": "all-minilm-l6-v2",
            "target": SMALL_TARGET,
            "calibration": {**SMALL_CALIBRATION, "source": "builtin:stdlib-docstrings"},
        }
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        wait_for_job(client, job_id, stage=EARLY_STAGES, timeout=180)
        pid = lease_owner_pid(celery_stack.database_url, job_id)
        assert pid is not None and pid != celery_stack.worker.process.pid
        os.kill(pid, signal.SIGKILL)  # the prefork child running the task

        done = wait_for_job(client, job_id, timeout=300)
        assert done["status"] in ("succeeded", "failed"), done
        if done["status"] == "failed":
            assert done["error"]["code"] == "worker_lost"
        else:
            assert done["attempts"] == 2
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        assert any("stopped renewing its lease" in event["message"] for event in events)
    # Celery redelivered the task of the killed child at once. That delivery found
    # the lease still held, so it exited without running the job a second time.
    log = celery_stack.worker.log_path.read_text(errors="replace")
    assert f"job {job_id} not claimed" in log, celery_stack.worker.log_tail(120)
    assert log.count(f"job {job_id}: attempt ") == 2
