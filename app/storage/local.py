"""Artifact store on a local or mounted filesystem.

Layout under ``root``::

    .staging/<job>-<random>/   a publish in progress
    .trash/<job>-<random>/     a delete in progress
    <job>/files/<name>         published files
    <job>/index.json           name, size and sha256 of every file, and the publication time

A publish fills a staging directory and renames it to ``<job>`` with
``os.replace``, so a job appears whole or not at all. The rename is atomic
only within one filesystem, and staging is inside ``root`` for that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

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
    validate_artifact_name,
    validate_job_id,
)

logger = logging.getLogger(__name__)

_STAGING_DIR = ".staging"
_TRASH_DIR = ".trash"
_FILES_DIR = "files"
_INDEX_NAME = "index.json"


class LocalArtifactStore(ArtifactStore):
    """Artifact store in a directory; downloads are streamed by the API, so there are no presigned URLs."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- paths -----------------------------------------------------------------

    @property
    def _staging(self) -> Path:
        return self.root / _STAGING_DIR

    @property
    def _trash(self) -> Path:
        return self.root / _TRASH_DIR

    def _job_dir(self, job_id: str) -> Path:
        return self.root / validate_job_id(job_id)

    # -- setup and readiness ---------------------------------------------------

    def prepare(self) -> None:
        """Create the root, staging and trash directories if they are missing."""
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
            self._trash.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create artifact root {self.root}: {exc}") from exc

    def check(self) -> None:
        """Raise StorageError unless a file can be written and removed under the root."""
        probe = self._staging / f".probe-{secrets.token_hex(8)}"
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"artifact root {self.root} is not writable: {exc}") from exc

    # -- publish ---------------------------------------------------------------

    def publish(self, job_id: str, source_dir: Path) -> list[ArtifactFile]:
        validate_job_id(job_id)
        source_dir = Path(source_dir)
        sources = list_source_files(source_dir)
        # The manifest goes last so that it is the final file written.
        sources.sort(key=lambda path: path.name == MANIFEST_NAME)

        final_dir = self._job_dir(job_id)
        if final_dir.exists():
            raise StorageError(
                f"job {job_id!r} is already published; delete it before publishing again"
            )

        self.prepare()
        staging_dir = self._staging / f"{job_id}-{secrets.token_hex(8)}"
        try:
            files_dir = staging_dir / _FILES_DIR
            files_dir.mkdir(parents=True)
            entries = [_copy_and_hash(path, files_dir / path.name) for path in sources]
            index = {
                "job_id": job_id,
                "published_at": datetime.now(UTC).isoformat(),
                "files": [entry.as_dict() for entry in entries],
            }
            _write_synced(staging_dir / _INDEX_NAME, json.dumps(index, indent=2).encode())
            _fsync_dir(files_dir)
            _fsync_dir(staging_dir)
            # os.replace fails if final_dir appeared meanwhile and is not empty,
            # so a concurrent publish of the same job cannot be overwritten.
            os.replace(staging_dir, final_dir)
            _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise StorageError(
                f"publishing job {job_id!r} from {source_dir} failed: {exc}"
            ) from exc
        except BaseException:
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise

        total = sum(entry.size for entry in entries)
        logger.info("published job %s: %d files, %d bytes", job_id, len(entries), total)
        return sorted(entries, key=lambda entry: entry.name)

    # -- read ------------------------------------------------------------------

    def list_files(self, job_id: str) -> list[ArtifactFile]:
        job_dir = self._job_dir(job_id)
        if not (job_dir / _FILES_DIR / MANIFEST_NAME).is_file():
            return []
        index = self._read_index(job_dir)
        return files_from_index(index)

    def open_range(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        entry = self.stat(job_id, name)
        first, last = resolve_range(name, entry.size, start, end)
        path = self._job_dir(job_id) / _FILES_DIR / validate_artifact_name(name)
        try:
            # Opened here, not in the generator, so that a missing file raises
            # before the caller sends a status line. An open handle also keeps
            # streaming if the job is deleted meanwhile.
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"job {job_id!r} has no published artifact {name!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open artifact {name!r} of job {job_id!r}: {exc}") from exc
        return _stream(handle, first, last - first + 1)

    def presigned_url(self, job_id: str, name: str, expires_s: int | None = None) -> str | None:
        self.stat(job_id, name)
        return None

    # -- delete ----------------------------------------------------------------

    def delete_job(self, job_id: str) -> None:
        job_dir = self._job_dir(job_id)
        if not job_dir.exists():
            return
        self.prepare()
        doomed = self._trash / f"{job_id}-{secrets.token_hex(8)}"
        try:
            # The rename unpublishes the job atomically; the removal can then take its time.
            os.replace(job_dir, doomed)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"deleting job {job_id!r} failed: {exc}") from exc
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("deleted artifacts of job %s", job_id)

    def delete_older_than(self, cutoff: datetime) -> int:
        if cutoff.tzinfo is None:
            raise ValueError("cutoff must be a timezone-aware datetime")
        if not self.root.is_dir():
            return 0

        deleted = 0
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            published_at = self._published_at(entry)
            if published_at is not None and published_at < cutoff:
                self.delete_job(entry.name)
                deleted += 1

        for leftovers in (self._staging, self._trash):
            self._remove_stale(leftovers, cutoff)
        return deleted

    # -- helpers ---------------------------------------------------------------

    def _read_index(self, job_dir: Path) -> dict:
        try:
            return json.loads((job_dir / _INDEX_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise StorageError(f"artifact index of {job_dir.name!r} is unreadable: {exc}") from exc

    def _published_at(self, job_dir: Path) -> datetime | None:
        """Return a job directory's publication time, or its mtime if its index is unreadable."""
        try:
            validate_job_id(job_dir.name)
        except ArtifactNotFound:
            logger.warning(
                "skipping unexpected directory %s in the artifact root: not a job id", job_dir
            )
            return None
        try:
            return datetime.fromisoformat(self._read_index(job_dir)["published_at"])
        except (StorageError, KeyError, ValueError):
            logger.warning(
                "job directory %s has no valid index; using its mtime for retention", job_dir
            )
            return datetime.fromtimestamp(job_dir.stat().st_mtime, UTC)

    def _remove_stale(self, parent: Path, cutoff: datetime) -> None:
        if not parent.is_dir():
            return
        for entry in parent.iterdir():
            try:
                modified = datetime.fromtimestamp(entry.stat().st_mtime, UTC)
            except FileNotFoundError:
                continue
            if modified < cutoff:
                logger.info("removing leftover %s", entry)
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _copy_and_hash(source: Path, target: Path) -> ArtifactFile:
    """Copy one file, hashing the bytes written, and flush it to disk."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, target.open("xb") as writer:
        while chunk := reader.read(CHUNK_SIZE):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return ArtifactFile(name=target.name, size=size, sha256=digest.hexdigest())


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as writer:
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stream(handle: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    with handle:
        handle.seek(offset)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise StorageError(f"artifact ended {remaining} bytes early while streaming")
            remaining -= len(chunk)
            yield chunk
