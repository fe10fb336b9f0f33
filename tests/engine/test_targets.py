"""Target validation: every violation is reported at once with field, value and allowed values."""

from __future__ import annotations

import pytest

from subclone.api import plan_subclone
from subclone.errors import InvalidOptions, InvalidTarget
from subclone.options import SubcloneOptions, Target


def fields_of(excinfo) -> dict[str, str]:
    return {e.field: str(e) for e in excinfo.value.errors}


def test_all_violations_reported_together(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_layers=9, hidden_size=128, intermediate_size=500))
    errors = fields_of(excinfo)
    assert set(errors) == {"num_layers", "hidden_size", "intermediate_size"}
    assert "num_layers=9" in errors["num_layers"]
    assert "1 to 4" in errors["num_layers"]
    assert "1 to 64" in errors["hidden_size"]
    assert "1 to 96" in errors["intermediate_size"]


def test_heads_must_be_multiple_of_kv_heads(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_attention_heads=6, num_key_value_heads=4))
    message = fields_of(excinfo)["num_attention_heads"]
    assert "num_attention_heads=6" in message
    assert "multiple of num_key_value_heads (4)" in message


def test_query_heads_per_group_cannot_grow(tiny_parents):
    # The parent has 8 query heads in 4 groups (2 per group); 6 heads on 1 group needs 6 per group.
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_attention_heads=6, num_key_value_heads=1))
    assert "2 per group" in fields_of(excinfo)["num_attention_heads"]


def test_kv_heads_above_parent_rejected(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_key_value_heads=8))
    assert "1 to 4" in fields_of(excinfo)["num_key_value_heads"]


def test_bert_hidden_must_divide_by_heads(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["bert"], Target(hidden_size=50, num_attention_heads=4))
    message = fields_of(excinfo)["hidden_size"]
    assert "hidden_size=50" in message
    assert "divisible by num_attention_heads (4)" in message


def test_bert_head_size_is_kept(tiny_parents):
    # Parent head size is 16; 48 wide with 4 heads would need head size 12.
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["bert"], Target(hidden_size=48, num_attention_heads=4))
    message = fields_of(excinfo)["num_attention_heads"]
    assert "head size 16" in message
    assert "num_attention_heads=3" in message


def test_mha_family_rejects_kv_heads(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["gpt2"], Target(num_key_value_heads=2))
    assert "one key/value head per query head" in fields_of(excinfo)["num_key_value_heads"]


def test_keep_layers_checked_against_parent(tiny_parents):
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_layers=2), SubcloneOptions(keep_layers=(0, 7)))
    assert "out of range" in fields_of(excinfo)["keep_layers"]
    with pytest.raises(InvalidTarget) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_layers=3), SubcloneOptions(keep_layers=(0, 3)))
    assert "lists 2 blocks but num_layers is 3" in fields_of(excinfo)["keep_layers"]


def test_influence_needs_calibration(tiny_parents):
    with pytest.raises(InvalidOptions) as excinfo:
        plan_subclone(tiny_parents["llama"], Target(num_layers=2), SubcloneOptions(method="uniform", layer_selection="influence"))
    assert "layer_selection" in fields_of(excinfo)


def test_zero_and_negative_values_rejected_by_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Target(hidden_size=0)
    with pytest.raises(ValidationError):
        Target(num_layers=-1)
    with pytest.raises(ValidationError):
        Target.model_validate({"hidden": 5})


def test_plan_reports_shape_and_parameters(tiny_parents):
    report = plan_subclone(tiny_parents["llama"], Target(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2))
    assert report.child["hidden_size"] == 32
    assert report.child["num_key_value_heads"] == 2
    assert 0 < report.child_parameters < report.parent_parameters
    assert report.memory_estimate["parent_weight_bytes"] == report.parent_parameters * 4
