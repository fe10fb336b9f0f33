"""Contract tests of the artifact stores, run on the local backend and on a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError
from fixtures_s3 import SeaweedFS

from app.storage import (
    MANIFEST_NAME,
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactName,
    LocalArtifactStore,
    RangeNotSatisfiable,
    S3ArtifactStore,
    StorageError,
    build_store,
)
from app.storage import local as local_module

BAD_NAMES = [
    "",
    ".",
    "..",
    "../config.json",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "tab\tname",
    "x" * 256,
]
BAD_JOB_IDS = ["", "..", "../job", "job/x", "job\x00", "-leading-dash", "job id", "j" * 129]


def make_child(directory: Path, *, weights_bytes: int = 3 * 1024 * 1024 + 17) -> dict[str, bytes]:
    """Write a small checkpoint directory; the weights span several streaming chunks."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {
        "config.json": json.dumps({"model_type": "bert", "hidden_size": 32}).encode(),
        "model.safetensors": os.urandom(weights_bytes),
        "tokenizer.json": b'{"version": "1.0"}',
        "empty.txt": b"",
        MANIFEST_NAME: json.dumps({"format": "subclone", "job_id": "test"}).encode(),
    }
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return contents


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Backend:
    """A store under test, with what the backend-specific checks need."""

    def __init__(self, kind: str, store: ArtifactStore, *, timestamp_resolution_s: float) -> None:
        self.kind = kind
        self.store = store
        self.timestamp_resolution_s = timestamp_resolution_s

    def leftovers(self) -> list[str]:
        """Everything the store holds, as relative paths or keys."""
        if isinstance(self.store, LocalArtifactStore):
            root = self.store.root
            return (
                sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                if root.exists()
                else []
            )
        assert isinstance(self.store, S3ArtifactStore)
        return sorted(item["Key"] for item in self.store._list(self.store.prefix))


@pytest.fixture(scope="module")
def s3_client(seaweedfs: SeaweedFS):  # noqa: ANN201 - a boto3 client has no importable type
    """One boto3 client for the module, because building one takes about 0.3 s."""
    return seaweedfs.client()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        store = LocalArtifactStore(tmp_path / "artifacts")
        store.prepare()
        return Backend("local", store, timestamp_resolution_s=0.01)

    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    store = S3ArtifactStore(
        bucket=server.bucket,
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        # A prefix per test keeps tests apart in the shared bucket.
        prefix=f"test-{uuid.uuid4().hex}",
        presign_expiry=60,
        client=request.getfixturevalue("s3_client"),
    )
    # S3 LastModified has a resolution of one second.
    return Backend("s3", store, timestamp_resolution_s=1.1)


# -- publish and list ---------------------------------------------------------------


def test_publish_returns_hashes(backend: Backend, tmp_path: Path) -> None:
    contents = make_child(tmp_path / "child")
    files = backend.store.publish("job_one", tmp_path / "child")

    assert [f.name for f in files] == sorted(contents)
    for entry in files:
        assert entry.size == len(contents[entry.name])
        assert entry.sha256 == sha256(contents[entry.name])


