from __future__ import annotations

import csv
from pathlib import Path

import pytest

from backend.cli import demo


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_bundled_sample_is_used_when_no_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HCC_DATA_DIR", str(tmp_path / "nowhere"))
    anchors, tasks, source = demo.prepare(tmp_path / "run", items=20, anchor_share=0.05, seed=3)
    assert source.startswith("bundled Banking77 sample")
    anchor_rows, task_rows = _rows(anchors), _rows(tasks)
    assert len(anchor_rows) == 385 and len(task_rows) == 20
    assert len({r["category"] for r in anchor_rows}) == 77  # every label has anchors
    # Seeded: the same call draws the same items.
    again = demo.prepare(tmp_path / "again", items=20, anchor_share=0.05, seed=3)[1]
    assert _rows(again) == task_rows


def test_shared_data_gives_a_share_of_train_as_anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data" / "banking77"
    data.mkdir(parents=True)
    header = "text,category\n"
    (data / "train.csv").write_text(header + "".join(f"train {i},l{i % 4}\n" for i in range(200)))
    (data / "test.csv").write_text(header + "".join(f"test {i},l{i % 4}\n" for i in range(50)))
    monkeypatch.setenv("HCC_DATA_DIR", str(tmp_path / "data"))
    anchors, tasks, source = demo.prepare(tmp_path / "run", items=30, anchor_share=0.1, seed=0)
    assert len(_rows(anchors)) == 20 and len(_rows(tasks)) == 30
    assert "20 anchors (10% of train), 30 test items" in source
    assert all(r["text"].startswith("test") for r in _rows(tasks))


def test_result_table_lists_annotators_stages_and_cai() -> None:
    records = [
        {"label": "a", "stage": "consistent", "encoder_label": "a", "llm_zero_shot": "a", "llm_hinted": "a"},
        {"label": "b", "stage": "round1", "encoder_label": "b", "llm_zero_shot": "c", "llm_hinted": "b"},
    ]
    table = demo.result_table(records, ["a", "c"], {"cai": 1.0, "resolved_ratio": 2.0,
                                                    "stages": {"unresolved": 1}})
    lines = table.splitlines()
    assert any(line.startswith("LLM zero-shot") and line.endswith("100.00") for line in lines)
    assert any(line.startswith("stage round1") and line.endswith("0.00") for line in lines)
    assert any(line.startswith("HCC final") and line.endswith("50.00") for line in lines)
    assert lines[-1] == "CAI 1.000; settled by DCCA / unresolved 2.000"


def test_result_table_does_not_print_one_over_eps_when_all_resolved() -> None:
    records = [{"label": "a", "stage": "round1", "encoder_label": "a"}]
    table = demo.result_table(records, ["a"], {"cai": 0.0, "resolved_ratio": None, "stages": {"round1": 1}})
    assert table.splitlines()[-1] == "CAI 0.000; settled by DCCA / unresolved - (all resolved)"
