"""Plans: which parent indices the child keeps in every space.

A plan is pure data computed from scores (or from nothing, for ``uniform``)
and serialized into the manifest. Kept indices are always in ascending parent
order, so a child of the parent's own shape is the parent, bit for bit.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict

from subclone.errors import FieldError, InvalidOptions
from subclone.options import SubcloneOptions
from subclone.scores import Scores
from subclone.shape import Shape
from subclone.specs import ArchitectureSpec


class Plan(BaseModel):
    """Kept parent indices per space. Lists indexed by child block j refer to parent block kept_layers[j]."""

    model_config = ConfigDict(frozen=True)

    model_type: str
    parent: dict[str, int]
    child: dict[str, int]
    method: str
    rescale: str
    layer_selection: str
    kept_layers: list[int]
    hidden: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    ffn: list[list[int]]

    def residual_ratio(self) -> float:
        return self.parent["hidden_size"] / self.child["hidden_size"]


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` indices spread evenly over ``range(total)``, including both ends when keep > 1."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def top_k(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` largest scores, ties broken by lower index, returned in ascending order."""
    if keep >= scores.numel():
        return list(range(scores.numel()))
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:keep].tolist())


def default_layer_selection(method: str) -> str:
    return {"activation": "influence", "magnitude": "middle", "uniform": "first"}[method]


def select_layers(parent: Shape, child: Shape, options: SubcloneOptions, scores: Scores | None) -> tuple[list[int], str]:
    """Choose the parent blocks to keep and name the rule that chose them."""
    total, keep = parent.num_layers, child.num_layers
    if options.keep_layers is not None:
        return sorted(options.keep_layers), "explicit"
    selection = options.layer_selection or default_layer_selection(options.method)
    if keep >= total:
        return list(range(total)), selection
    if selection == "first":
        return list(range(keep)), selection
    if selection == "middle":
        head = math.ceil(keep / 2)
        return list(range(head)) + list(range(total - (keep - head), total)), selection
    if scores is None or options.influence_metric not in scores.influence:
        raise InvalidOptions([FieldError(
            "layer_selection", selection, "needs block influence measured by calibration",
            allowed="'middle' or 'first' with method uniform/magnitude, or a scores file with influence",
        )])
    if keep == 1:
        return [0], selection
    # The first and last blocks always stay; among the others keep the ones that change
    # the residual stream most.
    influence = scores.influence[options.influence_metric][1: total - 1]
    middle = [i + 1 for i in top_k(influence, keep - 2)]
    return [0, *middle, total - 1], selection


def select_heads(scores: torch.Tensor | None, parent: Shape, child: Shape, grouped: bool) -> tuple[list[int], list[int]]:
    """Pick query heads and key/value heads of one block.

    Grouped-query models keep whole key/value groups (best total score) and the
    same number of query heads inside each kept group, because stock models
    expect query heads stored contiguously per group.
    """
    if not grouped:
        heads = evenly_spaced(parent.num_attention_heads, child.num_attention_heads) if scores is None else top_k(scores, child.num_attention_heads)
        return heads, heads
    per_group = parent.num_attention_heads // parent.num_key_value_heads
    keep_per_group = child.num_attention_heads // child.num_key_value_heads
    if scores is None:
        groups = evenly_spaced(parent.num_key_value_heads, child.num_key_value_heads)
        inside = [evenly_spaced(per_group, keep_per_group) for _ in groups]
    else:
        grouped_scores = scores.reshape(parent.num_key_value_heads, per_group)  # (K, H/K)
        groups = top_k(grouped_scores.sum(-1), child.num_key_value_heads)
        inside = [top_k(grouped_scores[g], keep_per_group) for g in groups]
    heads = [g * per_group + h for g, hs in zip(groups, inside, strict=True) for h in hs]
    return heads, groups


def make_plan(
    spec: ArchitectureSpec, parent: Shape, child: Shape, options: SubcloneOptions, scores: Scores | None
) -> Plan:
    """Turn scores into kept indices. ``scores`` is None only for the ``uniform`` method."""
    kept_layers, selection = select_layers(parent, child, options, scores)
    if scores is None:
        hidden = evenly_spaced(parent.hidden_size, child.hidden_size)
    else:
        hidden = top_k(scores.hidden, child.hidden_size)
    heads, kv_heads, ffn = [], [], []
    for layer in kept_layers:
        head_scores = scores.heads[layer] if scores is not None else None
        q, kv = select_heads(head_scores, parent, child, grouped=spec.attention == "gqa")
        heads.append(q)
        kv_heads.append(kv)
        if scores is None:
            ffn.append(evenly_spaced(parent.intermediate_size, child.intermediate_size))
        else:
            ffn.append(top_k(scores.ffn[layer], child.intermediate_size))
    return Plan(
        model_type=spec.model_type,
        parent=parent.as_dict(),
        child=child.as_dict(),
        method=options.method,
        rescale=options.rescale,
        layer_selection=selection,
        kept_layers=kept_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        ffn=ffn,
    )
