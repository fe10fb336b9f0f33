"""HTTP behaviour of API v1 without a worker: validation, auth, tenancy, idempotency, uploads, lists."""

from __future__ import annotations

import json
from typing import Any

import pytest
from svc_helpers import SMALL_CALIBRATION, SMALL_TARGET, ApiHarness

from app import idempotency
from app.db.session import session_scope

PROBLEM = "application/problem+json"


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "parent": "all-minilm-l6-v2",
        "target": dict(SMALL_TARGET),
        "calibration": {
            **SMALL_CALIBRATION,
            "texts": ["To be, or not to be: that is the question."],
        },
    }
    body.update(overrides)
    return body


def submit(api: ApiHarness, body: dict[str, Any], key: str | None = None, **headers: str) -> Any:
    return api.client.post(
        "/v1/jobs", json=body, headers={**api.headers(key or api.key_a), **headers}
    )


def error_fields(response: Any) -> set[str]:
    return {error["field"] for error in response.json().get("errors", [])}


def test_submit_returns_queued_job(api: ApiHarness) -> None:
    response = submit(api, job_body(metadata={"team": "search"}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "job"
    assert job["id"].startswith("job_")
    assert len(job["id"]) == 30
    assert job["status"] == "queued"
    assert job["metadata"] == {"team": "search"}
    assert job["plan"]["child"]["hidden_size"] == 128
    assert job["plan"]["child_parameters"] < job["plan"]["parent_parameters"]
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    for stamp in ("created_at", "updated_at"):
        assert job[stamp].endswith("Z")
    assert job["started_at"] is None
    assert job["finished_at"] is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target": {**SMALL_TARGET, "num_layers": 0}}, "target.num_layers"),
        ({"target": {**SMALL_TARGET, "num_layers": 9}}, "target.num_layers"),
        ({"target": {**SMALL_TARGET, "hidden_size": 1024}}, "target.hidden_size"),
        ({"target": {**SMALL_TARGET, "num_attention_heads": 5}}, "target.hidden_size"),
        ({"target": {**SMALL_TARGET, "width": 3}}, "target.width"),
        ({"options": {"method": "random"}}, "options.method"),
        ({"options": {"device": "cuda:0"}}, "options.device"),
        ({"options": {"scores_path": "/etc/passwd"}}, "options.scores_path"),
        ({"options": {"keep_layers": [0, 9]}}, "options.keep_layers"),
        ({"calibration": {"num_samples": 0, "texts": ["a b c"]}}, "calibration.num_samples"),
        ({"calibration": {"num_samples": 100000, "texts": ["a b c"]}}, "calibration.num_samples"),
        (
            {"calibration": {"sequence_length": 4096, "texts": ["a b c"]}},
            "calibration.sequence_length",
        ),
        ({"calibration": {"source": "/etc/passwd"}}, "calibration.source"),
        ({"calibration": {"source": "ds_aaaaaaaaaaaaaaaaaaaaaaaaaa"}}, "calibration.source"),
        ({"calibration": {"texts": []}}, "calibration.texts"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"parent": "no-such-parent"}, "parent"),
        ({"parent": "sentence-transformers/all-MiniLM-L6-v2", "revision": "main"}, "parent"),
        ({"webhook_url": "http://169.254.169.254/latest/meta-data"}, "webhook_url"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_invalid_field_names_it(api: ApiHarness, change: dict[str, Any], field: str) -> None:
    response = submit(api, job_body(**change))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    for member in ("type", "title", "status", "detail"):
        assert member in problem
    assert problem["status"] == 422
    assert field in error_fields(response), problem
    for error in problem["errors"]:
        assert {"field", "value", "message"} <= set(error)


def test_invalid_request_lists_every_field(api: ApiHarness) -> None:
    body = job_body(target={**SMALL_TARGET, "num_layers": 0}, options={"method": "random"})
    body["calibration"]["num_samples"] = -1
    response = submit(api, body)
    assert response.status_code == 422
    assert {"target.num_layers", "options.method", "calibration.num_samples"} <= error_fields(
        response
    )


def test_engine_shape_errors_list_every_field(api: ApiHarness) -> None:
    response = submit(
        api, job_body(target={"num_layers": 12, "hidden_size": 100, "num_attention_heads": 4})
    )
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_target"
    assert {"target.num_layers", "target.num_attention_heads"} <= error_fields(response)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://[::1]/hook",
        "http://10.0.0.5/hook",
        "http://192.168.1.10/hook",
        "http://172.16.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://0x7f.1/hook",
        "http://2130706433/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost/hook",
        "file:///etc/passwd",
        "ftp://93.184.215.14/hook",
        "http://user:pw@93.184.215.14/hook",
    ],
)
def test_webhook_url_rejected(api: ApiHarness, url: str) -> None:
    response = submit(api, job_body(webhook_url=url))
    assert response.status_code == 422, response.text
    assert "webhook_url" in error_fields(response)


