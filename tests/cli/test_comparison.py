"""`hcc annotators` and `hcc export-preferences`, run in-process through backend.cli.main.main on small files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from backend.annotators import crowd, preferences
from backend.annotators.simulation import simulate_comparisons, simulate_crowd
from backend.cli import comparison as cli_comparison
from backend.cli.main import main
from backend.labelling import llm
from tests.fault_server import Action, FaultServer, fault_server_fixture, label  # noqa: F401 - registers the fixture


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | None, str]:
    """Exit code, the JSON summary (last stdout line) and stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines and code == 0 else None), err


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    sim = simulate_comparisons(20, 15, mu=0.75, overlap_share=0.5, judge_signal=1.0, seed=3)
    frame = sim.labels.assign(prompt="p " + sim.labels["item_id"], response_left="L " + sim.labels["item_id"],
                              response_right="R " + sim.labels["item_id"], comment="ignored")
    frame.loc[2, "choice"] = "tie"
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    judge = sim.judge_left.rename("p_left").rename_axis("item_id").reset_index()
    judge.to_csv(tmp_path / "judge.csv", index=False)
    return tmp_path


def test_categorical_mode_writes_consensus_workers_and_the_report(capsys, tmp_path: Path) -> None:
    sim = simulate_crowd(80, 12, 3, kind="one_coin", seed=1)
    sim.labels.assign(note="extra column").to_csv(tmp_path / "labels.csv", index=False)
    code, summary, err = run(capsys, "annotators", "--labels", str(tmp_path / "labels.csv"),
                             "--consensus", str(tmp_path / "c.csv"), "--workers", str(tmp_path / "w.csv"),
                             "--report-png", str(tmp_path / "r.png"))
    assert code == 0, err
    consensus, workers = pd.read_csv(tmp_path / "c.csv"), pd.read_csv(tmp_path / "w.csv")
    assert list(consensus.columns) == ["item_id", "label", "confidence"]
    assert list(workers.columns[:3]) == ["worker_id", "n_labels", "quality"]
    assert len(consensus) == 80 and len(workers) == 12 and workers["n_labels"].sum() == 240
    assert consensus["confidence"].between(0, 1).all() and workers["quality"].between(0, 1).all()
    assert summary["mode"] == "categorical" and summary["items"] == 80 and summary["warnings"] == []
    assert set(summary["selection_se"]) == set(summary["selection"]) and summary["selection_se"]["0.0"] == 0.0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pairwise_mode_is_chosen_by_the_model_columns(capsys, pairs: Path) -> None:
    code, summary, err = run(capsys, "annotators", "--labels", str(pairs / "pairs.csv"), "--consensus",
                             str(pairs / "c.csv"), "--workers", str(pairs / "w.csv"),
                             "--judge", str(pairs / "judge.csv"))
    assert code == 0, err
    assert "warning: 1 rows skipped, field 'choice': tie or skip (rows 3; values tie)" in err
    consensus, workers = pd.read_csv(pairs / "c.csv"), pd.read_csv(pairs / "w.csv")
    assert list(consensus.columns[:3]) == ["item_id", "label", "confidence"]
    assert set(consensus["label"]) <= {"left", "right"} and consensus["confidence"].between(0.5, 1).all()
    assert list(workers.columns[:3]) == ["worker_id", "n_labels", "quality"]
    assert summary["mode"] == "pairwise" and summary["reference"] == "A"
    assert summary["identifiability"] == "judge+overlap" and summary["judged_items"] > 0
    assert summary["problems"] and summary["labels"] == 299


@pytest.mark.parametrize("min_quality", [0.5, 0.95])
def test_workers_file_flags_the_annotators_below_min_quality(capsys, tmp_path: Path, min_quality: float) -> None:
    # Random clickers among careful annotators, 3 annotators per item: the flag is a column a user can filter on.
    sim = simulate_comparisons(30, 60, mu=0.8, population="mix", overlap_share=1.0, seed=4)
    sim.labels.to_csv(tmp_path / "pairs.csv", index=False)
    code, summary, err = run(capsys, "annotators", "--labels", str(tmp_path / "pairs.csv"), "--consensus",
                             str(tmp_path / "c.csv"), "--workers", str(tmp_path / "w.csv"),
                             "--min-quality", str(min_quality))
    assert code == 0, err
    workers = pd.read_csv(tmp_path / "w.csv").set_index("worker_id")
    assert (workers["low_quality"] == (workers["quality"] < min_quality)).all()
    assert summary["min_quality"] == min_quality and summary["low_quality_workers"] == workers["low_quality"].sum()
    clickers = sim.eta[sim.eta == 0].index
    assert workers.loc[clickers, "low_quality"].all()  # every random clicker is flagged at either threshold


