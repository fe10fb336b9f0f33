"""Embedded mode end to end: one command, SQLite, local artifacts, a real worker process and the real parent."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from svc_helpers import (
    SMALL_CALIBRATION,
    SMALL_TARGET,
    Service,
    WebhookReceiver,
    clean_env,
    download_all,
    lease_owner_pid,
    start_service,
    wait_for_job,
    webhook_env,
)

pytestmark = pytest.mark.slow

# The crash tests kill a worker during the first stages of the small job.
EARLY_STAGES = {"loading_parent", "calibrating"}
# Enough calibration work (about 6 s on 2 cores) to cancel a job while it calibrates.
SLOW_CALIBRATION = {"num_samples": 32, "sequence_length": 128, "batch_size": 8}


def sqlite_url(service: Service) -> str:
    return f"sqlite:///{service.state_dir / 'subclone.db'}"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("embedded")
    env = clean_env(SUBCLONE_STATE_DIR=str(workdir / "state"), **webhook_env())
    service = start_service(workdir, env)
    yield service
    service.process.stop()


@pytest.fixture(scope="module")
def shakespeare(embedded: Service, test_data_dir: Path) -> str:
    """Upload tinyshakespeare once and return its dataset id."""
    path = test_data_dir / "tinyshakespeare" / "input.txt"
    with embedded.client() as client, path.open("rb") as handle:
        response = client.post("/v1/datasets", files={"file": ("input.txt", handle, "text/plain")})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def submit(
    client: httpx.Client, dataset_id: str, calibration: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    body = {
        "parent": "all-minilm-l6-v2",
        "target": SMALL_TARGET,
        "calibration": {**calibration, "source": dataset_id},
        **extra,
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_embedded_job_end_to_end(
    embedded: Service, shakespeare: str, webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    # Running without API keys is allowed here (embedded, loopback) and announced.
    assert "API keys are disabled" in embedded.process.log_path.read_text(errors="replace")
    with embedded.client() as client:
        job = submit(
            client,
            shakespeare,
            SMALL_CALIBRATION,
            metadata={"suite": "embedded"},
            webhook_url=webhook_receiver.url,
        )
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"]["percent"] == 100.0
        assert done["attempts"] == 1
        assert done["started_at"] and done["finished_at"]
        assert done["error"] is None

        files = download_all(client, job["id"], tmp_path / "child")
        names = {entry["name"] for entry in files}
        assert {
            "config.json",
            "model.safetensors",
            "subclone_manifest.json",
            "tokenizer.json",
        } <= names

        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        started = [event["stage"] for event in events if event["type"] == "stage_started"]
        assert started == [
            "loading_parent",
            "calibrating",
            "ranking",
            "extracting",
            "verifying",
            "storing",
        ]
        assert [event["status"] for event in events if event["type"] == "status"] == [
            "queued",
            "running",
            "succeeded",
        ]

        _check_tar(client, job["id"], files)
        _check_ranges(client, job["id"], files)
        _check_raw_dot_segments(embedded, job["id"])

        webhook_receiver.check_event(job["id"], "job.succeeded")

        metrics = client.get("/metrics").text
        assert 'subclone_jobs{status="succeeded"}' in metrics
        assert 'subclone_stage_duration_seconds_count{stage="calibrating"}' in metrics

    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tmp_path / "child")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "child")
    assert model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 128
    with torch.no_grad():
        output = model(**tokenizer(["Now is the winter of our discontent"], return_tensors="pt"))
    assert output.last_hidden_state.shape[-1] == 128
    assert torch.isfinite(output.last_hidden_state).all()


def _check_tar(client: httpx.Client, job_id: str, files: list[dict[str, Any]]) -> None:
    response = client.get(f"/v1/jobs/{job_id}/artifacts.tar")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert set(members) == {f"{job_id}/{entry['name']}" for entry in files}
        for entry in files:
            data = archive.extractfile(members[f"{job_id}/{entry['name']}"])
            assert data is not None
            assert hashlib.sha256(data.read()).hexdigest() == entry["sha256"]


def _check_ranges(client: httpx.Client, job_id: str, files: list[dict[str, Any]]) -> None:
    entry = next(f for f in files if f["name"] == "model.safetensors")
    url = f"/v1/jobs/{job_id}/artifacts/model.safetensors"
    full = client.get(url)
    etag = full.headers["etag"]
    assert etag == f'"{entry["sha256"]}"'
    assert full.headers["accept-ranges"] == "bytes"

    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{entry['size']}"
    assert part.content == full.content[100:200]

    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206
    assert tail.content == full.content[-10:]

    resumed = client.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
    assert resumed.status_code == 206
    assert resumed.content == full.content[100:]

    stale = client.get(url, headers={"Range": "bytes=100-", "If-Range": '"0000"'})
    assert stale.status_code == 200
    assert len(stale.content) == entry["size"]

    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    outside = client.get(url, headers={"Range": f"bytes={entry['size']}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{entry['size']}"
    head = client.head(url)
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == entry["size"]


def _check_raw_dot_segments(service: Service, job_id: str) -> None:
    # HTTP clients resolve '..' before sending, so the request line is written by hand.
    port = int(service.base_url.rsplit(":", 1)[1])
    for path in (
        f"/v1/jobs/{job_id}/artifacts/..",
        f"/v1/jobs/{job_id}/artifacts/../../../etc/passwd",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = sock.makefile("rb").readline().decode()
        assert " 404 " in status_line, (path, status_line)


def test_embedded_cancel_during_calibration(embedded: Service, shakespeare: str) -> None:
    with embedded.client() as client:
        job = submit(client, shakespeare, SLOW_CALIBRATION)
        wait_for_job(client, job["id"], stage="calibrating", timeout=120)
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] in ("cancelling", "cancelled")
        done = wait_for_job(client, job["id"], timeout=60)
        assert done["status"] == "cancelled", done
        assert client.get(f"/v1/jobs/{job['id']}/artifacts").status_code == 409
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    artifacts = embedded.state_dir / "artifacts"
    leftovers = (
        [p for p in artifacts.rglob("*") if job["id"] in str(p)] if artifacts.exists() else []
    )
    assert leftovers == []


def test_embedded_worker_kill9_runs_job_again(embedded: Service, shakespeare: str) -> None:
    with embedded.client() as client:
        job = submit(client, shakespeare, SMALL_CALIBRATION)
        wait_for_job(client, job["id"], stage=EARLY_STAGES, timeout=120)
        pid = lease_owner_pid(sqlite_url(embedded), job["id"])
        assert pid is not None and pid != embedded.process.process.pid
        os.kill(pid, signal.SIGKILL)
        done = wait_for_job(client, job["id"], timeout=240)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert any("stopped renewing its lease" in event["message"] for event in events)


def test_embedded_restart_after_kill9(
    tmp_path: Path, test_data_dir: Path, webhook_receiver: WebhookReceiver
) -> None:
    # One job per worker process, the default: the worker exits right after the job,
    # and must still deliver the job's webhook before it does.
    env = clean_env(
        SUBCLONE_STATE_DIR=str(tmp_path / "state"),
        SUBCLONE_WORKER_MAX_TASKS_PER_CHILD="1",
        **webhook_env(),
    )
    service = start_service(tmp_path, env, name="first")
    texts = (test_data_dir / "tinyshakespeare" / "input.txt").read_text().split("\n\n")[:200]
    try:
        with service.client() as client:
            body = {
                "parent": "all-minilm-l6-v2",
                "target": SMALL_TARGET,
                "calibration": {**SMALL_CALIBRATION, "texts": texts},
                "webhook_url": webhook_receiver.url,
            }
            job = client.post("/v1/jobs", json=body).json()
            wait_for_job(client, job["id"], stage=EARLY_STAGES, timeout=120)
        worker_pid = lease_owner_pid(sqlite_url(service), job["id"])
        assert worker_pid is not None
        # The whole service dies at once: API process and worker process.
        os.kill(worker_pid, signal.SIGKILL)
        service.process.kill9()
    finally:
        service.process.stop()
    time.sleep(0.5)

    restarted = start_service(tmp_path, env, name="second")
    try:
        with restarted.client() as client:
            done = wait_for_job(client, job["id"], timeout=240)
        assert done["status"] in ("succeeded", "failed"), done
        if done["status"] == "failed":
            assert done["error"]["code"] == "worker_lost"
        else:
            assert done["attempts"] == 2
        webhook_receiver.check_event(job["id"], f"job.{done['status']}")
    finally:
        restarted.process.stop()


def test_embedded_s3_storage_redirects(tmp_path: Path, seaweedfs: Any) -> None:
    prefix = f"e2e-{tmp_path.name}/"
    env = clean_env(
        SUBCLONE_STATE_DIR=str(tmp_path / "state"),
        SUBCLONE_STORAGE__BACKEND="s3",
        SUBCLONE_STORAGE__S3_BUCKET=seaweedfs.bucket,
        SUBCLONE_STORAGE__S3_ENDPOINT_URL=seaweedfs.endpoint_url,
        SUBCLONE_STORAGE__S3_REGION=seaweedfs.region,
        SUBCLONE_STORAGE__S3_ACCESS_KEY=seaweedfs.access_key,
        SUBCLONE_STORAGE__S3_SECRET_KEY=seaweedfs.secret_key,
        SUBCLONE_STORAGE__S3_PREFIX=prefix,
    )
    service = start_service(tmp_path, env, name="s3")
    try:
        with service.client() as client:
            assert client.get("/readyz").json()["checks"]["storage"] == "ok"
            body = {
                "parent": "all-minilm-l6-v2",
                "target": SMALL_TARGET,
                "calibration": {
                    **SMALL_CALIBRATION,
                    "texts": ["Shall I compare thee to a summer's day?"] * 4,
                },
            }
            job = client.post("/v1/jobs", json=body).json()
            done = wait_for_job(client, job["id"], timeout=240)
            assert done["status"] == "succeeded", (done, service.process.log_tail())

            redirect = client.get(f"/v1/jobs/{job['id']}/artifacts/config.json")
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(seaweedfs.endpoint_url)
            assert "X-Amz-Signature=" in redirect.headers["location"]

            files = download_all(client, job["id"], tmp_path / "child")
            assert "model.safetensors" in {entry["name"] for entry in files}
            tar = client.get(f"/v1/jobs/{job['id']}/artifacts.tar")
            assert tar.status_code == 200
            assert int(tar.headers["content-length"]) == len(tar.content)
        keys = [
            item["Key"]
            for item in seaweedfs.client()
            .list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix)
            .get("Contents", [])
        ]
        assert any(key.endswith("subclone_manifest.json") for key in keys), keys
    finally:
        service.process.stop()