def test_list_files_matches_publish(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    published = backend.store.publish("job_one", tmp_path / "child")

    assert backend.store.list_files("job_one") == published
    assert backend.store.stat("job_one", "config.json") in published


def test_unpublished_job_has_no_files(backend: Backend) -> None:
    assert backend.store.list_files("job_missing") == []
    with pytest.raises(ArtifactNotFound):
        backend.store.stat("job_missing", "config.json")
    with pytest.raises(ArtifactNotFound):
        backend.store.open_range("job_missing", "config.json")


def test_publish_twice_rejected(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    with pytest.raises(StorageError, match="already published"):
        backend.store.publish("job_one", tmp_path / "child")
    assert len(backend.store.list_files("job_one")) == 5


def test_publish_without_manifest_rejected(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    (tmp_path / "child" / MANIFEST_NAME).unlink()

    with pytest.raises(StorageError, match=MANIFEST_NAME):
        backend.store.publish("job_one", tmp_path / "child")
    assert backend.store.list_files("job_one") == []
    assert backend.leftovers() == []


@pytest.mark.parametrize("extra", ["subdirectory", "symlink"])
def test_publish_rejects_non_flat_source(backend: Backend, tmp_path: Path, extra: str) -> None:
    make_child(tmp_path / "child")
    if extra == "subdirectory":
        (tmp_path / "child" / "nested").mkdir()
    else:
        (tmp_path / "outside").write_text("secret")
        (tmp_path / "child" / "link.json").symlink_to(tmp_path / "outside")

    with pytest.raises(StorageError, match="symlink|not a regular file"):
        backend.store.publish("job_one", tmp_path / "child")
    assert backend.leftovers() == []


def test_failed_publish_leaves_nothing(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_child(tmp_path / "child")
    store = backend.store

    if isinstance(store, LocalArtifactStore):
        real_copy = local_module._copy_and_hash

        def failing_copy(source: Path, target: Path):
            if source.name == MANIFEST_NAME:
                raise OSError(28, "No space left on device")
            return real_copy(source, target)

        monkeypatch.setattr(local_module, "_copy_and_hash", failing_copy)
    else:
        assert isinstance(store, S3ArtifactStore)
        real_copy = store._client.copy

        # Fails on the manifest, after every other file has reached its final key.
        def failing_copy(source: dict, bucket: str, key: str, **kwargs):
            if key.endswith(MANIFEST_NAME):
                raise ClientError(
                    {"Error": {"Code": "InternalError", "Message": "injected"}}, "CopyObject"
                )
            return real_copy(source, bucket, key, **kwargs)

        monkeypatch.setattr(store._client, "copy", failing_copy)

    with pytest.raises(StorageError, match="job_one"):
        store.publish("job_one", tmp_path / "child")

    assert store.list_files("job_one") == []
    assert backend.leftovers() == []


# -- reading ranges --------------------------------------------------------------------


def test_open_range_whole_file(backend: Backend, tmp_path: Path) -> None:
    contents = make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    chunks = list(backend.store.open_range("job_one", "model.safetensors"))

    assert len(chunks) > 1
    assert b"".join(chunks) == contents["model.safetensors"]


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 0), (10, 99), (1024 * 1024 - 3, 1024 * 1024 + 5), (3 * 1024 * 1024, None)],
)
def test_open_range_partial(backend: Backend, tmp_path: Path, start: int, end: int | None) -> None:
    contents = make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")
    weights = contents["model.safetensors"]

    data = b"".join(backend.store.open_range("job_one", "model.safetensors", start, end))

    expected = weights[start:] if end is None else weights[start : end + 1]
    assert data == expected


def test_open_range_clamps_end(backend: Backend, tmp_path: Path) -> None:
    contents = make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    data = b"".join(backend.store.open_range("job_one", "config.json", 5, 10**9))

    assert data == contents["config.json"][5:]


def test_open_range_empty_file(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    assert b"".join(backend.store.open_range("job_one", "empty.txt")) == b""
    with pytest.raises(RangeNotSatisfiable):
        backend.store.open_range("job_one", "empty.txt", 0, 0)


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (10**9, None), (20, 10)])
def test_open_range_unsatisfiable(
    backend: Backend, tmp_path: Path, start: int, end: int | None
) -> None:
    contents = make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    with pytest.raises(RangeNotSatisfiable) as info:
        backend.store.open_range("job_one", "config.json", start, end)
    assert info.value.size == len(contents["config.json"])


