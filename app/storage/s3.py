"""Artifact store in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW).

Key layout under ``prefix``::

    staging/<job>-<random>/<name>    uploads of a publish in progress
    jobs/<job>/files/<name>          published files
    jobs/<job>/index.json            name, size and sha256 of every file

S3 has no atomic rename, so a publish uploads to staging keys, copies them to
their final keys, writes the index, and copies the manifest last. Readers
treat a job as published only once its manifest key exists, and a delete
removes the manifest first.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.base import (
    CHUNK_SIZE,
    MANIFEST_NAME,
    ArtifactFile,
    ArtifactNotFound,
    ArtifactStore,
    StorageError,
    files_from_index,
    list_source_files,
    resolve_range,
    sha256_file,
    validate_artifact_name,
    validate_job_id,
)

logger = logging.getLogger(__name__)

# SigV4 presigned URLs are valid for at most 7 days.
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600

# DeleteObjects accepts at most 1000 keys per request.
_DELETE_BATCH = 1000

# Parts of 64 MiB keep a 10 GB shard well under S3's limit of 10,000 parts.
_TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024
)

_BACKEND_ERRORS = (ClientError, BotoCoreError, OSError)


class S3ArtifactStore(ArtifactStore):
    """Artifact store in one bucket; downloads can go straight to the bucket through presigned URLs.

    ``endpoint_url`` is None for AWS S3. ``public_endpoint_url``, when set, is
    the endpoint written into presigned URLs, for deployments where clients
    reach the bucket under another host name than the service does. Without
    ``access_key`` and ``secret_key``, boto3's default credential chain applies.
    ``client`` replaces the boto3 S3 client built from these arguments, so that
    several stores can share one. It also signs presigned URLs unless
    ``public_endpoint_url`` is set.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
        presign_expiry: int = 300,
        *,
        public_endpoint_url: str | None = None,
        create_bucket: bool = False,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must be a non-empty bucket name")
        if not 1 <= presign_expiry <= MAX_PRESIGN_EXPIRY_S:
            raise ValueError(
                f"presign_expiry={presign_expiry} is out of range: expected 1 to {MAX_PRESIGN_EXPIRY_S} seconds"
            )
        self.bucket = bucket
        self.region = region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.presign_expiry = presign_expiry
        self.create_bucket = create_bucket
        self._client = client or _make_client(endpoint_url, region, access_key, secret_key)
        if public_endpoint_url and public_endpoint_url != endpoint_url:
            self._presign_client = _make_client(public_endpoint_url, region, access_key, secret_key)
        else:
            self._presign_client = self._client

    # -- keys ------------------------------------------------------------------

    def _job_prefix(self, job_id: str) -> str:
        return f"{self.prefix}jobs/{validate_job_id(job_id)}/"

    def _file_key(self, job_id: str, name: str) -> str:
        return f"{self._job_prefix(job_id)}files/{validate_artifact_name(name)}"

    def _index_key(self, job_id: str) -> str:
        return f"{self._job_prefix(job_id)}index.json"

    # -- setup and readiness ---------------------------------------------------

    def prepare(self) -> None:
        """Create the bucket when ``create_bucket`` is set and it does not exist yet."""
        if not self.create_bucket:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"checking bucket {self.bucket!r} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"checking bucket {self.bucket!r} failed: {exc}") from exc

        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"creating bucket {self.bucket!r} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"creating bucket {self.bucket!r} failed: {exc}") from exc
        logger.info("created bucket %s", self.bucket)

    def check(self) -> None:
        """Raise StorageError unless the bucket exists and a probe object can be written and deleted."""
        probe = f"{self.prefix}staging/.probe-{secrets.token_hex(8)}"
        try:
            self._client.head_bucket(Bucket=self.bucket)
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            self._client.delete_object(Bucket=self.bucket, Key=probe)
        except _BACKEND_ERRORS as exc:
            raise StorageError(
                f"bucket {self.bucket!r} is not reachable or not writable: {exc}"
            ) from exc

    # -- publish ---------------------------------------------------------------

    def publish(self, job_id: str, source_dir: Path) -> list[ArtifactFile]:
        validate_job_id(job_id)
        source_dir = Path(source_dir)
        sources = list_source_files(source_dir)
        # The manifest goes last so that it is the final key written.
        sources.sort(key=lambda path: path.name == MANIFEST_NAME)

        if self._published(job_id):
            raise StorageError(
                f"job {job_id!r} is already published; delete it before publishing again"
            )

        staging_prefix = f"{self.prefix}staging/{job_id}-{secrets.token_hex(8)}/"
        staged: list[str] = []
        finished: list[str] = []
        try:
            entries = []
            for path in sources:
                key = staging_prefix + path.name
                staged.append(key)
                entries.append(self._upload_verified(path, key))

            for entry in entries:
                if entry.name == MANIFEST_NAME:
                    continue
                target = self._file_key(job_id, entry.name)
                finished.append(target)
                self._copy(staging_prefix + entry.name, target)

            index = {
                "job_id": job_id,
                "published_at": datetime.now(UTC).isoformat(),
                "files": [entry.as_dict() for entry in entries],
            }
            finished.append(self._index_key(job_id))
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._index_key(job_id),
                Body=json.dumps(index, indent=2).encode(),
                ContentType="application/json",
            )

            manifest_key = self._file_key(job_id, MANIFEST_NAME)
            finished.append(manifest_key)
            self._copy(staging_prefix + MANIFEST_NAME, manifest_key)
        except BaseException as exc:
            # Manifest first, so readers stop seeing the job before the rest goes.
            self._delete_keys_quietly(list(reversed(finished)) + staged)
            if isinstance(exc, _BACKEND_ERRORS):
                raise StorageError(
                    f"publishing job {job_id!r} to bucket {self.bucket!r} failed: {exc}"
                ) from exc
            raise

        self._delete_keys_quietly(staged)
        total = sum(entry.size for entry in entries)
        logger.info(
            "published job %s to bucket %s: %d files, %d bytes",
            job_id,
            self.bucket,
            len(entries),
            total,
        )
        return sorted(entries, key=lambda entry: entry.name)

    def _upload_verified(self, path: Path, key: str) -> ArtifactFile:
        """Upload one file and check that the stored object has the local file's length."""
        sha256 = sha256_file(path)
        size = path.stat().st_size
        content_type = "application/json" if path.suffix == ".json" else "application/octet-stream"
        self._client.upload_file(
            str(path),
            self.bucket,
            key,
            ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
            Config=_TRANSFER,
        )
        stored = self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        if stored != size:
            raise StorageError(
                f"uploaded {path.name!r} has {stored} bytes in the bucket, expected {size}"
            )
        return ArtifactFile(name=path.name, size=size, sha256=sha256)

    def _copy(self, source_key: str, target_key: str) -> None:
        # The managed copy switches to multipart copy above the threshold, because
        # a single CopyObject is limited to 5 GB.
        self._client.copy(
            {"Bucket": self.bucket, "Key": source_key}, self.bucket, target_key, Config=_TRANSFER
        )

    # -- read ------------------------------------------------------------------

    def _published(self, job_id: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._file_key(job_id, MANIFEST_NAME))
            return True
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(
                f"reading job {job_id!r} from bucket {self.bucket!r} failed: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"reading job {job_id!r} from bucket {self.bucket!r} failed: {exc}"
            ) from exc

    def list_files(self, job_id: str) -> list[ArtifactFile]:
        if not self._published(job_id):
            return []
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._index_key(job_id))["Body"]
            with body:
                index = json.loads(body.read())
        except (*_BACKEND_ERRORS, ValueError) as exc:
            raise StorageError(f"artifact index of job {job_id!r} is unreadable: {exc}") from exc
        return files_from_index(index)

    def open_range(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        entry = self.stat(job_id, name)
        first, last = resolve_range(name, entry.size, start, end)
        if last < first:
            return iter(())
        try:
            # Requested here, not in the generator, so that errors raise before
            # the caller sends a status line.
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._file_key(job_id, name), Range=f"bytes={first}-{last}"
            )
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactNotFound(
                    f"job {job_id!r} has no published artifact {name!r}"
                ) from exc
            raise StorageError(
                f"reading artifact {name!r} of job {job_id!r} failed: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"reading artifact {name!r} of job {job_id!r} failed: {exc}"
            ) from exc
        return _stream_body(response["Body"])

    def presigned_url(self, job_id: str, name: str, expires_s: int | None = None) -> str | None:
        expires = self.presign_expiry if expires_s is None else expires_s
        if not 1 <= expires <= MAX_PRESIGN_EXPIRY_S:
            raise ValueError(
                f"expires_s={expires} is out of range: expected 1 to {MAX_PRESIGN_EXPIRY_S} seconds"
            )
        self.stat(job_id, name)
        params = {
            "Bucket": self.bucket,
            "Key": self._file_key(job_id, name),
            "ResponseContentDisposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
        }
        try:
            return self._presign_client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires
            )
        except _BACKEND_ERRORS as exc:
            raise StorageError(
                f"presigning artifact {name!r} of job {job_id!r} failed: {exc}"
            ) from exc

    # -- delete ----------------------------------------------------------------

    def delete_job(self, job_id: str) -> None:
        manifest_key = self._file_key(job_id, MANIFEST_NAME)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=manifest_key)
            keys = [item["Key"] for item in self._list(self._job_prefix(job_id))]
            self._delete_keys(keys)
        except _BACKEND_ERRORS as exc:
            raise StorageError(
                f"deleting job {job_id!r} from bucket {self.bucket!r} failed: {exc}"
            ) from exc
        logger.info("deleted artifacts of job %s from bucket %s", job_id, self.bucket)

    def delete_older_than(self, cutoff: datetime) -> int:
        if cutoff.tzinfo is None:
            raise ValueError("cutoff must be a timezone-aware datetime")

        jobs_prefix = f"{self.prefix}jobs/"
        manifest_suffix = f"/files/{MANIFEST_NAME}"
        published_at: dict[str, datetime] = {}
        newest_key: dict[str, datetime] = {}
        try:
            for item in self._list(jobs_prefix):
                job_id = item["Key"][len(jobs_prefix) :].split("/", 1)[0]
                modified = item["LastModified"]
                if item["Key"].endswith(manifest_suffix):
                    published_at[job_id] = modified
                newest_key[job_id] = max(modified, newest_key.get(job_id, modified))

            deleted = 0
            for job_id, newest in sorted(newest_key.items()):
                if job_id in published_at:
                    if published_at[job_id] < cutoff:
                        self.delete_job(job_id)
                        deleted += 1
                elif newest < cutoff:
                    # Keys of an interrupted publish or delete that never got a manifest.
                    logger.info("removing unpublished leftovers of job %s", job_id)
                    self.delete_job(job_id)

            stale = [
                item["Key"]
                for item in self._list(f"{self.prefix}staging/")
                if item["LastModified"] < cutoff
            ]
            self._delete_keys(stale)
        except _BACKEND_ERRORS as exc:
            raise StorageError(
                f"retention cleanup in bucket {self.bucket!r} failed: {exc}"
            ) from exc
        return deleted

    # -- helpers ---------------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete_keys(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        response = self._client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"deleting {len(errors)} of {len(keys)} keys failed, first {first.get('Key')!r}: "
                f"{first.get('Code')} {first.get('Message')}"
            )

    def _delete_keys_quietly(self, keys: list[str]) -> None:
        """Delete keys while unwinding a failed publish, logging rather than raising."""
        try:
            self._delete_keys(keys)
        except (*_BACKEND_ERRORS, StorageError) as exc:
            logger.error(
                "cleanup after a failed publish left keys in bucket %s: %s", self.bucket, exc
            )


def _make_client(
    endpoint_url: str | None, region: str, access_key: str | None, secret_key: str | None
) -> Any:
    config = Config(
        signature_version="s3v4",
        # Self-hosted servers such as SeaweedFS and MinIO have no per-bucket DNS names,
        # so they need path-style addressing. AWS chooses its own style.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _stream_body(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_SIZE)
    except _BACKEND_ERRORS as exc:
        raise StorageError(f"streaming an artifact from the bucket failed: {exc}") from exc
    finally:
        body.close()
