"""Calibration datasets uploaded as .txt or .jsonl files."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Header, Query, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import select

from app import idempotency
from app.api.deps import ContextDep, SessionDep, TenantDep
from app.api.pagination import cursor_page
from app.api.routes.jobs import PROBLEMS
from app.api.schemas import DatasetList, DatasetPublic, Problem
from app.core.errors import NotFound, PayloadTooLarge, ValidationFailed
from app.core.ids import new_id
from app.datasets import parse_dataset
from app.db.models import Dataset, utcnow
from app.jobs.lifecycle import as_utc
from subclone.errors import FieldError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

READ_CHUNK = 1024 * 1024


def dataset_public(dataset: Dataset) -> dict[str, Any]:
    return {
        "object": "dataset",
        "id": dataset.id,
        "filename": dataset.filename,
        "format": dataset.format,
        "bytes": dataset.size_bytes,
        "sha256": dataset.sha256,
        "num_documents": dataset.num_documents,
        "created_at": as_utc(dataset.created_at),
        "updated_at": as_utc(dataset.updated_at),
    }


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    responses={
        **PROBLEMS,
        413: {"model": Problem, "description": "File larger than the upload limit."},
    },
)
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(
            description="A .txt file (documents separated by blank lines) or .jsonl with a 'text' field."
        ),
    ],
    ctx: ContextDep,
    session: SessionDep,
    tenant_id: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    """Upload calibration text; the returned id goes into a job's calibration.source.

    With an Idempotency-Key header, a retry of the same file returns the first dataset.
    """
    limit = ctx.settings.max_upload_bytes
    chunks: list[bytes] = []
    size = 0
    while chunk := file.file.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"dataset is larger than the upload limit of {limit} bytes")
        chunks.append(chunk)
    filename = file.filename or ""
    if not filename:
        raise ValidationFailed(
            "the upload needs a file name ending in .txt or .jsonl",
            errors=[FieldError("file", None, "missing file name")],
        )
    content = b"".join(chunks)
    parsed = parse_dataset(filename, content)
    if idempotency_key is not None:
        idempotency.validate_key(idempotency_key)
        digest = idempotency.request_hash(
            "POST", "/v1/datasets", {"filename": filename, "sha256": parsed.sha256}
        )
        stored = idempotency.begin(
            session, tenant_id, idempotency_key, digest, ctx.settings.idempotency_ttl
        )
        if stored is not None:
            return JSONResponse(
                stored.body, status_code=stored.status, headers={"Idempotent-Replayed": "true"}
            )
    now = utcnow()
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant_id,
        filename=filename[-255:],
        format=parsed.format,
        size_bytes=size,
        sha256=parsed.sha256,
        num_documents=parsed.num_documents,
        content=content,
        created_at=now,
        updated_at=now,
    )
    public = dataset_public(dataset)
    try:
        session.add(dataset)
        if idempotency_key is not None:
            idempotency.complete(session, tenant_id, idempotency_key, 201, public)
        session.commit()
    except BaseException:
        session.rollback()
        if idempotency_key is not None:
            idempotency.abandon(session, tenant_id, idempotency_key)
        raise
    logger.info(
        "dataset %s uploaded by tenant %s: %d bytes, %d documents",
        dataset.id,
        tenant_id,
        size,
        parsed.num_documents,
    )
    return JSONResponse(public, status_code=201)


@router.get("", response_model=DatasetList, responses=PROBLEMS)
def list_datasets(
    session: SessionDep,
    tenant_id: TenantDep,
    after: Annotated[
        str | None, Query(description="Return datasets uploaded before this id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """List the tenant's datasets, newest first."""
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return cursor_page(
        session, query, Dataset, tenant_id=tenant_id, after=after, limit=limit, kind="dataset", render=dataset_public
    )


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=PROBLEMS)
def read_dataset(dataset_id: str, session: SessionDep, tenant_id: TenantDep) -> dict[str, Any]:
    """Return one dataset's description (not its content)."""
    dataset = session.scalars(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    ).first()
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset_public(dataset)