def test_open_range_unknown_name(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    with pytest.raises(ArtifactNotFound):
        backend.store.open_range("job_one", "pytorch_model.bin")


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_artifact_names_rejected(backend: Backend, name: str) -> None:
    # InvalidArtifactName, not only ArtifactNotFound, shows the name was checked before any lookup.
    with pytest.raises(InvalidArtifactName):
        backend.store.open_range("job_one", name)
    with pytest.raises(InvalidArtifactName):
        backend.store.stat("job_one", name)
    with pytest.raises(InvalidArtifactName):
        backend.store.presigned_url("job_one", name)


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_bad_job_ids_rejected(backend: Backend, tmp_path: Path, job_id: str) -> None:
    make_child(tmp_path / "child")

    with pytest.raises(InvalidArtifactName):
        backend.store.publish(job_id, tmp_path / "child")
    with pytest.raises(InvalidArtifactName):
        backend.store.list_files(job_id)
    with pytest.raises(InvalidArtifactName):
        backend.store.delete_job(job_id)
    assert backend.leftovers() == []


def test_invalid_name_is_not_found() -> None:
    # The API maps ArtifactNotFound to 404, so a bad name must not reveal more than a missing one.
    assert issubclass(InvalidArtifactName, ArtifactNotFound)


# -- delete and retention --------------------------------------------------------------


def test_delete_job(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")
    backend.store.publish("job_two", tmp_path / "child")

    backend.store.delete_job("job_one")

    assert backend.store.list_files("job_one") == []
    assert len(backend.store.list_files("job_two")) == 5
    backend.store.delete_job("job_one")  # deleting again is not an error


def test_retention_deletes_old_jobs(backend: Backend, tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    backend.store.publish("job_old", tmp_path / "child")
    time.sleep(backend.timestamp_resolution_s)
    cutoff = datetime.now(UTC)
    time.sleep(backend.timestamp_resolution_s)
    backend.store.publish("job_new", tmp_path / "child")

    assert backend.store.delete_older_than(cutoff - timedelta(hours=1)) == 0
    assert backend.store.delete_older_than(cutoff) == 1

    assert backend.store.list_files("job_old") == []
    assert len(backend.store.list_files("job_new")) == 5
    assert not any("job_old" in item for item in backend.leftovers())


def test_retention_removes_stale_staging(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    if isinstance(store, LocalArtifactStore):
        stale = store.root / ".staging" / "job_crashed-0123"
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"partial")
        old = time.time() - 3600
        os.utime(stale, (old, old))
        cutoff = datetime.now(UTC) - timedelta(minutes=1)
    else:
        assert isinstance(store, S3ArtifactStore)
        store._client.put_object(
            Bucket=store.bucket,
            Key=f"{store.prefix}staging/job_crashed-0123/model.safetensors",
            Body=b"partial",
        )
        # Object times cannot be set back, so the cutoff moves forward instead.
        cutoff = datetime.now(UTC) + timedelta(minutes=1)

    assert store.delete_older_than(cutoff) == 0
    assert backend.leftovers() == []


def test_retention_requires_aware_cutoff(backend: Backend) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        backend.store.delete_older_than(datetime.now())


# -- presigned URLs and readiness ------------------------------------------------------


def test_presigned_url(backend: Backend, tmp_path: Path) -> None:
    contents = make_child(tmp_path / "child")
    backend.store.publish("job_one", tmp_path / "child")

    url = backend.store.presigned_url("job_one", "model.safetensors", 60)

    if backend.kind == "local":
        assert url is None
        return
    assert url is not None
    assert url.startswith(backend.store._client.meta.endpoint_url)  # type: ignore[attr-defined]
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert sha256(response.content) == sha256(contents["model.safetensors"])
    assert "attachment" in response.headers.get("content-disposition", "")


def test_presigned_url_unpublished(backend: Backend) -> None:
    with pytest.raises(ArtifactNotFound):
        backend.store.presigned_url("job_missing", "config.json")


def test_check_passes(backend: Backend) -> None:
    backend.store.check()
    assert backend.leftovers() == []


# -- backend-specific ------------------------------------------------------------------


def test_presigned_url_expires(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    store = build_store(
        backend="s3",
        s3_bucket=seaweedfs.bucket,
        s3_endpoint_url=seaweedfs.endpoint_url,
        s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key,
        s3_prefix=f"test-{uuid.uuid4().hex}",
    )
    make_child(tmp_path / "child")
    store.publish("job_one", tmp_path / "child")

    url = store.presigned_url("job_one", "config.json", expires_s=1)
    assert url is not None
    time.sleep(2.1)

    assert httpx.get(url, timeout=10).status_code == 403


def test_presigned_url_public_endpoint(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    store = S3ArtifactStore(
        bucket=seaweedfs.bucket,
        endpoint_url=seaweedfs.endpoint_url,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        prefix=f"test-{uuid.uuid4().hex}",
        public_endpoint_url="https://downloads.example.test",
    )
    make_child(tmp_path / "child")
    store.publish("job_one", tmp_path / "child")

    url = store.presigned_url("job_one", "config.json")

    assert url is not None
    assert url.startswith("https://downloads.example.test/")


def test_s3_check_wrong_secret(seaweedfs: SeaweedFS) -> None:
    store = S3ArtifactStore(
        bucket=seaweedfs.bucket,
        endpoint_url=seaweedfs.endpoint_url,
        access_key=seaweedfs.access_key,
        secret_key="not-the-secret",
    )
    with pytest.raises(StorageError, match="not reachable or not writable"):
        store.check()


def test_s3_check_missing_bucket(seaweedfs: SeaweedFS) -> None:
    store = S3ArtifactStore(
        bucket=f"missing-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweedfs.endpoint_url,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
    )
    with pytest.raises(StorageError):
        store.check()


def test_s3_prepare_creates_bucket(seaweedfs: SeaweedFS) -> None:
    store = S3ArtifactStore(
        bucket=f"created-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweedfs.endpoint_url,
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        create_bucket=True,
    )
    store.prepare()
    store.prepare()  # a second call finds the bucket and does nothing

    store.check()


def test_local_check_unwritable_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = LocalArtifactStore(tmp_path / "file")

    with pytest.raises(StorageError, match="not writable"):
        store.check()


def test_local_publish_is_atomic_directory(tmp_path: Path) -> None:
    make_child(tmp_path / "child")
    store = LocalArtifactStore(tmp_path / "artifacts")

    store.publish("job_one", tmp_path / "child")

    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [
        ".staging",
        ".trash",
        "job_one",
    ]
    assert list((tmp_path / "artifacts" / ".staging").iterdir()) == []
    index = json.loads((tmp_path / "artifacts" / "job_one" / "index.json").read_text())
    assert datetime.fromisoformat(index["published_at"]).tzinfo is not None
