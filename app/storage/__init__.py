"""Artifact storage for published child checkpoints: a local directory or an S3-compatible bucket.

The worker calls ``publish`` once a child is written; the API lists, streams
and presigns files; a periodic task calls ``delete_older_than``. Every backend
error is a StorageError, and ArtifactNotFound (including InvalidArtifactName)
maps to HTTP 404.
"""

from app.storage.base import (
    MANIFEST_NAME,
    ArtifactFile,
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactName,
    RangeNotSatisfiable,
    StorageError,
    validate_artifact_name,
    validate_job_id,
)
from app.storage.local import LocalArtifactStore
from app.storage.s3 import S3ArtifactStore
from app.storage.settings import StorageSettings, build_store

__all__ = [
    "MANIFEST_NAME",
    "ArtifactFile",
    "ArtifactNotFound",
    "ArtifactStore",
    "InvalidArtifactName",
    "LocalArtifactStore",
    "RangeNotSatisfiable",
    "S3ArtifactStore",
    "StorageError",
    "StorageSettings",
    "build_store",
    "validate_artifact_name",
    "validate_job_id",
]