def test_webhook_allowlisted_loopback_accepted(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient
    from svc_helpers import make_settings

    from app.main import create_app

    settings = make_settings(
        tmp_path / "state", auth_disabled=True, webhook_allowlist=["127.0.0.1"]
    )
    with TestClient(create_app(settings)) as client:
        accepted = client.post("/v1/jobs", json=job_body(webhook_url="http://127.0.0.1:9/hook"))
        assert accepted.status_code == 202, accepted.text
        # Metadata addresses stay blocked even when their network is allowlisted.
        blocked = client.post("/v1/jobs", json=job_body(webhook_url="http://169.254.169.254/"))
        assert blocked.status_code == 422


def test_missing_key_is_401(api: ApiHarness) -> None:
    response = api.client.get("/v1/jobs")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Bearer sk_wrong", "Basic dXNlcjpwYXNz", "Bearer", "sk_no_scheme"]
)
def test_wrong_key_is_401(api: ApiHarness, header: str) -> None:
    response = api.client.get("/v1/jobs", headers={"Authorization": header})
    assert response.status_code == 401


def test_revoked_key_is_401(api: ApiHarness) -> None:
    from sqlalchemy import select

    from app.core.security import hash_api_key
    from app.db.models import ApiKey
    from app.tenants import revoke_key

    with session_scope(api.settings.resolved_database_url) as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(api.key_a)))
        revoke_key(session, key_id)
    assert api.client.get("/v1/jobs", headers=api.headers(api.key_a)).status_code == 401


def test_other_tenant_job_is_404(api: ApiHarness) -> None:
    job = submit(api, job_body()).json()
    other = api.headers(api.key_b)
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/config.json"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts.tar"),
    ]:
        response = api.client.request(method, path, headers=other)
        assert response.status_code == 404, (method, path, response.text)
        assert job["id"] in response.json()["detail"]
    listed = api.client.get("/v1/jobs", headers=other).json()
    assert listed["data"] == []
    # The owner still sees it.
    assert (
        api.client.get(f"/v1/jobs/{job['id']}", headers=api.headers(api.key_a)).status_code == 200
    )


# A literal ".." segment is resolved by the HTTP client before sending; the
# end-to-end tests send it over a raw socket.
@pytest.mark.parametrize(
    "name",
    ["..%2F..%2Fetc%2Fpasswd", "%2E%2E", "..%5Cconfig.json", "%2Fetc%2Fpasswd", "config.json%00"],
)
def test_artifact_path_traversal_is_404(api: ApiHarness, name: str) -> None:
    job = submit(api, job_body()).json()
    response = api.client.get(
        f"/v1/jobs/{job['id']}/artifacts/{name}", headers=api.headers(api.key_a)
    )
    assert response.status_code == 404, response.text


def test_artifacts_of_queued_job_conflict(api: ApiHarness) -> None:
    job = submit(api, job_body()).json()
    response = api.client.get(f"/v1/jobs/{job['id']}/artifacts", headers=api.headers(api.key_a))
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]


def test_idempotent_replay_returns_first_job(api: ApiHarness) -> None:
    first = submit(api, job_body(), **{"Idempotency-Key": "retry-1"})
    assert first.status_code == 202
    again = submit(api, job_body(), **{"Idempotency-Key": "retry-1"})
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    jobs = api.client.get("/v1/jobs", headers=api.headers(api.key_a)).json()["data"]
    assert len(jobs) == 1


def test_idempotency_key_with_other_body_is_422(api: ApiHarness) -> None:
    assert submit(api, job_body(), **{"Idempotency-Key": "retry-2"}).status_code == 202
    changed = job_body(metadata={"run": "2"})
    response = submit(api, changed, **{"Idempotency-Key": "retry-2"})
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_reused"


def test_idempotency_key_in_flight_is_409(api: ApiHarness) -> None:
    from sqlalchemy import select

    from app.core.security import hash_api_key
    from app.db.models import ApiKey

    body = job_body()
    with session_scope(api.settings.resolved_database_url) as session:
        tenant_id = session.scalar(
            select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_api_key(api.key_a))
        )
        # The first request with this key is still being handled.
        digest = idempotency.request_hash("POST", "/v1/jobs", _normalised(api, body))
        assert idempotency.begin(session, tenant_id, "retry-3", digest, ttl=3600) is None
    response = submit(api, body, **{"Idempotency-Key": "retry-3"})
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_in_progress"


