"""`hcc calibrate` end to end on an `hcc annotate` output of the real encoder, and the
`--self-consistency` option of `hcc annotate` against a scripted server."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.cli.main import main
from backend.confidence.calibration import Calibrator
from tests.fault_server import (  # noqa: F401 - fault_server_fixture registers the `fault_server` fixture
    Action,
    FaultServer,
    fault_server_fixture,
    label,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "backend" / "samples"
N_LABELS = 6


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Anchors and tasks of a few Banking77 labels, annotated once by the encoder (ids t1.., one empty row)."""
    work = tmp_path_factory.mktemp("calibrate")
    anchors = read_csv(SAMPLES / "banking77_anchors.csv")
    labels = sorted({r["category"] for r in anchors})[:N_LABELS]
    write_csv(work / "anchors.csv", ["text", "label"],
              [[r["text"], r["category"]] for r in anchors if r["category"] in labels])
    tasks = [r for r in read_csv(SAMPLES / "banking77_tasks.csv") if r["category"] in labels]
    rows = [[f"t{i}", r["text"]] for i, r in enumerate(tasks, start=1)] + [[f"t{len(tasks) + 1}", "  "]]
    write_csv(work / "tasks.csv", ["id", "text"], rows)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HCC_CACHE_DIR", str(work / "cache"))
        assert main(["annotate", "--unlabeled", str(work / "tasks.csv"), "--anchors", str(work / "anchors.csv"),
                     "--out", str(work / "pred.jsonl"), "--no-llm", "--quiet"]) == 0
        yield work


def human_file(path: Path, preds: list[dict[str, Any]], *, right: int, wrong: int) -> Path:
    """Reviews of the first ``right + wrong`` labelled rows: the first ``right`` confirm the prediction, the
    rest correct it to another label, as a reviewer fixing a wrong pre-label would."""
    labelled = [p for p in preds if p["label"] is not None]
    other = sorted({p["label"] for p in labelled})
    rows = [[p["id"], p["label"]] for p in labelled[:right]]
    rows += [[p["id"], next(lab for lab in other if lab != p["label"])] for p in labelled[right:right + wrong]]
    return write_csv(path, ["id", "label"], rows)


