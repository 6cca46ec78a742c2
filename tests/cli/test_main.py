"""The `hcc` command end to end, run as a real subprocess on small files."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.confidence.calibration import expected_calibration_error
from tests.fault_server import FaultServer, fault_server_fixture, label  # noqa: F401 - registers the fixture

ROOT = Path(__file__).resolve().parents[2]

ANCHORS = """text,label
my card has not arrived yet,card_arrival
when will my new card come in the post,card_arrival
where is the card I ordered,card_arrival
what is the exchange rate for euros,exchange_rate
how much is a dollar in pounds today,exchange_rate
which rate do you use to convert currencies,exchange_rate
I forgot my PIN,forgot_pin
,forgot_pin
I need to reset my pin number,weird_label
"""

TASKS = """id,text,label
a,the card you sent me still hasn't shown up,card_arrival
b,   ,card_arrival
c,what rate will I get converting to yen,exchange_rate
a,I can't remember the PIN for my card,forgot_pin
"""


def run_hcc(*args: str, cwd: Path, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HCC_CACHE_DIR=str(cwd / "cache"), PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "backend.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "anchors.csv").write_text(ANCHORS)
    (tmp_path / "tasks.csv").write_text(TASKS)
    (tmp_path / "labels.txt").write_text("card_arrival\nexchange_rate\nforgot_pin\ncard_linking\n")
    return tmp_path


def test_annotate_encoder_only_keeps_every_row_in_order(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--no-llm", "--quiet", "--report", "report.json", "--labels", "labels.txt", cwd=files)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "a#row4"]
    assert [r["stage"] for r in rows] == ["encoder_only", "skipped", "encoder_only", "encoder_only"]
    assert [r["label"] for r in rows] == ["card_arrival", None, "exchange_rate", "forgot_pin"]
    assert rows[1]["problems"] == ["empty_text"]
    assert "duplicate_id" in rows[3]["problems"]
    # Bad anchor rows are reported with file, row and field; the run goes on.
    assert "anchors.csv row 8, field 'text'" in proc.stderr
    assert "anchors.csv row 9, field 'label'" in proc.stderr and "weird_label" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((files / "report.json").read_text())
    assert report["stages"] == {"encoder_only": 3, "skipped": 1}
    assert report["anchors_used"] == 7
    assert "label 'card_linking' has no anchors" in proc.stderr


def test_evaluate_reports_accuracy_per_stage(files: Path) -> None:
    assert run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--no-llm", "--quiet", cwd=files).returncode == 0
    proc = run_hcc("evaluate", "--pred", "out.jsonl", "--gold", "tasks.csv", cwd=files)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n"] == 4
    assert result["accuracy"] == 0.75  # the skipped row counts as wrong
    assert result["stages"]["encoder_only"] == {"n": 3, "accuracy": 1.0}


def test_missing_label_column_is_a_clear_error(files: Path) -> None:
    (files / "nolabel.csv").write_text("text\nhello\n")
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "nolabel.csv", "--out", "o.jsonl",
                   "--no-llm", cwd=files)
    assert proc.returncode == 2
    assert "nolabel.csv: no label column" in proc.stderr
    assert not (files / "o.jsonl").exists()


def test_unreachable_llm_stops_before_any_work(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "o.jsonl",
                   "--llm-base-url", "http://127.0.0.1:9/v1", "--quiet", cwd=files)
    assert proc.returncode == 3
    assert "cannot reach the LLM server at http://127.0.0.1:9/v1" in proc.stderr
    assert "--no-llm" in proc.stderr
    assert not (files / "o.jsonl").exists()


def test_llm_required_unless_no_llm(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "o.jsonl",
                   cwd=files, env_extra={"HCC_LLM_BASE_URL": ""})
    assert proc.returncode == 2
    assert "--llm-base-url" in proc.stderr


def test_self_consistency_needs_the_zero_shot_view(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "o.jsonl",
                   "--llm-base-url", "http://127.0.0.1:9/v1", "--self-consistency", "2", cwd=files)
    assert proc.returncode == 2 and "--self-consistency samples the zero_shot view" in proc.stderr


@pytest.mark.llm
def test_annotate_by_default_with_a_real_llm_server_then_rerun_from_cache(files: Path, llm_server: str) -> None:
    args = ("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
            "--labels", "labels.txt", "--llm-base-url", llm_server, "--quiet")
    first = run_hcc(*args, cwd=files)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[1]["stage"] == "skipped"
    assert {r["stage"] for r in rows[:1] + rows[2:]} <= {"consistent", "combined", "encoder_only"}
    # few anchors: the LLM is asked about them, cannot prove itself on so few, and costs no item question
    assert report["combination"]["anchor_llm_questions"] > 0 and not report["combination"]["llm_adopted"]
    assert report["llm"]["calls"] == report["combination"]["anchor_llm_questions"]
    second = run_hcc(*args, cwd=files)
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["llm"]["calls"] == 0 and again["llm"]["cached"] == report["llm"]["calls"]
    assert [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()] == rows


@pytest.mark.llm
def test_annotate_by_the_papers_recipe_with_a_real_llm_server_then_rerun_from_cache(files: Path, llm_server: str
                                                                                     ) -> None:
    args = ("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
            "--labels", "labels.txt", "--llm-base-url", llm_server, "--quiet", "--combine", "dcca",
            "--views", "zero_shot,hinted")
    first = run_hcc(*args, cwd=files)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[1]["stage"] == "skipped"
    labels = {"card_arrival", "exchange_rate", "forgot_pin", "card_linking"}
    for row in rows[:1] + rows[2:]:
        assert row["stage"] in {"consistent", "round1", "round2", "unresolved"}
        assert row["label"] in labels
        for view in ("llm_zero_shot", "llm_hinted"):
            # A valid answer is a label of the set; an invalid one is null with the raw answer kept.
            assert row[view] in labels or (row[view] is None and f"{view}_raw" in row)
        assert 0.0 <= row["score"] <= 1.0
    assert sum(report["stages"].values()) == 4
    assert report["llm"]["calls"] >= 6 and report["llm"]["prompt_tokens"] > 0
    assert report["cai"] >= 0 and (report["resolved_ratio"] is None or report["resolved_ratio"] >= 0)

    second = run_hcc(*args, cwd=files)
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout.strip().splitlines()[-1])
    assert again["llm"]["calls"] == 0 and again["llm"]["cached"] == 6
    assert [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()] == rows


def test_demo_without_llm_prints_the_table(tmp_path: Path) -> None:
    proc = run_hcc("demo", "--offline", "--no-llm", "--no-train", "--items", "30", "--workdir", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "encoder (anchors)" in proc.stdout and "stage encoder_only" in proc.stdout
    assert len((tmp_path / "run" / "annotations.jsonl").read_text().splitlines()) == 30


def anchors_weighed(views_message: str) -> int:
    """How many anchors the views' verdict rests on, from its message."""
    found = re.search(r"(\d+) anchors", views_message)
    assert found, views_message
    return int(found.group(1))


