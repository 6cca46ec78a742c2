from __future__ import annotations

import pytest

from backend.cli.evaluate import accuracy_by_stage


def test_accuracy_overall_per_stage_and_per_field() -> None:
    preds = [
        {"label": "a", "stage": "consistent", "encoder_label": "a"},
        {"label": "b", "stage": "consistent", "encoder_label": "a"},
        {"label": "c", "stage": "round1", "encoder_label": "c"},
        {"label": None, "stage": "skipped"},
        {"label": "a", "stage": "round1", "encoder_label": "a"},
    ]
    gold = ["a", "a", "c", "b", None]  # the last row has no gold and is not scored

    result = accuracy_by_stage(preds, gold, fields=["encoder_label"])

    assert result["n"] == 4
    assert result["accuracy"] == 0.5
    assert result["stages"] == {
        "consistent": {"n": 2, "accuracy": 0.5},
        "round1": {"n": 1, "accuracy": 1.0},
        "skipped": {"n": 1, "accuracy": 0.0},
    }
    assert result["encoder_label"] == 0.75


def test_misaligned_files_are_refused() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        accuracy_by_stage([{"label": "a"}, {"label": "b"}], ["a"])


def test_no_gold_at_all_gives_none_not_nan() -> None:
    assert accuracy_by_stage([{"label": "a", "stage": "x"}], [None]) == {"n": 0, "accuracy": None, "stages": {}}