def _normalised(api: ApiHarness, body: dict[str, Any]) -> dict[str, Any]:
    from app.api.schemas import JobCreate

    return JobCreate.model_validate(body).model_dump(mode="json")


def test_idempotency_key_scoped_to_tenant(api: ApiHarness) -> None:
    first = submit(api, job_body(), key=api.key_a, **{"Idempotency-Key": "shared"})
    second = submit(api, job_body(), key=api.key_b, **{"Idempotency-Key": "shared"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]


def test_failed_request_releases_idempotency_key(api: ApiHarness) -> None:
    bad = job_body(target={**SMALL_TARGET, "num_layers": 99})
    assert submit(api, bad, **{"Idempotency-Key": "retry-4"}).status_code == 422
    assert submit(api, job_body(), **{"Idempotency-Key": "retry-4"}).status_code == 202


def test_oversized_upload_is_413(api: ApiHarness) -> None:
    content = b"word " * (api.settings.max_upload_bytes // 5 + 1000)
    response = api.client.post(
        "/v1/datasets",
        files={"file": ("big.txt", content, "text/plain")},
        headers=api.headers(api.key_a),
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith(PROBLEM)


def test_oversized_json_body_is_413(api: ApiHarness) -> None:
    body = job_body()
    body["calibration"]["texts"] = ["x" * 90_000] * 4
    response = submit(api, body)
    assert response.status_code == 413


def test_dataset_upload_and_use(api: ApiHarness) -> None:
    text = "First document about ships.\n\nSecond document about the sea.\n\nThird one.\n"
    uploaded = api.client.post(
        "/v1/datasets",
        files={"file": ("notes.txt", text.encode(), "text/plain")},
        headers=api.headers(api.key_a),
    )
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    assert dataset["id"].startswith("ds_")
    assert dataset["num_documents"] == 3
    assert dataset["format"] == "txt"
    body = job_body(calibration={**SMALL_CALIBRATION, "source": dataset["id"]})
    assert submit(api, body).status_code == 202
    # Another tenant cannot use or see it.
    assert submit(api, body, key=api.key_b).status_code == 422
    assert (
        api.client.get(f"/v1/datasets/{dataset['id']}", headers=api.headers(api.key_b)).status_code
        == 404
    )


@pytest.mark.parametrize(
    ("filename", "content", "field"),
    [
        ("data.csv", b"a,b\n", "file"),
        ("data.jsonl", b'{"text": "ok"}\nnot json\n', "file"),
        ("data.jsonl", b'{"body": "no text field"}\n', "file"),
        ("data.txt", b"\xff\xfe\x00bad", "file"),
        ("data.txt", b"\n\n   \n", "file"),
    ],
)
def test_dataset_invalid_file_is_422(
    api: ApiHarness, filename: str, content: bytes, field: str
) -> None:
    response = api.client.post(
        "/v1/datasets",
        files={"file": (filename, content, "application/octet-stream")},
        headers=api.headers(api.key_a),
    )
    assert response.status_code == 422, response.text
    assert field in error_fields(response)


def test_jsonl_dataset_counts_documents(api: ApiHarness) -> None:
    lines = "\n".join(json.dumps({"text": f"document {i}"}) for i in range(5)) + "\n"
    response = api.client.post(
        "/v1/datasets",
        files={"file": ("d.jsonl", lines.encode(), "application/jsonl")},
        headers=api.headers(api.key_a),
    )
    assert response.status_code == 201
    assert response.json()["num_documents"] == 5


def test_list_pagination_and_filters(api: ApiHarness) -> None:
    ids = [
        submit(api, job_body(metadata={"batch": "x" if i < 2 else "y"})).json()["id"]
        for i in range(3)
    ]
    headers = api.headers(api.key_a)
    page = api.client.get("/v1/jobs", params={"limit": 2}, headers=headers).json()
    assert page["object"] == "list"
    assert [job["id"] for job in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True
    rest = api.client.get("/v1/jobs", params={"limit": 2, "after": ids[1]}, headers=headers).json()
    assert [job["id"] for job in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    filtered = api.client.get("/v1/jobs", params={"metadata[batch]": "x"}, headers=headers).json()
    assert {job["id"] for job in filtered["data"]} == {ids[0], ids[1]}
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    cancelled = api.client.get("/v1/jobs", params={"status": "cancelled"}, headers=headers).json()
    assert [job["id"] for job in cancelled["data"]] == [ids[0]]
    assert api.client.get("/v1/jobs", params={"status": "done"}, headers=headers).status_code == 422
    assert api.client.get("/v1/jobs", params={"limit": 0}, headers=headers).status_code == 422
    assert (
        api.client.get("/v1/jobs", params={"after": "job_unknown"}, headers=headers).status_code
        == 422
    )
    assert api.client.get("/v1/jobs", params={"metadata": "x"}, headers=headers).status_code == 422


def test_cancel_queued_job_is_final(api: ApiHarness) -> None:
    headers = api.headers(api.key_a)
    job = submit(api, job_body()).json()
    cancelled = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert again.status_code == 409
    events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()["data"]
    assert [event["status"] for event in events] == ["queued", "cancelled"]


def test_events_pagination(api: ApiHarness) -> None:
    headers = api.headers(api.key_a)
    job = submit(api, job_body()).json()
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    first = api.client.get(
        f"/v1/jobs/{job['id']}/events", params={"limit": 1}, headers=headers
    ).json()
    assert first["has_more"] is True
    assert first["data"][0]["id"].startswith("evt_")
    second = api.client.get(
        f"/v1/jobs/{job['id']}/events",
        params={"limit": 1, "after": first["data"][0]["id"]},
        headers=headers,
    ).json()
    assert second["data"][0]["status"] == "cancelled"
    assert second["has_more"] is False


def test_plan_reports_child_without_queueing(api: ApiHarness) -> None:
    headers = api.headers(api.key_a)
    body = {"parent": "all-minilm-l6-v2", "target": SMALL_TARGET, "options": {"method": "uniform"}}
    response = api.client.post("/v1/plans", json=body, headers=headers)
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["object"] == "plan"
    assert plan["child_shape"]["num_layers"] == 2
    assert 0 < plan["child_parameters"] < plan["parent_parameters"]
    assert plan["memory_estimate"]
    assert api.client.get("/v1/jobs", headers=headers).json()["data"] == []
    bad = api.client.post(
        "/v1/plans", json={**body, "target": {"hidden_size": 1000}}, headers=headers
    )
    assert bad.status_code == 422
    assert "target.hidden_size" in error_fields(bad)


def test_parents_lists_architecture(api: ApiHarness) -> None:
    response = api.client.get("/v1/parents", headers=api.headers(api.key_a))
    assert response.status_code == 200
    parent = {p["id"]: p for p in response.json()["data"]}["all-minilm-l6-v2"]
    assert parent["model_type"] == "bert"
    assert parent["num_layers"] == 6
    assert parent["hidden_size"] == 384
    assert parent["num_attention_heads"] == 12
    assert parent["intermediate_size"] == 1536
    assert 22_000_000 < parent["parameter_count"] < 23_000_000


def test_health_ready_metrics_openapi(api: ApiHarness) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    submit(api, job_body())
    metrics = api.client.get("/metrics").text
    assert 'subclone_jobs{status="queued"} 1.0' in metrics
    assert 'subclone_queue_depth{queue="table"} 1.0' in metrics
    schema = api.client.get("/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/jobs/{job_id}/artifacts.tar",
        "/v1/plans",
        "/v1/parents",
        "/v1/datasets",
    ):
        assert path in schema["paths"], path


def test_unknown_route_is_problem(api: ApiHarness) -> None:
    response = api.client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)


def test_hub_parent_needs_revision(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient
    from svc_helpers import make_settings

    from app.main import create_app

    settings = make_settings(tmp_path / "state", auth_disabled=True, hub_enabled=True)
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/plans", json=job_body(parent="sentence-transformers/all-MiniLM-L6-v2")
        )
        assert response.status_code == 422
        assert "revision" in error_fields(response)
        # A registry parent takes no revision.
        pinned = client.post("/v1/plans", json=job_body(revision="abc123"))
        assert pinned.status_code == 422
        assert "revision" in error_fields(pinned)


def test_dataset_upload_idempotent(api: ApiHarness) -> None:
    headers = {**api.headers(api.key_a), "Idempotency-Key": "upload-1"}
    first = api.client.post(
        "/v1/datasets", files={"file": ("a.txt", b"alpha\n\nbeta\n", "text/plain")}, headers=headers
    )
    again = api.client.post(
        "/v1/datasets", files={"file": ("a.txt", b"alpha\n\nbeta\n", "text/plain")}, headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = api.client.post(
        "/v1/datasets", files={"file": ("a.txt", b"gamma\n", "text/plain")}, headers=headers
    )
    assert other.status_code == 422
    listed = api.client.get("/v1/datasets", headers=api.headers(api.key_a)).json()["data"]
    assert len(listed) == 1