@pytest.mark.llm
def test_demo_with_an_llm_server(tmp_path: Path, llm_server: str) -> None:
    proc = run_hcc("demo", "--offline", "--items", "8", "--workdir", "run", "--llm-base-url", llm_server,
                   "--no-train", "--anchor-llm-cap", "30", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for line in ("encoder (anchors)", "HCC final", "views: "):  # the views' verdict, whatever SmolLM earns
        assert line in proc.stdout
    views = next(line for line in proc.stdout.splitlines() if line.startswith("views: "))
    assert anchors_weighed(views) <= 30


def test_an_anchor_llm_cap_too_small_to_weigh_the_llm_is_refused_before_anything_starts(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--anchor-llm-cap", "5", "--llm-base-url", "http://127.0.0.1:9/v1", cwd=files)
    assert proc.returncode == 2 and "anchor_llm_cap must be 0" in proc.stderr and "got 5" in proc.stderr
    proc = run_hcc("demo", "--anchor-llm-cap", "5", "--workdir", "run", cwd=files)  # with Label Studio
    assert proc.returncode == 2 and "got 5" in proc.stderr
    assert not (files / "run").exists()  # nothing started, no data prepared


def test_demo_options_reach_the_backend_as_its_settings(monkeypatch) -> None:
    from backend.cli.main import backend_env_for_demo, build_parser
    from backend.studio.settings import Settings

    assert backend_env_for_demo(build_parser().parse_args(["demo"])) == ({}, [])  # the backend's defaults hold
    args = build_parser().parse_args(["demo", "--classifier", "ensemble", "--combine", "dcca", "--anchor-llm-cap",
                                      "30", "--no-transductive", "--no-train", "--k", "5", "--llm-gate", "0.9"])
    env, offline_only = backend_env_for_demo(args)
    assert offline_only == ["--k", "--llm-gate"]  # no backend setting: the demo warns about them
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()  # every name is one the backend reads, every value one it accepts
    assert (settings.hcc.classifier, settings.hcc.combine, settings.hcc.anchor_llm_cap) == ("ensemble", "dcca", 30)
    assert settings.hcc.transductive is False and settings.train is False


def test_demo_gives_the_backend_a_local_encoder_as_an_absolute_path_and_other_values_as_they_are(
        tmp_path: Path, monkeypatch) -> None:
    from backend.cli.main import backend_env_for_demo, build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-encoder").mkdir()
    (tmp_path / "dcca").write_text("a file that happens to share an option's value")
    args = build_parser().parse_args(["demo", "--encoder", "my-encoder", "--combine", "dcca",
                                      "--second-encoder", "all-mpnet-base-v2"])
    env, _ = backend_env_for_demo(args)
    assert env == {"HCC_ENCODER": str((tmp_path / "my-encoder").resolve()), "HCC_COMBINE": "dcca",
                   "HCC_SECOND_ENCODER": "all-mpnet-base-v2"}


def test_label_descriptions_and_seed_reach_the_llm(files: Path, fault_server: FaultServer) -> None:
    (files / "labels.json").write_text(json.dumps({
        "card_arrival": "a card the customer ordered has not come", "exchange_rate": None,
        "forgot_pin": "the customer cannot remember the PIN"}))
    fault_server.default = label("forgot_pin")
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--labels", "labels.json", "--llm-base-url", fault_server.url, "--seed", "7", "--quiet",
                   "--no-logprobs", "--combine", "dcca", "--views", "zero_shot,hinted", cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert fault_server.request_count == 6  # 3 texts x (zero-shot, hinted); the empty row costs nothing
    system = fault_server.requests[0]["messages"][0]["content"]
    assert "- card_arrival: a card the customer ordered has not come" in system
    assert "- exchange_rate\n" in system
    assert {body["seed"] for body in fault_server.requests} == {7}
    rows = [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()]
    # The server says forgot_pin for everything: only the PIN question is consistent.
    assert [r["stage"] for r in rows][3] == "consistent"
    assert rows[0]["llm_zero_shot"] == "forgot_pin" and rows[0]["stage"] != "consistent"


@pytest.mark.llm
def test_main_job_prelabels_a_project_and_stops(tmp_path: Path, llm_server: str, label_studio: dict) -> None:
    """`hcc demo` (the README's main command) on the bundled sample, against the session's Label Studio
    (starting Label Studio itself is the same code, exercised by the `label_studio` fixture)."""
    env = {"HCC_DATA_DIR": str(tmp_path / "no-shared-data")}  # force the sample the project ships
    proc = run_hcc("demo", "--items", "5", "--workdir", "run", "--llm-base-url", llm_server, "--backend-port", "0",
                   "--label-studio-url", label_studio["url"], "--api-key", label_studio["token"],
                   "--anchor-llm-cap", "30", "--k", "5",
                   "--exit-when-done", "--timeout", "400", cwd=tmp_path, env_extra=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HCC_ANCHOR_LLM_CAP=30" in proc.stderr and "warning: --k applies only with --offline" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tasks_labelled"] == 5 and summary["anchors"] > 0
    # the views' verdict on the anchors, and CAI where the LLM labelled items (SmolLM seldom earns that)
    assert summary["views"] and 0 <= summary["needs_review"] <= 5
    assert anchors_weighed(summary["views"]) <= 30  # the backend took the demo's option
    assert summary["cai"] is None or summary["cai"] >= 0
    assert 0 <= summary["accuracy"] <= 1
    assert summary["label_studio"] == label_studio["url"]
    assert "api_key" not in summary and "Needs review" in proc.stdout
    assert (tmp_path / "run" / "backend.log").exists()


def test_encoder_list_and_pull_errors(tmp_path: Path) -> None:
    proc = run_hcc("encoder", "list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("all-MiniLM-L6-v2 (default)") and "not on disk" not in lines[0]
    assert lines[1].startswith("all-mpnet-base-v2") and lines[1].endswith("[not on disk]")  # empty HCC_CACHE_DIR
    proc = run_hcc("encoder", "pull", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown packaged encoder 'nope'" in proc.stderr


def test_annotate_with_an_encoder_that_is_not_pulled_says_how_to_get_it(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--no-llm", "--quiet", "--encoder", "all-mpnet-base-v2", cwd=files)
    assert proc.returncode == 2
    assert "hcc encoder pull all-mpnet-base-v2" in proc.stderr
    assert not (files / "out.jsonl").exists() or not (files / "out.jsonl").read_text()


def test_annotate_in_float32_and_bfloat16_gives_the_same_labels(files: Path) -> None:
    labels = {}
    for precision in ("float32", "bfloat16"):
        out = files / f"{precision}.jsonl"
        proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", out.name,
                       "--no-llm", "--quiet", "--encoder-precision", precision, cwd=files)
        assert proc.returncode == 0, proc.stderr
        labels[precision] = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels["float32"] == labels["bfloat16"] == ["card_arrival", None, "exchange_rate", "forgot_pin"]


SNOW_RTE_ITEMS = ROOT.parent / "shared" / "data" / "crowd_workers" / "snow2008_rte_items.csv"


@pytest.mark.skipif(not SNOW_RTE_ITEMS.is_file(), reason="../shared/data/crowd_workers is not present")
def test_annotate_rescales_the_prior_where_the_anchors_show_the_encoder_guessing(tmp_path: Path) -> None:
    # Textual entailment: the encoder's nearest anchors say little about it (about half right), while the
    # packaged mapping, fitted on Banking77, spreads its confidence as if they said a lot.
    with SNOW_RTE_ITEMS.open(newline="", encoding="utf-8") as fh:
        rows = [{"text": f"{r['text']} Hypothesis: {r['hypothesis']}",
                 "label": ["not_entailment", "entailment"][int(r["gold"])]} for r in csv.DictReader(fh)]
    for name, part in (("anchors.csv", rows[:200]), ("tasks.csv", rows[200:320])):
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    outputs = {}
    for flag in ([], ["--packaged-prior"]):
        proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                       "--no-llm", "--no-train", *flag, cwd=tmp_path)  # the prior of the frozen encoder
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        right = [r["label"] == t["label"] for r, t in zip(out, rows[200:320], strict=True)]
        ece = expected_calibration_error([r["prior_probability"] for r in out], right)
        outputs[bool(flag)] = (report["prior"], ece, np.mean(right))
        assert f"prior: {report['prior']['message']}" in proc.stderr
    (adapted, ece_adapted, right), (packaged, ece_packaged, _) = outputs[False], outputs[True]
    assert 0.35 < right < 0.65
    assert adapted["adapted"] and adapted["pairs"] == 200 and "rescaled on 200" in adapted["message"]
    assert not packaged["adapted"] and "adapt_prior is off" in packaged["message"]
    # Calibration error of the prior (no review yet) on the 120 items.
    assert ece_adapted < 0.1 < ece_packaged


def test_annotate_with_a_second_encoder_adds_its_signals(files: Path) -> None:
    proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                   "--no-llm", "--quiet", "--second-encoder", "all-MiniLM-L6-v2", cwd=files)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (files / "out.jsonl").read_text().splitlines()]
    labelled = [r for r in rows if r["label"] is not None]
    # The same model twice: the second opinion repeats the first.
    assert all(r["encoder2_label"] == r["encoder_label"] for r in labelled)
    assert all(abs(r["encoder2_probability"] - r["encoder_probability"]) < 1e-4 for r in labelled)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "encoder2_logit" in report["prior"]["weights"] and "encode2" in report["seconds"]
    missing = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out2.jsonl",
                      "--no-llm", "--quiet", "--second-encoder", "all-mpnet-base-v2", cwd=files,
                      env_extra={"HCC_CACHE_DIR": str(files / "empty-cache")})
    assert missing.returncode != 0 and "hcc encoder pull all-mpnet-base-v2" in missing.stderr
    assert not (files / "out2.jsonl").exists()


