"""Request and response bodies of API v1.

Request models reuse the engine's :class:`~subclone.options.Target` and the
client-settable fields of :class:`~subclone.options.SubcloneOptions` and
:class:`~subclone.options.CalibrationOptions`, so the engine's descriptions and
bounds appear in the OpenAPI schema unchanged. Fields that name server paths or
hardware (``scores_path``, ``calibration.source`` as a file, ``device``,
``max_memory``) are not settable over HTTP: the operator configures the device
and memory, and calibration data comes from a built-in source, an uploaded
dataset or inline texts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from subclone.options import CalibrationOptions, SubcloneOptions, Target

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
MAX_INLINE_TEXT_CHARS = 100_000
MAX_WEBHOOK_URL_LENGTH = 2048

CLIENT_OPTION_FIELDS = (
    "method",
    "rescale",
    "layer_selection",
    "influence_metric",
    "keep_layers",
    "dtype",
    "max_shard_size",
    "verify",
    "eval_texts",
)
CLIENT_CALIBRATION_FIELDS = (
    "num_samples",
    "sequence_length",
    "batch_size",
    "seed",
    "holdout_fraction",
)

_STRICT = ConfigDict(extra="forbid", frozen=True)


def _reuse_fields(model: type[BaseModel], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: (model.model_fields[name].annotation, model.model_fields[name]) for name in names}


_JobOptionsBase = create_model(  # type: ignore[call-overload]
    "_JobOptionsBase", __config__=_STRICT, **_reuse_fields(SubcloneOptions, CLIENT_OPTION_FIELDS)
)


class JobOptions(_JobOptionsBase):  # type: ignore[misc,valid-type]
    """Method options a client may set; the server chooses device and memory limits."""


_CalibrationBase = create_model(  # type: ignore[call-overload]
    "_CalibrationBase",
    __config__=_STRICT,
    **_reuse_fields(CalibrationOptions, CLIENT_CALIBRATION_FIELDS),
)


class CalibrationRequest(_CalibrationBase):  # type: ignore[misc,valid-type]
    """Calibration data: a built-in source, an uploaded dataset id, or inline texts."""

    source: str | None = Field(
        default="builtin:stdlib-docstrings",
        max_length=200,
        description="'builtin:stdlib-docstrings' or a dataset id from POST /v1/datasets ('ds_...'). Ignored when texts is given.",
    )
    texts: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Inline calibration documents (a short list; upload larger sets).",
    )

    @field_validator("texts")
    @classmethod
    def _check_texts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        for index, text in enumerate(value):
            if len(text) > MAX_INLINE_TEXT_CHARS:
                raise ValueError(
                    f"text {index} has {len(text)} characters, the maximum is {MAX_INLINE_TEXT_CHARS}; upload a dataset instead"
                )
        if not any(text.strip() for text in value):
            raise ValueError("texts must contain at least one non-empty document")
        return value


class PlanCreate(BaseModel):
    """Build request: a parent from the registry, the child's shape, method options and calibration data."""

    model_config = ConfigDict(extra="forbid")

    parent: str = Field(
        min_length=1,
        max_length=300,
        description="Registry name (GET /v1/parents) or, when enabled, a Hub repo id.",
    )
    revision: str | None = Field(
        default=None, min_length=1, max_length=100, description="Hub commit for a Hub parent."
    )
    target: Target = Field(description="Child shape; a field left out keeps the parent's value.")
    options: JobOptions = Field(default_factory=JobOptions)
    calibration: CalibrationRequest = Field(default_factory=CalibrationRequest)


class JobCreate(PlanCreate):
    """A subcloning job request."""

    metadata: dict[str, str] = Field(
        default_factory=dict,
        description=f"Free-form string pairs for your own bookkeeping: at most {MAX_METADATA_KEYS} keys of "
        f"{MAX_METADATA_KEY_LENGTH} characters and values of {MAX_METADATA_VALUE_LENGTH} characters. Lists filter on them.",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=MAX_WEBHOOK_URL_LENGTH,
        description="https URL that receives signed job.succeeded, job.failed and job.cancelled events.",
    )

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has {len(value)} keys, the maximum is {MAX_METADATA_KEYS}")
        for key, item in value.items():
            if not key or len(key) > MAX_METADATA_KEY_LENGTH:
                raise ValueError(
                    f"metadata key {key[:80]!r} must have 1 to {MAX_METADATA_KEY_LENGTH} characters"
                )
            if len(item) > MAX_METADATA_VALUE_LENGTH:
                raise ValueError(
                    f"metadata value of {key!r} has {len(item)} characters, the maximum is {MAX_METADATA_VALUE_LENGTH}"
                )
        return value


# Responses.


class Progress(BaseModel):
    percent: float = Field(description="Share of the whole job done, 0 to 100.")
    done: int = Field(description="Units done in the current stage.")
    total: int = Field(description="Units in the current stage.")


class JobErrorPublic(BaseModel):
    code: str = Field(
        description="Stable machine-readable code, e.g. invalid_target, worker_lost, out_of_memory."
    )
    message: str
    param: str | None = Field(default=None, description="Request field at fault, when one is.")


class JobPublic(BaseModel):
    object: Literal["job"] = "job"
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
    stage: str | None
    progress: Progress
    parent: str
    revision: str | None
    target: dict[str, Any]
    options: dict[str, Any]
    calibration: dict[str, Any]
    metadata: dict[str, str]
    webhook_url: str | None
    plan: dict[str, Any] | None = Field(
        description="Child shape, parameter count and memory estimate from validation."
    )
    result: dict[str, Any] | None = Field(
        description="Manifest summary and quality metrics of a succeeded job."
    )
    error: JobErrorPublic | None
    attempts: int
    max_attempts: int
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    object: Literal["job.event"] = "job.event"
    id: str
    job_id: str
    created_at: str
    type: str = Field(description="status, stage_started, stage_finished, progress or retry.")
    status: str | None
    stage: str | None
    message: str
    percent: float | None
    duration_s: float | None
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


class ArtifactPublic(BaseModel):
    object: Literal["artifact"] = "artifact"
    name: str
    size: int
    sha256: str
    url: str


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]
    has_more: bool = False


class PlanPublic(BaseModel):
    object: Literal["plan"] = "plan"
    parent: str
    revision: str | None
    parent_shape: dict[str, Any]
    child_shape: dict[str, Any]
    parent_parameters: int
    child_parameters: int
    child_bytes: int
    memory_estimate: dict[str, int]
    kept_layers: list[int] | None
    child_config: dict[str, Any]


class ParentPublic(BaseModel):
    object: Literal["parent"] = "parent"
    id: str
    source: str
    model_type: str | None
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    intermediate_size: int | None
    vocab_size: int | None
    parameter_count: int | None


class ParentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ParentPublic]
    has_more: bool = False


class DatasetPublic(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    filename: str
    format: Literal["txt", "jsonl"]
    bytes: int
    sha256: str
    num_documents: int
    created_at: str
    updated_at: str


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetPublic]
    has_more: bool


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None
