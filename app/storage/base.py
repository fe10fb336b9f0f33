"""Artifact store contract shared by the local and S3 backends.

A job's artifacts are the files of one child checkpoint directory, stored under
the job id. Publishing is all or nothing: every file is staged, hashed and
copied first, and the manifest (``subclone_manifest.json``) is written last.
The manifest is the publication marker, so a job whose manifest is absent has
no artifacts, whatever else the backend holds for it.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

MANIFEST_NAME = "subclone_manifest.json"

# Chunk size for hashing, copying and streaming file contents.
CHUNK_SIZE = 1024 * 1024

# Job ids are opaque to the store, but they become a directory name or a key
# segment, so they are limited to characters that are safe in both.
_JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_MAX_NAME_LENGTH = 255


class StorageError(Exception):
    """An artifact store operation failed (I/O error, backend unreachable, publish aborted)."""


class ArtifactNotFound(StorageError):
    """The job has no published artifact of that name; the HTTP layer maps it to 404."""


class InvalidArtifactName(ArtifactNotFound):
    """A job id or file name is not a bare name; it is a subclass of ArtifactNotFound, so the API returns 404."""


class RangeNotSatisfiable(StorageError):
    """A byte range lies outside the file; ``size`` is the file's length for a 416 response."""

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size


@dataclass(frozen=True)
class ArtifactFile:
    """One published file: its bare name, its length in bytes and its lowercase hex sha256."""

    name: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` unchanged, or raise InvalidArtifactName if it is unsafe as a path segment."""
    if not isinstance(job_id, str) or not _JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidArtifactName(
            f"invalid job id {job_id!r}: expected 1 to 128 characters from [A-Za-z0-9_-], "
            "starting with a letter or digit"
        )
    return job_id


def validate_artifact_name(name: str) -> str:
    """Return ``name`` unchanged, or raise InvalidArtifactName unless it is a bare file name.

    Rejected: empty names, ``.`` and ``..``, names containing ``/``, ``\\``, NUL or
    other control characters, and names longer than 255 characters. A name
    with a separator would be an absolute or nested path, so it is rejected too.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArtifactName("invalid artifact name: the name is empty")
    if name in (".", ".."):
        raise InvalidArtifactName(f"invalid artifact name {name!r}: not a file name")
    if "/" in name or "\\" in name:
        raise InvalidArtifactName(
            f"invalid artifact name {name!r}: path separators are not allowed, use a bare file name"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidArtifactName(
            f"invalid artifact name {name!r}: control characters are not allowed"
        )
    if len(name) > _MAX_NAME_LENGTH:
        raise InvalidArtifactName(
            f"invalid artifact name: {len(name)} characters, the maximum is {_MAX_NAME_LENGTH}"
        )
    return name


def sha256_file(path: Path) -> str:
    """Return the lowercase hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def list_source_files(source_dir: Path) -> list[Path]:
    """List the regular files of a child checkpoint directory, sorted by name.

    Raises StorageError if the directory is missing, lacks the manifest, or
    contains a subdirectory, a symlink or a file whose name is not a bare name.
    A checkpoint directory is flat, and a symlink could point outside it.
    """
    if not source_dir.is_dir():
        raise StorageError(f"cannot publish {source_dir}: not a directory")

    files: list[Path] = []
    for entry in sorted(source_dir.iterdir(), key=lambda p: p.name):
        if entry.is_symlink():
            raise StorageError(f"cannot publish {source_dir}: {entry.name!r} is a symlink")
        if not entry.is_file():
            raise StorageError(
                f"cannot publish {source_dir}: {entry.name!r} is not a regular file "
                "(a checkpoint directory must be flat)"
            )
        try:
            validate_artifact_name(entry.name)
        except InvalidArtifactName as exc:
            raise StorageError(f"cannot publish {source_dir}: {exc}") from exc
        files.append(entry)

    if not any(path.name == MANIFEST_NAME for path in files):
        raise StorageError(
            f"cannot publish {source_dir}: {MANIFEST_NAME} is missing, "
            "and a job without a manifest has no artifacts"
        )
    return files


def files_from_index(index: dict[str, Any]) -> list[ArtifactFile]:
    """Build the sorted file list from a job's artifact index (``{"files": [{name, size, sha256}]}``)."""
    return sorted(
        (ArtifactFile(item["name"], int(item["size"]), item["sha256"]) for item in index["files"]),
        key=lambda entry: entry.name,
    )


def resolve_range(name: str, size: int, start: int, end: int | None) -> tuple[int, int]:
    """Check an inclusive byte range against a file's size and return it with ``end`` filled in.

    ``end=None`` means the last byte. An ``end`` past the last byte is clamped to
    it, as HTTP allows. A whole-file read of an empty file returns ``(0, -1)``. Raises RangeNotSatisfiable when ``start`` is negative,
    past the end of the file, or greater than ``end``.
    """
    if size == 0 and start == 0 and end is None:
        return 0, -1  # a whole-file read of an empty file: zero bytes, not an error
    last = size - 1
    if end is None or end > last:
        end = last
    if start < 0 or start > last or start > end:
        raise RangeNotSatisfiable(
            f"range {start}-{end} is not satisfiable for {name!r} of {size} bytes", size=size
        )
    return start, end


class ArtifactStore(ABC):
    """Storage of published child checkpoints, written by the worker and read by the API.

    Methods that take a job id or a file name raise InvalidArtifactName (a
    subclass of ArtifactNotFound) for unsafe values, before touching the backend.
    Every backend failure is raised as StorageError.
    """

    @abstractmethod
    def publish(self, job_id: str, source_dir: Path) -> list[ArtifactFile]:
        """Copy every file of ``source_dir`` into the store under ``job_id`` and return them.

        The files are staged, hashed and copied, and the manifest is written last.
        On any failure the staged and partly copied data are deleted and
        StorageError is raised, so the job stays unpublished. Publishing a job
        that already has artifacts raises StorageError.
        """

    @abstractmethod
    def list_files(self, job_id: str) -> list[ArtifactFile]:
        """List a job's published files sorted by name; empty when the job is not published."""

    @abstractmethod
    def open_range(
        self, job_id: str, name: str, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """Stream the bytes ``start`` to ``end`` (inclusive, as in HTTP Range) of a published file.

        ``end=None`` streams to the end of the file. Raises ArtifactNotFound
        before the first chunk if the file is not published, and
        RangeNotSatisfiable if the range lies outside it.
        """

    @abstractmethod
    def presigned_url(self, job_id: str, name: str, expires_s: int | None = None) -> str | None:
        """Return a time-limited download URL for a published file, or None if the backend has none.

        Call it only after the caller's ownership check: anyone holding the URL can
        download the file until it expires.
        """

    @abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Delete all data of a job, manifest first so that it reads as unpublished at once.

        Deleting a job that has no data is not an error.
        """

    @abstractmethod
    def delete_older_than(self, cutoff: datetime) -> int:
        """Delete jobs published before ``cutoff`` (an aware datetime) and return how many.

        Staging leftovers of interrupted publishes older than ``cutoff`` are
        deleted too, but not counted.
        """

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the backend is reachable and writable (readiness probe)."""

    def prepare(self) -> None:
        """Create what the backend needs before first use; by default nothing."""
        return None

    def stat(self, job_id: str, name: str) -> ArtifactFile:
        """Return one published file's entry, or raise ArtifactNotFound."""
        validate_artifact_name(name)
        for entry in self.list_files(job_id):
            if entry.name == name:
                return entry
        raise ArtifactNotFound(f"job {job_id!r} has no published artifact {name!r}")
