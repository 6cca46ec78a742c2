"""Reading comparison files and records, and the weighted preference export (backend.annotators.preferences)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backend.annotators.attentiveness import IdentifiabilityWarning, PairwiseAttentiveness
from backend.annotators.judge import JudgeVerdict
from backend.annotators.preferences import (
    EXPORT_FIELDS,
    ComparisonKeys,
    TableError,
    comparisons_frame,
    export_preferences,
    fit_comparisons,
    read_table,
    write_jsonl,
)
from backend.annotators.simulation import simulate_comparisons


def comparison_records(n_users: int = 30, n_per_user: int = 20, **options) -> tuple[pd.DataFrame, pd.Series]:
    sim = simulate_comparisons(n_users, n_per_user, mu=0.75, overlap_share=0.5, seed=1, **options)
    frame = sim.labels.copy()
    frame["prompt"] = "prompt of " + frame["item_id"]
    frame["response_left"] = "left answer to " + frame["item_id"]
    frame["response_right"] = "right answer to " + frame["item_id"]
    return frame, sim.judge_left


def export(frame, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        return export_preferences(frame, **options)


# -- reading ----------------------------------------------------------------------------------------------------
def test_read_table_reads_csv_and_jsonl_and_reports_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"item_id,worker_id,choice\nt1,u1,left\nt2,u\xff,right\n")
    frame, problems = read_table(tmp_path / "a.csv")
    assert list(frame.index) == [1, 2] and frame.loc[2, "worker_id"] == "u\ufffd"
    assert any("not UTF-8" in p for p in problems)
    lines = ['{"item_id": "t1", "worker_id": "u1", "choice": "left", "n": 3}', "not json", "[1, 2]",
             '{"item_id": "t2", "worker_id": null, "choice": "right"}']
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    frame, problems = read_table(tmp_path / "b.jsonl")
    assert frame.to_dict("records") == [{"item_id": "t1", "worker_id": "u1", "choice": "left", "n": "3"},
                                        {"item_id": "t2", "worker_id": "", "choice": "right", "n": ""}]
    assert problems == [f"{tmp_path / 'b.jsonl'}: 2 lines are not JSON objects and were skipped (lines 2, 3)"]
    with pytest.raises(TableError, match="no such file"):
        read_table(tmp_path / "missing.csv")


def test_records_with_custom_keys_fit_like_the_dataframe() -> None:
    frame, _ = comparison_records()
    keys = ComparisonKeys(item="task", worker="completed_by", choice="selected", model_left="m1", model_right="m2")
    renamed = frame.rename(columns={"item_id": "task", "worker_id": "completed_by", "choice": "selected",
                                    "model_left": "m1", "model_right": "m2"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        from_records = fit_comparisons(renamed.to_dict("records"), keys=keys)
        from_frame = PairwiseAttentiveness().fit(frame)
    pd.testing.assert_series_equal(from_records.eta_, from_frame.eta_)
    with pytest.raises(ValueError, match=r"missing \['selected'\]"):
        comparisons_frame(renamed.drop(columns=["selected"]), keys)


# -- the export -------------------------------------------------------------------------------------------------
def test_weight_is_the_confidence_of_the_posterior_of_the_choice() -> None:
    frame, judge_left = comparison_records(judge_signal=1.0)
    result = export(frame, judge=judge_left.to_dict(), min_quality=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        fitted = PairwiseAttentiveness().fit(frame, judge=judge_left.to_dict())
    p_correct = fitted.annotations_.set_index(["item_id", "worker_id"])["p_correct"]
    supported = int((p_correct > 0.5).sum())
    assert len(result.records) == supported and result.report["left_out_contradicted"] == len(frame) - supported
    for record in result.records:
        assert tuple(record) == EXPORT_FIELDS
        confidence = 2 * abs(judge_left[record["item_id"]] - 0.5)
        assert record["judge_confidence"] == pytest.approx(confidence, abs=1e-6)
        expected = 2 * p_correct[(record["item_id"], record["annotator"])] - 1
        assert record["weight"] == pytest.approx(expected, abs=1e-6) and 0 < record["weight"] <= 1
        assert record["prompt"] == f"prompt of {record['item_id']}"
        assert {record["chosen"], record["rejected"]} == {f"left answer to {record['item_id']}",
                                                          f"right answer to {record['item_id']}"}


def test_unanimous_careful_annotators_keep_their_weight_whatever_the_judge_and_it_moves_with_the_evidence() -> None:
    # Issue 13: the weight was 0.999 without a judge, 0.000 with an unsure judge and higher with a judge that
    # contradicted three unanimous annotators than with one that agreed.
    frame, _ = comparison_records(n_users=30, n_per_user=40)
    careful = frame.groupby("worker_id")["choice"].size().index[:3]  # simulated users: mostly attentive
    extra = pd.DataFrame({"item_id": "x", "worker_id": list(careful), "choice": "left", "prompt": "prompt of x",
                          "response_left": "left answer to x", "response_right": "right answer to x"})
    data = pd.concat([frame, extra], ignore_index=True)

    def weight_of_x(judge_left_x: float | None) -> float:
        judge = None if judge_left_x is None else {"x": judge_left_x}
        records = export(data, judge=judge, min_quality=0.0).records
        weights = [r["weight"] for r in records if r["item_id"] == "x"]
        assert len(weights) == 3
        return float(np.mean(weights))

    alone, unsure, agrees, contradicts = (weight_of_x(p) for p in (None, 0.5, 0.9, 0.02))
    assert alone > 0.5 and unsure == pytest.approx(alone, abs=1e-3)  # an unsure judge adds nothing
    assert agrees >= alone > contradicts  # monotone in the evidence


def test_chosen_is_the_text_of_the_side_the_annotator_picked() -> None:
    frame, _ = comparison_records()
    result = export(frame, min_quality=0.0)
    picked = frame.set_index(["item_id", "worker_id"])["choice"]
    for record in result.records:
        side = picked[(record["item_id"], record["annotator"])]
        assert record["chosen"].startswith(side)
        assert record["judge_confidence"] is None
        assert 0.0 < record["weight"] <= 1.0


def test_low_quality_annotators_and_pairs_without_text_are_left_out() -> None:
    frame, _ = comparison_records(n_users=40, n_per_user=60)  # 60 random clicks stand out from the prior
    spammers = ["u0", "u1", "u2"]
    rng = np.random.default_rng(0)
    mask = frame["worker_id"].isin(spammers)
    frame.loc[mask, "choice"] = rng.choice(["left", "right"], int(mask.sum()))
    frame.loc[frame["item_id"] == frame["item_id"].iloc[-1], "response_right"] = ""
    result = export(frame)  # min_quality 0.5
    kept = {r["annotator"] for r in result.records}
    assert not kept & set(spammers)
    assert all(r["annotator_quality"] >= 0.5 for r in result.records)
    assert result.report["left_out_low_quality"] >= int(mask.sum())
    assert result.report["left_out_missing_text"] >= 1
    assert frame["item_id"].iloc[-1] not in {r["item_id"] for r in result.records}
    assert any("without a prompt or a response" in p for p in result.report["problems"])


def test_judge_verdicts_are_accepted_and_failed_ones_ignored() -> None:
    frame, _ = comparison_records()
    items = frame["item_id"].unique()
    verdicts = {items[0]: JudgeVerdict(0.9, 0.8, "left", (0.9, 0.9), "logprobs"),
                items[1]: JudgeVerdict(None, 0.0, None, (None, None), "failed", ["boom"])}
    result = export(frame, judge=verdicts, min_quality=0.0)
    confidence = {r["item_id"]: r["judge_confidence"] for r in result.records}
    assert confidence[items[0]] == pytest.approx(0.8) and confidence[items[1]] is None
    assert result.report["judged_items"] == 1


def test_skipped_choices_are_not_exported_and_jsonl_round_trips(tmp_path: Path) -> None:
    frame, _ = comparison_records()
    frame.loc[0, "choice"] = "tie"
    result = export(frame, min_quality=0.0)
    assert len(result.records) == len(frame) - 1 - result.report["left_out_contradicted"]
    assert any("tie or skip (rows 0" in p for p in result.report["problems"])
    assert write_jsonl(result.records, tmp_path / "out.jsonl") == len(result.records)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.records
    with pytest.raises(ValueError, match="min_quality"):
        export(frame, min_quality=1.5)


def test_fit_comparisons_takes_judge_verdicts_and_refuses_bad_values() -> None:
    frame, judge_left = comparison_records(judge_signal=1.0)
    verdicts = {item: {"p_left": p} for item, p in judge_left.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        est = fit_comparisons(frame, judge=verdicts)
    assert (est.items_["prior_source"] == "judge").all()
    with pytest.raises(ValueError, match="judge probabilities must be numbers"):
        fit_comparisons(frame, judge={frame["item_id"].iloc[0]: "very likely"})