def last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def test_calibrate_scores_flags_and_ranks_every_row(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    preds = read_jsonl(workdir / "pred.jsonl")
    human = human_file(workdir / "human.csv", preds, right=12, wrong=6)
    args = ["calibrate", "--pred", str(workdir / "pred.jsonl"), "--human", str(human), "--out",
            str(workdir / "cal.jsonl"), "--plot", str(workdir / "rel.png"), "--target-precision", "0.9",
            "--save-calibrator", str(workdir / "cal.json"), "--min-pairs", "10"]
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    rows = read_jsonl(workdir / "cal.jsonl")

    assert summary["pairs"] == 18 and summary["pairs_right"] == 12 and not summary["fallback"]
    assert summary["method"] in {"prior", "platt", "isotonic", "logistic(C=0.1)", "logistic(C=1)"}
    assert summary["pairs_metrics"]["out_of_fold"] is True
    assert [r["id"] for r in rows] == [p["id"] for p in preds]
    reviewed = [r for r in rows if r["reviewed"]]
    assert len(reviewed) == 18 and not any(r["needs_review"] or r["review_rank"] for r in reviewed)
    assert all("human_label" in r for r in reviewed)
    skipped = rows[-1]
    assert skipped["label"] is None and skipped["confidence"] == 0.0 and skipped["review_rank"] is None
    assert not skipped["needs_review"]
    open_rows = [r for r in rows if not r["reviewed"] and r["label"] is not None]
    ranked = sorted(open_rows, key=lambda r: r["review_rank"])
    assert [r["review_rank"] for r in ranked] == list(range(1, len(open_rows) + 1))
    assert [r["confidence"] for r in ranked] == sorted(r["confidence"] for r in open_rows)
    threshold = summary["threshold"]
    assert all(r["needs_review"] == (r["confidence"] < threshold) for r in open_rows)
    accepted = [r["confidence"] for r in open_rows if not r["needs_review"]]
    assert summary["flagged"] + summary["accepted"] == len(open_rows)
    if accepted:
        assert sum(accepted) / len(accepted) >= 0.9 - 1e-3
    assert (workdir / "rel.png").read_bytes()[:4] == b"\x89PNG"
    saved = Calibrator.from_dict(json.loads((workdir / "cal.json").read_text()))
    again = saved.predict_records(preds)
    assert [round(x, 4) for x in again] == [r["confidence"] for r in rows]


def test_few_reviews_fall_back_to_the_prior_and_say_so(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    preds = read_jsonl(workdir / "pred.jsonl")
    human = human_file(workdir / "few.csv", preds, right=3, wrong=0)
    assert main(["calibrate", "--pred", str(workdir / "pred.jsonl"), "--human", str(human), "--out",
                 str(workdir / "few.jsonl")]) == 0
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    assert summary["fallback"] and summary["method"] == "prior"
    assert "fallback: 3 reviewed items (3 right), fewer than 20" in captured.err
    assert all(0 <= r["confidence"] <= 1 for r in read_jsonl(workdir / "few.jsonl"))


def test_rows_are_matched_by_position_without_ids(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    preds = read_jsonl(workdir / "pred.jsonl")
    rows = [[p["label"] if i < 4 else ""] for i, p in enumerate(preds)]
    human = write_csv(workdir / "aligned.csv", ["label"], rows)
    assert main(["calibrate", "--pred", str(workdir / "pred.jsonl"), "--human", str(human), "--out",
                 str(workdir / "aligned.jsonl")]) == 0
    assert last_json(capsys.readouterr().out)["pairs"] == 4


def test_bad_inputs_give_clear_errors(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    pred = str(workdir / "pred.jsonl")
    out = str(workdir / "bad.jsonl")
    no_label = write_csv(workdir / "nolabel.csv", ["id", "verdict"], [["t1", "ok"]])
    assert main(["calibrate", "--pred", pred, "--human", str(no_label), "--out", out]) == 2
    assert "nolabel.csv: no label column" in capsys.readouterr().err

    short = write_csv(workdir / "short.csv", ["label"], [["card_arrival"]])
    assert main(["calibrate", "--pred", pred, "--human", str(short), "--out", out]) == 2
    assert "no id column" in capsys.readouterr().err

    unknown = write_csv(workdir / "unknown.csv", ["id", "label"], [["t1", "card_arrival"], ["nope", "x"]])
    assert main(["calibrate", "--pred", pred, "--human", str(unknown), "--out", out]) == 0
    assert "unknown.csv row 2, field 'id': id 'nope' is not in the predictions" in capsys.readouterr().err

    broken = workdir / "broken.jsonl"
    broken.write_text('{"label": "a"}\n{"label": \n', encoding="utf-8")
    assert main(["calibrate", "--pred", str(broken), "--human", str(unknown), "--out", out]) == 2
    assert "broken.jsonl line 2: not JSON" in capsys.readouterr().err

    assert main(["calibrate", "--pred", pred, "--human", str(unknown), "--out", out, "--target-precision", "1.5"]) == 2
    assert "--target-precision" in capsys.readouterr().err
    assert main(["calibrate", "--pred", pred, "--human", str(unknown), "--out", out, "--methods", "magic"]) == 2
    assert "methods must be" in capsys.readouterr().err


def test_the_installed_command_line(workdir: Path) -> None:
    preds = read_jsonl(workdir / "pred.jsonl")
    human = human_file(workdir / "cmd.csv", preds, right=5, wrong=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "backend.cli.main", "calibrate", "--pred", "pred.jsonl", "--human",
                           human.name, "--out", "cmd.jsonl"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["pairs"] == 6


def test_annotate_adds_self_consistency_samples(fault_server: FaultServer, workdir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    anchors = read_csv(workdir / "anchors.csv")
    first = anchors[0]["label"]

    def respond(body: dict[str, Any]) -> Action:
        # Greedy answers (temperature 0) always name the first label; samples alternate with the seed.
        if body["temperature"] == 0:
            return label(first)
        return label(first if body["seed"] % 2 else anchors[-1]["label"])

    fault_server.default = respond
    out = workdir / "sc.jsonl"
    assert main(["annotate", "--unlabeled", str(workdir / "tasks.csv"), "--anchors", str(workdir / "anchors.csv"),
                 "--out", str(out), "--llm-base-url", fault_server.url, "--self-consistency", "2", "--quiet",
                     "--combine", "dcca", "--views", "zero_shot,hinted",
                 "--cache-dir", str(workdir / "sc-cache")]) == 0
    report = last_json(capsys.readouterr().out)
    rows = read_jsonl(out)
    labelled = [r for r in rows if r["label"] is not None]
    assert all(r["llm_samples"] == [first, anchors[-1]["label"]] for r in labelled)
    assert all(r["llm_self_consistency"] == 0.5 for r in labelled)
    assert report["self_consistency"]["k"] == 2 and report["self_consistency"]["llm"]["calls"] == 2 * len(labelled)
    samples = [b for b in fault_server.requests if b["temperature"] > 0]
    assert samples and not any("logprobs" in b for b in samples)  # samples need no token probabilities
