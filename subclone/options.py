"""Request value objects: the target shape and the method options.

These are pure data. Checks that need the parent (a width above the parent's,
heads that do not divide) live in :mod:`subclone.target`, which validates every
field at once before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from subclone.errors import FieldError, InvalidOptions

Method = Literal["activation", "uniform", "magnitude"]
Rescale = Literal["norm", "fan_in", "none"]
LayerSelection = Literal["influence", "middle", "first"]
InfluenceMetric = Literal["relative", "angular"]

BUILTIN_SOURCES = ("stdlib-docstrings",)

# Bounds that keep one request from exhausting a worker; a caller who needs more
# runs the library directly.
MAX_CALIBRATION_SAMPLES = 65536
MAX_SEQUENCE_LENGTH = 8192
MAX_INLINE_TEXTS = 4096


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Frozen):
    """Child shape. A field left as None keeps the parent's value."""

    num_layers: int | None = Field(default=None, ge=1, description="Number of transformer blocks.")
    hidden_size: int | None = Field(default=None, ge=1, description="Residual-stream width.")
    intermediate_size: int | None = Field(default=None, ge=1, description="FFN hidden width per block.")
    num_attention_heads: int | None = Field(default=None, ge=1, description="Query heads per block.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, description="Key/value heads per block (grouped-query families only)."
    )


class CalibrationOptions(_Frozen):
    """Calibration text source and the amount of it fed to the parent."""

    source: str | None = Field(
        default="builtin:stdlib-docstrings",
        description=(
            "A .txt file (documents separated by blank lines), a .jsonl file with a 'text' "
            "field, or 'builtin:stdlib-docstrings'. Ignored when 'texts' is given."
        ),
    )
    texts: tuple[str, ...] | None = Field(
        default=None, max_length=MAX_INLINE_TEXTS, description="Inline calibration documents."
    )
    num_samples: int = Field(default=256, ge=1, le=MAX_CALIBRATION_SAMPLES, description="Sequences fed to the parent.")
    sequence_length: int = Field(default=128, ge=8, le=MAX_SEQUENCE_LENGTH, description="Tokens per sequence, special tokens included.")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Sequences per forward pass.")
    seed: int = Field(default=0, ge=0, description="Seed for sampling documents.")
    holdout_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of documents kept out of calibration for the quality check."
    )

    @model_validator(mode="after")
    def _check_source(self) -> CalibrationOptions:
        if self.texts is not None:
            if not any(t.strip() for t in self.texts):
                raise ValueError("texts must contain at least one non-empty document")
            return self
        if self.source is None:
            raise ValueError("either source or texts is required")
        if self.source.startswith("builtin:"):
            name = self.source.removeprefix("builtin:")
            if name not in BUILTIN_SOURCES:
                allowed = ", ".join(f"builtin:{n}" for n in BUILTIN_SOURCES)
                raise ValueError(f"unknown built-in source {self.source!r}; allowed: {allowed}")
        elif Path(self.source).suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"source {self.source!r} must be a .txt or .jsonl file or a built-in source")
        return self

    def describe_source(self) -> str:
        return "inline" if self.texts is not None else str(self.source)


class SubcloneOptions(_Frozen):
    """Method options for deriving the child. Every field has a working default."""

    method: Method = Field(
        default="activation",
        description="activation: rank by calibration activations; uniform: evenly spaced indices and the first blocks, no data; magnitude: rank by weight norms, no data.",
    )
    rescale: Rescale = Field(
        default="norm",
        description="norm: multiply norm weights by sqrt(D/d); fan_in: multiply linear weights by sqrt(fan-in ratio); none.",
    )
    layer_selection: LayerSelection | None = Field(
        default=None,
        description=(
            "influence: drop the blocks that change the residual stream least; middle: drop the middle blocks; "
            "first: keep the first blocks. Default: influence for activation, middle for magnitude, first for uniform."
        ),
    )
    influence_metric: InfluenceMetric = Field(
        default="relative",
        description="relative: ||f(x)|| / ||x + f(x)||; angular: angle between a block's input and output.",
    )
    keep_layers: tuple[int, ...] | None = Field(
        default=None, description="Parent block indices to keep, overriding layer_selection."
    )
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    scores_path: str | None = Field(
        default=None, description="Reuse a scores file from an earlier calibration instead of running the parent."
    )
    device: str = Field(default="cpu", description="torch device for calibration and verification, for example cuda:0.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Compute dtype for calibration; written weights keep the parent's dtype."
    )
    max_memory: dict[str, str] | None = Field(
        default=None,
        description="accelerate max_memory for calibration, e.g. {'0': '20GiB', 'cpu': '60GiB'}; blocks that do not fit are offloaded.",
    )
    max_shard_size: int = Field(default=5 * 1024**3, ge=1024**2, description="Largest safetensors shard in bytes.")
    verify: bool = Field(default=True, description="Reload the child with stock transformers and measure quality.")
    eval_texts: int = Field(default=64, ge=2, le=4096, description="Held-out texts used for the quality check.")
    eval_sts_path: str | None = Field(
        default=None,
        description="STS-benchmark style file (tab-separated, score in column 5, sentences in 6 and 7) for an STS Spearman check of encoders.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> SubcloneOptions:
        if self.keep_layers is not None:
            if len(set(self.keep_layers)) != len(self.keep_layers):
                raise ValueError(f"keep_layers {list(self.keep_layers)} contains duplicates")
            if any(i < 0 for i in self.keep_layers):
                raise ValueError(f"keep_layers {list(self.keep_layers)} contains a negative index")
        if self.scores_path is not None and self.method != "activation":
            raise ValueError(f"scores_path only applies to method 'activation', not {self.method!r}")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method == "activation" and self.scores_path is None


def parse_options(data: dict) -> SubcloneOptions:
    """Build options from plain data, turning pydantic errors into :class:`InvalidOptions`."""
    try:
        return SubcloneOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidOptions(field_errors_from_pydantic(exc)) from None


def field_errors_from_pydantic(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        errors.append(FieldError(field=prefix + loc, value=err.get("input"), message=err["msg"]))
    return errors