def test_min_quality_outside_0_1_exits_2(capsys, tmp_path: Path) -> None:
    simulate_crowd(20, 5, 3, seed=0).labels.to_csv(tmp_path / "labels.csv", index=False)
    code, _, err = run(capsys, "annotators", "--labels", str(tmp_path / "labels.csv"), "--consensus",
                       str(tmp_path / "c.csv"), "--workers", str(tmp_path / "w.csv"), "--min-quality", "5")
    assert code == 2 and "--min-quality must be in [0, 1], got 5.0" in err


def test_pairwise_without_model_names_warns_and_still_answers(capsys, pairs: Path) -> None:
    frame = pd.read_csv(pairs / "pairs.csv").drop(columns=["model_left", "model_right"])
    frame.to_json(pairs / "bare.jsonl", orient="records", lines=True)
    code, summary, err = run(capsys, "annotators", "--mode", "pairwise", "--labels", str(pairs / "bare.jsonl"),
                             "--consensus", str(pairs / "c.csv"), "--workers", str(pairs / "w.csv"))
    assert code == 0, err
    assert "no model_left/model_right columns" in err and summary["reference"] is None


def test_custom_field_names(capsys, tmp_path: Path) -> None:
    sim = simulate_crowd(40, 8, 3, seed=2)
    sim.labels.rename(columns={"item_id": "task", "worker_id": "annotator", "label": "answer"}).to_csv(
        tmp_path / "l.csv", index=False)
    code, summary, err = run(capsys, "annotators", "--labels", str(tmp_path / "l.csv"), "--consensus",
                             str(tmp_path / "c.csv"), "--workers", str(tmp_path / "w.csv"), "--item-field", "task",
                             "--worker-field", "annotator", "--label-field", "answer", "--model", "one_coin")
    assert code == 0, err
    assert summary["model"] == "one_coin" and summary["items"] == 40


def test_export_preferences_with_a_judge_file(capsys, pairs: Path) -> None:
    out = pairs / "prefs.jsonl"
    code, report, err = run(capsys, "export-preferences", "--labels", str(pairs / "pairs.csv"), "--out", str(out),
                            "--judge", str(pairs / "judge.csv"), "--min-quality", "0.5")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == report["pairs"] > 0
    for record in records:
        assert list(record) == list(preferences.EXPORT_FIELDS)
        assert record["annotator_quality"] >= 0.5 and 0 < record["weight"] <= 1


def test_export_preferences_with_the_llm_judge_over_http(capsys, pairs: Path, fault_server: FaultServer) -> None:
    def prefers_left_text(body: dict) -> Action:
        text = body["messages"][-1]["content"]
        return label("1" if text.split("Response 1:\n", 1)[1].startswith("L ") else "2")

    fault_server.default = prefers_left_text
    pd.read_csv(pairs / "pairs.csv").head(30).to_csv(pairs / "few.csv", index=False)
    out, verdicts = pairs / "prefs.jsonl", pairs / "verdicts.csv"
    code, report, err = run(capsys, "export-preferences", "--labels", str(pairs / "few.csv"), "--out", str(out),
                            "--llm-base-url", fault_server.url, "--judge-out", str(verdicts), "--cache-dir",
                            str(pairs / "cache"), "--llm-concurrency", "2")
    assert code == 0, err
    table = pd.read_csv(verdicts)
    assert fault_server.request_count == 2 * len(table)  # every item, both orders
    assert (table["selected"] == "left").all() and (table["p_left"] > 0.9).all()
    assert report["judged_items"] == len(table)


def test_bad_input_exits_2_with_the_field_named(capsys, tmp_path: Path, pairs: Path) -> None:
    pd.DataFrame({"item_id": ["i1"], "worker_id": ["w1"], "answer": ["a"]}).to_csv(tmp_path / "l.csv", index=False)
    code, _, err = run(capsys, "annotators", "--labels", str(tmp_path / "l.csv"), "--consensus", "c.csv",
                       "--workers", "w.csv")
    assert code == 2 and "missing ['label']" in err
    pd.DataFrame({"item_id": ["t1", "t2"], "p_left": ["0.7", "high"]}).to_csv(tmp_path / "j.csv", index=False)
    code, _, err = run(capsys, "annotators", "--labels", str(pairs / "pairs.csv"), "--consensus", "c.csv",
                       "--workers", "w.csv", "--judge", str(tmp_path / "j.csv"))
    assert code == 2 and "j.csv row 2, field 'p_left': 'high' is not a number" in err
    code, _, err = run(capsys, "export-preferences", "--labels", str(tmp_path / "nope.csv"), "--out", "o.jsonl")
    assert code == 2 and "no such file" in err


def test_cli_choices_match_the_engine() -> None:
    assert set(cli_comparison.CATEGORICAL_MODELS) == set(crowd.MODELS)
    assert set(cli_comparison.STRUCTURED_CHOICES) == set(llm.STRUCTURED_MODES)
    keys = preferences.ComparisonKeys()
    assert {name: getattr(keys, name) for name in cli_comparison.FIELD_DEFAULTS} == cli_comparison.FIELD_DEFAULTS
