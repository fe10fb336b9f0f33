"""Artifacts of a succeeded job: the file list, single-file downloads with ranges, and one tar of the whole child."""

from __future__ import annotations

import logging
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.api.deps import ContextDep, SessionDep, TenantDep
from app.api.routes.jobs import PROBLEMS
from app.api.schemas import ArtifactList
from app.context import ServiceContext
from app.core.errors import Conflict, NotFound, RangeNotSatisfiable
from app.db.models import Job
from app.jobs import lifecycle
from app.jobs.service import get_job
from app.storage import ArtifactFile, validate_artifact_name

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
TAR_BLOCK = tarfile.BLOCKSIZE  # 512 bytes; tar pads every member to a multiple of it


def _published_job(session: Any, tenant_id: str, job_id: str) -> Job:
    job = get_job(session, tenant_id, job_id)
    if job.status != lifecycle.SUCCEEDED or not job.artifacts_published:
        raise Conflict(f"job {job_id} is {job.status}; only succeeded jobs have artifacts")
    if job.artifacts_deleted_at is not None:
        raise NotFound(f"artifacts of job {job_id} were deleted by the retention policy")
    return job


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=PROBLEMS)
def list_artifacts(
    job_id: str, ctx: ContextDep, session: SessionDep, tenant_id: TenantDep
) -> dict[str, Any]:
    """List the child's files with their size and sha256."""
    _published_job(session, tenant_id, job_id)
    files = ctx.store.list_files(job_id)
    return {
        "object": "list",
        "data": [
            {
                **entry.as_dict(),
                "object": "artifact",
                "url": f"/v1/jobs/{job_id}/artifacts/{entry.name}",
            }
            for entry in files
        ],
        "has_more": False,
    }


@router.get("/{job_id}/artifacts.tar", responses=PROBLEMS, response_class=StreamingResponse)
def download_tar(
    job_id: str, ctx: ContextDep, session: SessionDep, tenant_id: TenantDep
) -> StreamingResponse:
    """Stream every file of the child as one uncompressed tar, under a directory named after the job."""
    _published_job(session, tenant_id, job_id)
    files = ctx.store.list_files(job_id)
    length = sum(_tar_member_size(job_id, entry) for entry in files) + 2 * TAR_BLOCK
    return StreamingResponse(
        _stream_tar(ctx, job_id, files),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{job_id}.tar"',
        },
    )


@router.get("/{job_id}/artifacts/{name}", responses=PROBLEMS, response_class=StreamingResponse)
@router.head("/{job_id}/artifacts/{name}", include_in_schema=False)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    tenant_id: TenantDep,
) -> Response:
    """Download one file. ETag is the sha256; Range and If-Range are honoured; S3 storage redirects to a presigned URL."""
    validate_artifact_name(name)
    _published_job(session, tenant_id, job_id)
    entry = ctx.store.stat(job_id, name)
    presigned = ctx.store.presigned_url(job_id, name)
    if presigned is not None:
        return RedirectResponse(presigned, status_code=307, headers={"Cache-Control": "no-store"})

    etag = f'"{entry.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{entry.name}"',
        "Cache-Control": "private, max-age=0",
    }
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)

    byte_range = _requested_range(request, etag, entry.size)
    if byte_range is None:
        start, end, status = 0, entry.size - 1, 200
    else:
        start, end = byte_range
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
    headers["Content-Length"] = str(max(end - start + 1, 0))
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    body = ctx.store.open_range(job_id, name, start, None if entry.size == 0 else end)
    return StreamingResponse(
        body, status_code=status, headers=headers, media_type="application/octet-stream"
    )


def _requested_range(request: Request, etag: str, size: int) -> tuple[int, int] | None:
    """Parse a single-range ``Range`` header; return None to send the whole file.

    Multiple ranges and malformed headers are ignored (the whole file is sent,
    as RFC 9110 allows), and so is a Range whose If-Range validator no longer
    matches. A range that starts past the end gives 416.
    """
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None
    match = _RANGE.match(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(
                f"empty suffix range {header!r}", headers={"Content-Range": f"bytes */{size}"}
            )
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(
            f"range {header!r} is outside the file of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _tar_header(job_id: str, entry: ArtifactFile) -> bytes:
    info = tarfile.TarInfo(name=f"{job_id}/{entry.name}")
    info.size = entry.size
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_member_size(job_id: str, entry: ArtifactFile) -> int:
    padded = -(-entry.size // TAR_BLOCK) * TAR_BLOCK
    return len(_tar_header(job_id, entry)) + padded


def _stream_tar(ctx: ServiceContext, job_id: str, files: list[ArtifactFile]) -> Iterator[bytes]:
    # Built member by member so that a multi-gigabyte child never sits in memory:
    # header block(s), the file's bytes, zero padding to the next 512-byte boundary.
    for entry in files:
        yield _tar_header(job_id, entry)
        if entry.size:
            yield from ctx.store.open_range(job_id, entry.name, 0, entry.size - 1)
        remainder = entry.size % TAR_BLOCK
        if remainder:
            yield b"\0" * (TAR_BLOCK - remainder)
    yield b"\0" * (2 * TAR_BLOCK)
