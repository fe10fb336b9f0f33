"""Model shapes: read the parent's from its config, validate a target, write the child's config."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from subclone.errors import FieldError, InvalidTarget
from subclone.options import SubcloneOptions, Target
from subclone.specs import ArchitectureSpec


@dataclass(frozen=True)
class Shape:
    """The prunable dimensions of a model. ``head_dim`` is never cut."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parent_shape(spec: ArchitectureSpec, config: dict[str, Any]) -> Shape:
    keys = spec.config
    hidden = int(config[keys.hidden_size])
    heads = int(config[keys.num_attention_heads])
    kv = int(config.get(keys.num_key_value_heads) or heads) if keys.num_key_value_heads else heads
    intermediate = config.get(keys.intermediate_size) if keys.intermediate_size else None
    if intermediate is None:
        if keys.ffn_default_multiple is None:
            raise InvalidTarget([FieldError("intermediate_size", None, f"parent config has no {keys.intermediate_size}")])
        intermediate = keys.ffn_default_multiple * hidden
    head_dim = config.get(keys.head_dim) if keys.head_dim else None
    if head_dim is None:
        head_dim = hidden // heads
    return Shape(
        num_layers=int(config[keys.num_layers]),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=int(head_dim),
    )


def resolve_target(
    spec: ArchitectureSpec, parent: Shape, target: Target, options: SubcloneOptions | None = None
) -> Shape:
    """Fill unset target fields from the parent and check every field against it.

    All violations are collected and raised together as one InvalidTarget.
    """
    errors: list[FieldError] = []
    keep_layers = options.keep_layers if options else None

    num_layers = target.num_layers
    if num_layers is None:
        num_layers = len(keep_layers) if keep_layers is not None else parent.num_layers
    values = {
        "num_layers": num_layers,
        "hidden_size": target.hidden_size or parent.hidden_size,
        "intermediate_size": target.intermediate_size or parent.intermediate_size,
        "num_attention_heads": target.num_attention_heads or parent.num_attention_heads,
    }
    for name, value in values.items():
        limit = getattr(parent, name)
        if value > limit:
            errors.append(FieldError(name, value, f"exceeds the parent's {name} of {limit}", allowed=f"1 to {limit}"))

    heads = values["num_attention_heads"]
    if spec.attention == "mha":
        kv = heads
        if target.num_key_value_heads is not None and target.num_key_value_heads != heads:
            errors.append(
                FieldError(
                    "num_key_value_heads",
                    target.num_key_value_heads,
                    f"model_type {spec.model_type} has one key/value head per query head",
                    allowed=f"unset or equal to num_attention_heads ({heads})",
                )
            )
    else:
        kv = target.num_key_value_heads or min(parent.num_key_value_heads, heads)
        if kv > parent.num_key_value_heads:
            errors.append(
                FieldError(
                    "num_key_value_heads", kv, f"exceeds the parent's {parent.num_key_value_heads}",
                    allowed=f"1 to {parent.num_key_value_heads}",
                )
            )
        elif heads % kv != 0:
            divisors = [d for d in range(1, parent.num_key_value_heads + 1) if heads % d == 0]
            errors.append(
                FieldError(
                    "num_attention_heads", heads, f"must be a multiple of num_key_value_heads ({kv})",
                    allowed=f"multiples of {kv}; or num_key_value_heads in {divisors}",
                )
            )
        else:
            group = parent.num_attention_heads // parent.num_key_value_heads
            if heads // kv > group:
                errors.append(
                    FieldError(
                        "num_attention_heads", heads,
                        f"needs {heads // kv} query heads per key/value head but the parent has {group} per group",
                        allowed=f"at most {group * kv} with num_key_value_heads={kv}",
                    )
                )

    hidden = values["hidden_size"]
    if spec.config.head_dim is None:
        # The head size is implied as hidden_size / num_attention_heads, and it is
        # kept because heads are removed whole.
        if hidden % heads != 0:
            errors.append(
                FieldError(
                    "hidden_size", hidden, f"must be divisible by num_attention_heads ({heads}) for model_type {spec.model_type}",
                    allowed=f"multiples of {heads}",
                )
            )
        elif hidden // heads != parent.head_dim:
            suggestion = hidden // parent.head_dim if hidden % parent.head_dim == 0 else None
            hint = f"; with hidden_size={hidden} use num_attention_heads={suggestion}" if suggestion else ""
            errors.append(
                FieldError(
                    "num_attention_heads", heads,
                    f"hidden_size / num_attention_heads must equal the parent's head size {parent.head_dim}, "
                    f"because heads are removed whole{hint}",
                    allowed=f"hidden_size / {parent.head_dim}",
                )
            )

    if keep_layers is not None:
        bad = [i for i in keep_layers if i >= parent.num_layers]
        if bad:
            errors.append(
                FieldError("keep_layers", list(keep_layers), f"indices {bad} are out of range", allowed=f"0 to {parent.num_layers - 1}")
            )
        if len(keep_layers) != num_layers:
            errors.append(
                FieldError("keep_layers", list(keep_layers), f"lists {len(keep_layers)} blocks but num_layers is {num_layers}",
                           allowed=f"exactly {num_layers} distinct indices")
            )

    if errors:
        raise InvalidTarget(errors)
    return Shape(
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=values["intermediate_size"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=parent.head_dim,
    )


def child_config(
    spec: ArchitectureSpec, parent_config: dict[str, Any], child: Shape, kept_layers: list[int], *, rescale: str = "norm"
) -> dict[str, Any]:
    """Rewrite the parent's config.json for the child's shape."""
    keys = spec.config
    config = copy.deepcopy(parent_config)
    parent_hidden = int(parent_config[keys.hidden_size])
    if rescale == "norm" and keys.norm_eps and child.hidden_size < parent_hidden and keys.norm_eps in parent_config:
        # A norm over d of D dimensions computes sqrt(sum x^2 / d + eps). With the weight scaled by
        # sqrt(D/d), the child matches the parent exactly (for zero dropped dimensions) only if eps
        # is scaled by D/d as well.
        config[keys.norm_eps] = float(parent_config[keys.norm_eps]) * parent_hidden / child.hidden_size
    config[keys.num_layers] = child.num_layers
    config[keys.hidden_size] = child.hidden_size
    config[keys.num_attention_heads] = child.num_attention_heads
    if keys.intermediate_size:
        config[keys.intermediate_size] = child.intermediate_size
    if keys.num_key_value_heads:
        config[keys.num_key_value_heads] = child.num_key_value_heads
    if keys.head_dim:
        if keys.head_dim in parent_config or child.head_dim * child.num_attention_heads != child.hidden_size:
            config[keys.head_dim] = child.head_dim
    for key in keys.per_layer_lists:
        values = parent_config.get(key)
        if isinstance(values, list):
            config[key] = [values[i] for i in kept_layers]
    for key in keys.layer_count_thresholds:
        threshold = parent_config.get(key)
        if isinstance(threshold, int):
            config[key] = sum(1 for i in kept_layers if i < threshold)
    return config
