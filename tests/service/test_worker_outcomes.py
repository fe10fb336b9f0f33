"""How the worker records outcomes that need no engine run: errors before the parent loads, finished jobs."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from sqlalchemy import delete, update
from svc_helpers import SMALL_CALIBRATION, SMALL_TARGET, ApiHarness

from app.db.models import Dataset, Job, utcnow
from app.db.session import session_scope
from worker.execute import execute_job


def submit_with_dataset(api: ApiHarness) -> tuple[str, str]:
    headers = api.headers(api.key_a)
    dataset = api.client.post(
        "/v1/datasets",
        files={"file": ("d.txt", b"one document\n\nanother one\n", "text/plain")},
        headers=headers,
    ).json()
    body = {
        "parent": "all-minilm-l6-v2",
        "target": SMALL_TARGET,
        "calibration": {**SMALL_CALIBRATION, "source": dataset["id"]},
    }
    job = api.client.post("/v1/jobs", json=body, headers=headers).json()
    return job["id"], dataset["id"]


def test_vanished_dataset_fails_without_retry(api: ApiHarness) -> None:
    job_id, dataset_id = submit_with_dataset(api)
    with session_scope(api.settings.resolved_database_url) as session:
        session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    ctx = api.client.app.state.context

    outcome = execute_job(ctx, job_id, "worker-test")
    assert outcome.status == "failed"

    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "not_found"
    assert job["error"]["param"] == "calibration.source"
    assert job["attempts"] == 1
    assert job["finished_at"] is not None
    # A finished job is never run again, by any worker.
    assert execute_job(ctx, job_id, "worker-other").reason == "not_claimed"
    assert (
        api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()["attempts"] == 1
    )


def test_cancelled_job_is_not_run(api: ApiHarness) -> None:
    job_id, _ = submit_with_dataset(api)
    api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers(api.key_a))
    outcome = execute_job(api.client.app.state.context, job_id, "worker-test")
    assert outcome.reason == "not_claimed"
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()
    assert job["status"] == "cancelled"
    assert job["attempts"] == 0


def test_worker_shutdown_requeues_job(api: ApiHarness) -> None:
    body = {
        "parent": "all-minilm-l6-v2",
        "target": SMALL_TARGET,
        "calibration": {**SMALL_CALIBRATION, "texts": ["A short calibration text."]},
    }
    job_id = api.client.post("/v1/jobs", json=body, headers=api.headers(api.key_a)).json()["id"]
    shutdown = threading.Event()
    shutdown.set()  # the worker received SIGTERM before the engine's first check

    outcome = execute_job(api.client.app.state.context, job_id, "worker-test", shutdown=shutdown)
    assert outcome.status == "queued"
    assert outcome.reason == "shutdown"
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()
    assert job["status"] == "queued"
    # The attempt is given back, because the job did nothing wrong.
    assert job["attempts"] == 0
    events = api.client.get(f"/v1/jobs/{job_id}/events", headers=api.headers(api.key_a)).json()[
        "data"
    ]
    assert events[-1]["message"] == "worker shut down; job requeued"


def test_storage_failure_retries_then_fails(api: ApiHarness, tmp_path: Path) -> None:
    from app.storage import LocalArtifactStore

    body = {
        "parent": "all-minilm-l6-v2",
        "target": SMALL_TARGET,
        "calibration": {
            **SMALL_CALIBRATION,
            "texts": ["Some text to calibrate on.", "And a second document."],
        },
    }
    job_id = api.client.post("/v1/jobs", json=body, headers=api.headers(api.key_a)).json()["id"]
    # A store whose root is a regular file cannot create directories, so publishing fails.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    ctx = dataclasses.replace(api.client.app.state.context, store=LocalArtifactStore(blocker))

    first = execute_job(ctx, job_id, "worker-1")
    assert first.status == "queued"
    assert first.reason == "storage_error"
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()
    assert job["status"] == "queued"
    assert job["attempts"] == 1

    # The retry waits for its backoff; make it due now and run the last attempts.
    for attempt in range(2, api.settings.max_attempts + 1):
        with session_scope(api.settings.resolved_database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(available_at=utcnow()))
        outcome = execute_job(ctx, job_id, f"worker-{attempt}")
    assert outcome.status == "failed"
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(api.key_a)).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "storage_error"
    assert job["attempts"] == api.settings.max_attempts
