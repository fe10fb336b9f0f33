"""Architecture specs: one JSON file per model family, read through a strict schema.

A spec names every tensor of a family's checkpoint and states, for each axis,
which prunable space it belongs to:

- ``hidden``: the residual-stream width (one global index set),
- ``heads`` / ``kv_heads``: query-side and key/value-side heads of block i
  (each head spans ``head_dim`` consecutive entries),
- ``ffn``: FFN neurons of block i,
- ``vocab``: the vocabulary (kept whole),
- ``keep``: an axis that is never cut (positions, token types, head_dim of a
  per-head norm, labels).

An axis may also be a list of spaces laid end to end, as in GPT-2's fused
``c_attn`` whose output axis is ``[heads, kv_heads, kv_heads]`` (q, k, v).
The slicing code walks these entries and never branches on the family name.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subclone.errors import UnsupportedArchitecture

Space = Literal["hidden", "heads", "kv_heads", "ffn", "vocab", "keep"]
Axis = Space | list[Space]

LAYER = "{layer}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One tensor name template (``{layer}`` for per-block tensors) and the space of each axis."""

    name: str
    axes: list[Axis]
    scope: Literal["base", "head"] = Field(
        default="base",
        description="base: name is relative to the base model (a checkpoint may prefix it); head: full name.",
    )
    norm: bool = Field(default=False, description="Weight of a norm over the residual stream (rescaled by the 'norm' rule).")
    fan_in_axis: int | None = Field(default=None, description="Input axis of a linear weight (rescaled by the 'fan_in' rule).")
    tied_to: str | None = Field(default=None, description="Base tensor this one shares storage with when the config ties them.")
    optional: bool = Field(default=False, description="The tensor may be absent from a checkpoint (task heads, tied copies).")

    @property
    def per_layer(self) -> bool:
        return LAYER in self.name


class ConfigKeys(_Strict):
    """config.json keys for each shape field; None where the family has no such key."""

    num_layers: str
    hidden_size: str
    intermediate_size: str | None = Field(description="None when the FFN width is implied (see ffn_multiple).")
    num_attention_heads: str
    num_key_value_heads: str | None = None
    head_dim: str | None = Field(default=None, description="Key for an explicit head size; None when head size is hidden/heads.")
    ffn_default_multiple: int | None = Field(
        default=None, description="FFN width implied when intermediate_size is null in the config (GPT-2: 4 x hidden)."
    )
    per_layer_lists: list[str] = Field(default_factory=list, description="Config lists with one entry per block.")
    layer_count_thresholds: list[str] = Field(
        default_factory=list, description="Keys holding a block index threshold (e.g. max_window_layers)."
    )
    tie_word_embeddings: str | None = Field(default=None, description="Key that ties input and output embeddings.")
    norm_eps: str | None = Field(default=None, description="Key of the residual norms' epsilon.")
    tie_default: bool = False


class NormSpec(_Strict):
    kind: Literal["layernorm", "rmsnorm"]
    weight_offset: float = Field(default=0.0, description="1.0 when the stored weight w means a scale of (1 + w).")


class ArchitectureSpec(_Strict):
    """Everything the engine needs to know about one model family."""

    model_type: str
    task: Literal["causal_lm", "encoder"]
    default_architecture: str
    attention: Literal["mha", "gqa"]
    rotary: bool = Field(description="True when heads use rotary position embeddings (head_dim cannot be cut).")
    base_prefixes: list[str] = Field(description="Prefixes a checkpoint may put before base tensor names, e.g. 'model.'.")
    layers_module: str = Field(description="Path of the block list inside the base model.")
    attention_output_module: str = Field(description="Module whose input is the concatenated per-head output.")
    attention_output_weight: str = Field(description="Tensor template of that module's weight.")
    ffn_output_module: str = Field(description="Module whose input is the FFN activation (down projection).")
    position_ids: Literal["from_mask", "from_mask_after_padding_idx"] = "from_mask"
    embedding_scale: Literal["none", "sqrt_hidden"] = "none"
    norm: NormSpec
    config: ConfigKeys
    tensors: list[TensorSpec]
    ignored: list[str] = Field(default_factory=list, description="Tensor templates dropped on load (old buffers).")

    @model_validator(mode="after")
    def _check(self) -> ArchitectureSpec:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor templates in spec {self.model_type!r}")
        by_name = {t.name: t for t in self.tensors}
        for t in self.tensors:
            if t.tied_to is not None and t.tied_to not in by_name:
                raise ValueError(f"{t.name} is tied to unknown tensor {t.tied_to!r}")
            if t.fan_in_axis is not None and not 0 <= t.fan_in_axis < len(t.axes):
                raise ValueError(f"{t.name}: fan_in_axis {t.fan_in_axis} out of range")
        if self.attention_output_weight not in by_name:
            raise ValueError(f"attention_output_weight {self.attention_output_weight!r} is not a listed tensor")
        return self

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


def available_model_types() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files(__package__).iterdir() if p.name.endswith(".json"))


@cache
def load_spec(model_type: str) -> ArchitectureSpec:
    """Load and validate the spec of ``model_type``; unknown types raise UnsupportedArchitecture."""
    supported = available_model_types()
    if model_type not in supported:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported)}",
            param="model_type",
        )
    text = resources.files(__package__).joinpath(f"{model_type}.json").read_text(encoding="utf-8")
    return ArchitectureSpec.model_validate(json.loads(text))