def _write_labelled(path: Path, texts: list[str], labels: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))


def test_train_writes_an_adopted_model_and_annotate_trains_by_default(tmp_path: Path) -> None:
    from tests.synthetic_text import misleading_set

    _write_labelled(tmp_path / "anchors.csv", *misleading_set(15, seed=0))
    texts, labels = misleading_set(5, seed=9)
    _write_labelled(tmp_path / "tasks.csv", texts, labels)
    proc = run_hcc("train", "--anchors", "anchors.csv", "--out", "model", "--train-max-steps", "16", "--quiet",
                   "--train-refit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["adopted"] and result["model_path"] == str((tmp_path / "model").resolve())
    assert "adopted: the trained encoder classifies" in proc.stderr
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "hcc_training.json").is_file()
    assert result["refit_anchors"] == 60 and result["steps"] == 32  # adopted, then trained again on every anchor
    proc = run_hcc("train", "--anchors", "anchors.csv", "--out", "fit-part", "--train-max-steps", "16", "--quiet",
                   cwd=tmp_path)  # the default: the fit part's model
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["adopted"] and result["refit_anchors"] == 0 and result["steps"] == 16

    runs = {}
    for flags in ([], ["--no-train"]):
        proc = run_hcc("annotate", "--unlabeled", "tasks.csv", "--anchors", "anchors.csv", "--out", "out.jsonl",
                       "--no-llm", "--quiet", "--train-max-steps", "16", *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        runs[bool(flags)] = (report, np.mean([r["label"] == lab for r, lab in zip(out, labels, strict=True)]))
    trained, frozen = runs[False], runs[True]
    assert trained[0]["training"]["adopted"] and "training" not in frozen[0]
    assert trained[1] > frozen[1], (trained[1], frozen[1])  # the texts are built to mislead the frozen encoder


def test_train_refuses_bad_settings_and_reports_too_few_anchors(files: Path) -> None:
    proc = run_hcc("train", "--anchors", "anchors.csv", "--out", "m", "--train-holdout", "2", cwd=files)
    assert proc.returncode == 2 and "holdout must be a share in (0, 1)" in proc.stderr
    proc = run_hcc("train", "--anchors", "anchors.csv", "--out", "m", "--quiet", cwd=files)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["adopted"] and "not trained" in result["reason"]
    assert "row 8, field 'text'" in proc.stderr  # the anchors' row problems are reported as in annotate
