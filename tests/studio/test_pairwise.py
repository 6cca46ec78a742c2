"""Comparison mode (``<Pairwise>``) in Label Studio.

Fast tests of the pieces (no server), then end to end against a real Label Studio 1.23.2, the real backend
process and SmolLM2 as the judge: pre-annotation on import, bad task data, annotator quality from the
webhooks (two careful annotators and one who always clicks left), task meta, and the preference export
read from the live project.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import BackendProcess, backend_status, project_tasks, settled_status, wait_until

from backend.annotators.preferences import EXPORT_FIELDS
from backend.annotators.simulation import simulate_comparisons
from backend.cli.main import main
from backend.studio.client import StudioClient, TaskRecord
from backend.studio.jobs import JobQueue
from backend.studio.labelconfig import PairwiseTarget
from backend.studio.pairwise import (
    ENV_MIN_QUALITY,
    META_KEY,
    ComparisonStore,
    PairDataError,
    PairwiseKeys,
    PairwiseProjectModel,
    comparison_records,
    estimate_annotators,
    low_quality_marks,
    min_quality_from_env,
    pair_texts,
    require_pairwise_target,
)
from backend.studio.settings import Settings
from backend.studio.store import ProjectStore
from tests.fault_server import Action, FaultServer, fault_server_fixture  # noqa: F401 - registers the fixture
from tests.fault_server import label as llm_label

_wait, _status, _settled, _tasks = wait_until, backend_status, settled_status, project_tasks  # short names

CONFIG = ('<View><Text name="prompt" value="$prompt"/><Text name="left" value="$response_left"/>'
          '<Text name="right" value="$response_right"/><Pairwise name="pw" toName="left,right"/></View>')
TARGET = PairwiseTarget("pw", "left", "right", "response_left", "response_right")
STRONG, WEAK = "model-A", "model-B"
# (prompt, the strong model's response, the weak model's response); items reuse them, so SmolLM2 is asked
# about 4 pairs (8 calls): the 3 with the strong model on the right, and the first also the other way round.
PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France.", "The capital of France is Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("What is 12 times 3?", "12 times 3 is 36.", "12 times 3 is 15."),
]
N_ITEMS = 16
LEFT_CLICKER_ITEMS = 12  # the left clicker compares items 0..11; 12..15 only have careful annotators


def region(selected: str, name: str = "pw") -> dict:
    return {"from_name": name, "to_name": name, "type": "pairwise", "value": {"selected": selected}}


def item(i: int) -> dict:
    """Item i: the strong model is on the left for every sixth item, on the right otherwise."""
    prompt, good, bad = PAIRS[i % len(PAIRS)]
    strong_left = i % 6 == 0
    return {"prompt": prompt, "response_left": good if strong_left else bad,
            "response_right": bad if strong_left else good, "model_left": STRONG if strong_left else WEAK,
            "model_right": WEAK if strong_left else STRONG, "n": i}


def strong_side(data: dict) -> str:
    return "left" if data["model_left"] == STRONG else "right"


# -- pieces, no server ---------------------------------------------------------------------------------------
def test_comparison_records_keep_submitted_choices_only() -> None:
    data = {"question": "Q?", "response_left": "L", "response_right": "R", "left_model": "m1", "right_model": "m2"}
    tasks = [
        {"id": 7, "data": data, "annotations": [
            {"id": 1, "completed_by": 3, "result": [region("left")]},
            {"id": 2, "completed_by": {"id": 4, "email": "b@x"}, "result": [region("right")]},  # expanded user
            {"id": 3, "completed_by": 5, "result": [region("left")], "was_cancelled": True},  # skipped
            {"id": 4, "completed_by": 6, "result": []},  # submitted without a selection
            {"id": 5, "completed_by": 7, "result": [region("none")]},
            {"id": 6, "completed_by": 8, "result": [region("left", name="other")]},  # another control
            {"id": 8, "result": [region("right")]},  # no annotator
        ]},
        TaskRecord(id=9, data={"response_left": "L9"}, meta={}, predictions=[],
                   annotations=[{"id": 9, "completed_by": 3, "result": [region("right")]}]),
    ]
    problems: list[str] = []
    keys = PairwiseKeys(prompt="question", model_left="left_model", model_right="right_model")
    records = comparison_records(tasks, TARGET, keys, problems)
    assert [(r["annotation_id"], r["item_id"], r["worker_id"], r["choice"]) for r in records] == [
        (1, "7", "3", "left"), (2, "7", "4", "right"), (9, "9", "3", "right")]
    assert records[0] == {"annotation_id": 1, "item_id": "7", "worker_id": "3", "choice": "left",
                          "prompt": "Q?", "response_left": "L", "response_right": "R", "model_left": "m1",
                          "model_right": "m2"}
    assert records[2]["prompt"] == records[2]["response_right"] == records[2]["model_left"] == ""  # missing keys
    assert problems == ["task 7, annotation 8: no annotator (completed_by); left out"]
    # The default keys read prompt/model_left/model_right: here absent, so empty.
    assert comparison_records(tasks[:1], TARGET)[0]["prompt"] == ""


def test_pair_texts_name_the_task_and_the_field() -> None:
    keys = PairwiseKeys()
    assert pair_texts({"id": 1, "data": {"response_left": "a", "response_right": "b"}}, TARGET, keys) == ("", "a", "b")
    assert pair_texts({"id": 1, "data": {"prompt": 6, "response_left": 42, "response_right": 4.2}}, TARGET,
                      keys) == ("6", "42", "4.2")  # numbers are shown as text by <Text>
    cases = [({"response_left": "a"}, "task 5: data field 'response_right' (from <Text value=\"$response_right\">) "
                                      "is missing"),
             ({"response_left": {"t": 1}, "response_right": "b"}, "task 5: data field 'response_left' must be a "
                                                                 "string, got dict"),
             ({"response_left": "a", "response_right": "  "}, "task 5: data field 'response_right' is empty"),
             ({"response_left": "a", "response_right": "b", "prompt": ["x"]}, "task 5: data field 'prompt' (the "
                                                                               "prompt) must be a string, got list")]
    for data, message in cases:
        with pytest.raises(PairDataError) as exc:
            pair_texts({"id": 5, "data": data}, TARGET, keys)
        assert str(exc.value) == message
    with pytest.raises(PairDataError, match="task 6: has no 'data' object"):
        pair_texts({"id": 6}, TARGET, keys)


def test_settings_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MIN_QUALITY, "high")
    with pytest.raises(ValueError, match="HCC_MIN_ANNOTATOR_QUALITY must be a number in \\[0, 1\\], got 'high'"):
        min_quality_from_env()
    monkeypatch.setenv(ENV_MIN_QUALITY, "1.5")
    with pytest.raises(ValueError, match="got '1.5'"):
        min_quality_from_env()
    monkeypatch.setenv(ENV_MIN_QUALITY, "0.7")
    assert min_quality_from_env() == 0.7
    monkeypatch.setenv("HCC_PAIRWISE_PROMPT_KEY", "question")
    assert PairwiseKeys.from_env() == PairwiseKeys(prompt="question")
    with pytest.raises(ValueError, match="project 3: the labelling config has no <Pairwise>"):
        require_pairwise_target('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>'
                                '<Choice value="b"/></Choices></View>', 3)


def test_comparison_store_put_remove_and_sync(tmp_path: Path) -> None:
    table = ComparisonStore(ProjectStore(tmp_path))
    rec = {"annotation_id": 1, "item_id": "10", "worker_id": "3", "choice": "left", "prompt": "p",
           "model_left": "a", "model_right": "b"}
    assert table.put(rec) and not table.put(rec)  # unchanged: no re-estimation needed
    assert table.put({**rec, "choice": "right"})
    assert table.put({**rec, "annotation_id": 2, "item_id": "11"})
    assert [(r["annotation_id"], r["choice"]) for r in table.records()] == [(1, "right"), (2, "left")]
    listed_at = time.time()
    time.sleep(0.01)
    table.put({**rec, "annotation_id": 3, "item_id": "12"})  # a webhook that came in while Label Studio was read
    assert table.sync([{**rec, "annotation_id": 4, "item_id": "13"}], listed_at=listed_at)
    assert sorted(r["annotation_id"] for r in table.records()) == [3, 4]  # 1, 2 gone; 3 is newer than the listing
    assert not table.sync([{**rec, "annotation_id": 4, "item_id": "13"}], listed_at=listed_at)
    assert table.remove([4, 99]) == 1 and table.remove_tasks([12]) == 1 and table.records() == []


def design_records(n_items: int = N_ITEMS, left_clicker_items: int = LEFT_CLICKER_ITEMS) -> list[dict]:
    """Careful annotators 1 and 2 pick the strong model everywhere; annotator 3 always clicks left."""
    records = []
    for i in range(n_items):
        data = item(i)
        for worker in ("1", "2", "3"):
            if worker == "3" and i >= left_clicker_items:
                continue
            choice = "left" if worker == "3" else strong_side(data)
            records.append({"annotation_id": len(records) + 1, "item_id": str(100 + i), "worker_id": worker,
                            "choice": choice, "prompt": data["prompt"], "model_left": data["model_left"],
                            "model_right": data["model_right"]})
    return records


def test_estimate_flags_the_left_clicker() -> None:
    records = design_records()
    report = estimate_annotators(records, min_quality=0.5)
    quality = {a["worker_id"]: a["quality"] for a in report["annotators"]}
    assert quality["1"] > 0.5 and quality["2"] > 0.5 and quality["3"] < 0.5
    assert report["low_quality_annotators"] == [3] and report["reference"] == STRONG  # the highest win rate
    assert "overlap" in report["identifiability"] and report["n_comparisons"] == len(records)
    marks = low_quality_marks(records, report["low_quality_annotators"])
    assert marks == {str(100 + i): [3] for i in range(LEFT_CLICKER_ITEMS)}
    # The reference can be named; a name no item shows is an error naming it.
    assert estimate_annotators(records, reference=WEAK)["reference"] == WEAK
    with pytest.raises(ValueError, match="'model-C'"):
        estimate_annotators(records, reference="model-C")


def test_the_judge_prior_makes_the_flags_work_with_one_annotator_per_task() -> None:
    # One annotator per task, a fifth of them random clickers: without a judge only eta (mu - 1/2) is
    # identified, the prior sets the scale and nobody is flagged; the judge's prior identifies eta.
    sim = simulate_comparisons(30, 50, mu=0.7, population="mix", judge_signal=1.0, seed=5)
    records = sim.labels.to_dict("records")
    clickers = {str(w) for w in sim.eta[sim.eta == 0].index}
    alone = estimate_annotators(records)
    judged = estimate_annotators(records, judge=sim.judge_left.to_dict())
    assert alone["identifiability"] == "product_only" and alone["judged_items"] == 0
    assert judged["identifiability"] == "judge" and judged["judged_items"] == len(sim.judge_left)
    assert len(clickers) >= 3 and not set(alone["low_quality_annotators"]) & clickers
    flagged = set(judged["low_quality_annotators"])
    assert len(flagged & clickers) >= len(clickers) / 2 and flagged <= clickers


def test_predictions_keep_the_judge_verdict_and_the_estimate_uses_it(tmp_path: Path,
                                                                     fault_server: FaultServer) -> None:
    good = {strong for _, strong, _ in PAIRS}

    def prefers_the_strong_model(body: dict) -> Action:
        first = body["messages"][-1]["content"].split("Response 1:\n", 1)[1].split("\n\nResponse 2:", 1)[0]
        return llm_label("1" if first in good else "2")

    fault_server.default = prefers_the_strong_model
    settings = Settings(model_dir=tmp_path, llm_base_url=fault_server.url, llm_structured="json_schema")
    model = PairwiseProjectModel(5, TARGET, settings, client=lambda: StudioClient("", ""))
    tasks = [{"id": 100 + i, "data": item(i)} for i in range(N_ITEMS)]
    preds = model.predict(tasks)
    assert [p["result"][0]["value"]["selected"] for p in preds] == [strong_side(t["data"]) for t in tasks]
    kept = model.comparisons.judge(str(t["id"]) for t in tasks)
    assert set(kept) == {str(t["id"]) for t in tasks}
    assert all((p > 0.5) == (strong_side(t["data"]) == "left") for t, p in zip(tasks, kept.values(), strict=True))
    for record in design_records():
        model.comparisons.put(record)
    with pytest.raises(Exception, match="LABEL_STUDIO_URL"):  # the meta step needs Label Studio; the rest is done
        model.reestimate(model.client)
    summary = model.store.get("annotators_summary")
    assert summary["judged_items"] == N_ITEMS and summary["identifiability"] == "judge+overlap"
    model.comparisons.remove_tasks([100])
    assert "100" not in model.comparisons.judge(str(t["id"]) for t in tasks)


def test_model_without_llm_or_label_studio_reports_instead_of_crashing(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path)  # no LLM, no Label Studio
    model = PairwiseProjectModel(4, TARGET, settings, client=lambda: StudioClient(settings.label_studio_url,
                                                                                  settings.label_studio_api_key))
    assert model.store.get("kind") == "pairwise"
    preds = model.predict([{"id": 1, "data": item(0)}, {"id": 2, "data": {"response_left": "x"}}])
    assert preds[0]["result"] == [] and "task 1: no LLM judge is configured" in preds[0]["error"]
    assert preds[1]["result"] == [] and "task 2: data field 'response_right'" in preds[1]["error"]
    assert all(p["model_version"] == settings.model_version for p in preds)

    jobs = JobQueue()
    payload = {"annotation": {"id": 11, "completed_by": 2, "result": [region("right")]},
               "task": {"id": 1, "data": item(0)}}
    t0 = time.perf_counter()
    answer = model.webhook("ANNOTATION_CREATED", payload, jobs)
    assert time.perf_counter() - t0 < 1.0  # Label Studio's webhook timeout
    assert answer == {"status": "ok", "comparison": "right", "queued": True}
    assert jobs.wait_idle(30)
    job = model.store.get("job")
    assert job["state"] == "failed" and "LABEL_STUDIO_URL is not set" in job["error"]  # only the meta step needs it
    summary = model.store.get("annotators_summary")
    assert summary["n_comparisons"] == 1 and Path(summary["table"]).is_file()
    skipped = {**payload, "annotation": {**payload["annotation"], "was_cancelled": True}}
    assert model.webhook("ANNOTATION_UPDATED", skipped, jobs)["comparison"] is None
    assert model.comparisons.records() == []
    assert model.webhook("TASKS_UPDATED", payload, jobs) == {"status": "ignored", "action": "TASKS_UPDATED"}
    bad = model.webhook("ANNOTATION_CREATED", {**payload, "task": {"id": "seven", "data": item(0)}}, jobs)
    assert bad["status"] == "ignored" and "malformed ANNOTATION_CREATED payload" in bad["reason"]
    assert model.webhook("ANNOTATIONS_DELETED", {"annotations": [{"id": None}]}, jobs)["status"] == "ignored"


# -- end to end ----------------------------------------------------------------------------------------------








@pytest.fixture(scope="module")
def world(label_studio, llm_server, tmp_path_factory):
    from label_studio_sdk import LabelStudio

    workdir = tmp_path_factory.mktemp("pairwise")
    env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": label_studio["token"],
           "MODEL_DIR": str(workdir / "model_dir"), "HCC_LLM_BASE_URL": llm_server, "HCC_LLM_MODEL": "smollm2-135m",
           "HCC_LLM_STRUCTURED": "grammar", "LOG_LEVEL": "INFO"}
    backend = BackendProcess(env, workdir / "backend.log")
    try:  # the backend is stopped even when the setup fails
        ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
        project = ls.projects.create(title="hcc pairwise", label_config=CONFIG)
        ml = ls.ml.create(url=backend.url, project=project.id, title="hcc")
        broken = {**item(99), "n": "broken", "response_right": ""}  # Label Studio refuses a task without the key
        ls.projects.import_tasks(id=project.id, request=[{"data": item(i)} for i in range(N_ITEMS)]
                                 + [{"data": broken}])
        world = {"ls": ls, "project": project.id, "backend": backend, "url": label_studio["url"],
                 "token": label_studio["token"], "workdir": workdir, "ml": ml.id,
                 "model_dir": Path(env["MODEL_DIR"])}
        _wait(lambda: "prelabel" in _status(world)["job"].get("last", {}), timeout=120, what="pre-annotation")
        yield world
    finally:
        backend.stop()


def test_import_preannotates_every_pair_with_the_judge(world):
    ls = world["ls"]
    version = ls.projects.get(id=world["project"]).model_version
    assert version == requests.get(f"{world['backend'].url}/health", timeout=5).json()["model_version"]
    tasks = _tasks(world)
    preferred = {}
    for task in tasks.values():
        data = task["data"]
        ours = [p for p in task["predictions"] if p["model_version"] == version]
        if data["n"] == "broken":
            assert ours == []
            continue
        assert len(ours) == 1, f"task {task['id']}: {task['predictions']}"
        (pred,) = ours
        (result,) = pred["result"]
        assert {k: result[k] for k in ("from_name", "to_name", "type")} == {"from_name": "pw", "to_name": "pw",
                                                                            "type": "pairwise"}
        assert result["value"]["selected"] in ("left", "right") and 0.0 <= pred["score"] <= 1.0
        model = data[f"model_{result['value']['selected']}"]
        # Both orders are asked, so a pair shown the other way round gets the same model and confidence.
        preferred.setdefault(data["prompt"], set()).add((model, round(pred["score"], 4)))
    assert len(preferred) == len(PAIRS) and all(len(v) == 1 for v in preferred.values()), preferred
    broken = next(t for t in tasks.values() if t["data"]["n"] == "broken")
    last = _status(world)["job"]["last"]["prelabel"]
    assert last["predictions_written"] == N_ITEMS and last["n_errors"] == 1
    assert last["errors"] == [f"task {broken['id']}: data field 'response_right' is empty"]


def test_predict_names_the_task_and_the_missing_key(world):
    tasks = sorted(_tasks(world).values(), key=lambda t: t["id"])
    good = tasks[0]
    body = {"tasks": [{"id": good["id"], "data": good["data"]},
                      {"id": 999991, "data": {"prompt": "p", "response_left": "a"}},
                      {"id": 999992, "data": {"prompt": "p", "response_left": [1], "response_right": "b"}}],
            "project": f"{world['project']}.0", "label_config": CONFIG}
    r = requests.post(f"{world['backend'].url}/predict", json=body, timeout=120)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3
    assert results[0]["result"][0]["value"]["selected"] in ("left", "right")
    assert results[1]["result"] == [] and "task 999991" in results[1]["error"] and "'response_right'" in \
        results[1]["error"]
    assert results[2]["result"] == [] and "'response_left' must be a string" in results[2]["error"]


@pytest.fixture(scope="module")
def annotated(world):
    """Two careful annotators pick the strong model's response everywhere; the third clicks left on the first
    LEFT_CLICKER_ITEMS items."""
    ls = world["ls"]
    stamp = int(time.time() * 1000)
    users = [ls.users.create(email=f"{name}-{stamp}@example.com", username=f"{name}-{stamp}").id
             for name in ("careful1", "careful2", "leftclicker")]
    tasks = sorted((t for t in _tasks(world).values() if t["data"]["n"] != "broken"), key=lambda t: t["data"]["n"])
    jobs = [(t["id"], user, strong_side(t["data"]) if user != users[2] else "left")
            for t in tasks for user in users if user != users[2] or t["data"]["n"] < LEFT_CLICKER_ITEMS]

    def create(job):
        task_id, user, side = job
        return ls.annotations.create(id=task_id, result=[region(side)], completed_by=user).id

    t0 = time.time()
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(create, jobs))
    per_call = (time.time() - t0) / len(jobs) * 4
    assert per_call < 5  # Label Studio waited on our webhook each time: it must be answered at once
    _wait(lambda: _status(world)["annotators"].get("n_comparisons") == len(jobs) and _settled(world), timeout=60,
          what="the annotator estimate over every comparison")
    return {"users": users, "annotations": dict(zip(ids, jobs, strict=True)), "tasks": tasks}


def test_annotators_are_estimated_from_the_webhooks(world, annotated):
    careful1, careful2, clicker = annotated["users"]
    summary = _status(world)["annotators"]
    quality = {int(a["worker_id"]): a["quality"] for a in summary["annotators"]}
    assert quality[careful1] >= summary["min_quality"] and quality[careful2] >= summary["min_quality"]
    assert quality[clicker] < summary["min_quality"]
    assert summary["low_quality_annotators"] == [clicker] and summary["reference"] == STRONG
    # The backend's numbers are the EM's on what Label Studio holds.
    target = PairwiseTarget("pw", "left", "right", "response_left", "response_right")
    records = comparison_records(_tasks(world).values(), target)
    # ... with the judge's verdicts on the tasks it pre-annotated as priors (kept in the project's state).
    state = ProjectStore(Settings(model_dir=world["model_dir"]).project_dir(world["project"]))
    verdicts = ComparisonStore(state).judge(r["item_id"] for r in records)
    assert summary["judged_items"] == len(verdicts) > 0
    direct = estimate_annotators(records, judge=verdicts)
    assert {int(a["worker_id"]): a["quality"] for a in direct["annotators"]} == pytest.approx(quality, abs=1e-6)
    with open(summary["table"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["worker_id", "n_labels", "quality"]
    assert {int(r["worker_id"]): (int(r["n_labels"]), float(r["quality"])) for r in rows} == {
        u: (sum(1 for _, user, _ in annotated["annotations"].values() if user == u), pytest.approx(quality[u]))
        for u in annotated["users"]}
    report = json.loads(Path(summary["report"]).read_text())
    assert report["n_comparisons"] == len(annotated["annotations"]) and report["mu"] == summary["mu"]
    for task in _tasks(world).values():
        clicked = task["data"]["n"] != "broken" and task["data"]["n"] < LEFT_CLICKER_ITEMS
        if clicked:
            assert task["meta"].get(META_KEY) == [clicker], task
        else:  # never flagged, or no longer (an early estimate may flag on little data)
            assert task["meta"].get(META_KEY) in (None, []), task


def test_export_preferences_reads_the_live_project(world, annotated, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    code = main(["export-preferences", "--project", str(world["project"]), "--label-studio-url", world["url"],
                 "--api-key", world["token"], "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    careful = set(annotated["users"][:2])
    kept = [job for job in annotated["annotations"].values() if job[1] in careful]
    assert len(lines) == report["pairs"] == len(kept)
    assert report["left_out_low_quality"] == len(annotated["annotations"]) - len(kept)
    by_prompt = {prompt: good for prompt, good, _ in PAIRS}
    for line in lines:
        assert tuple(line) == EXPORT_FIELDS
        assert int(line["annotator"]) in careful and line["chosen"] == by_prompt[line["prompt"]]
        assert 0.0 < line["weight"] <= 1.0 and line["judge_confidence"] is None


def test_export_from_a_project_without_comparisons_is_a_clear_error(world, tmp_path, capsys):
    empty = world["ls"].projects.create(title="no comparisons", label_config=CONFIG)
    code = main(["export-preferences", "--project", str(empty.id), "--label-studio-url", world["url"],
                 "--api-key", world["token"], "--out", str(tmp_path / "x.jsonl")])
    assert code == 2
    assert f"project {empty.id} has no submitted <Pairwise name='pw'> annotation" in capsys.readouterr().err
    code = main(["export-preferences", "--project", str(empty.id), "--label-studio-url", world["url"],
                 "--api-key", "wrong-token", "--out", str(tmp_path / "x.jsonl")])
    assert code == 2 and "rejected LABEL_STUDIO_API_KEY" in capsys.readouterr().err


def test_deleted_or_emptied_annotations_clear_the_mark(world, annotated):
    ls, clicker = world["ls"], annotated["users"][2]
    mine = sorted((aid, task) for aid, (task, user, _) in annotated["annotations"].items() if user == clicker)
    (deleted, deleted_task), (emptied, emptied_task) = mine[0], mine[1]
    before = _status(world)["annotators"]["n_comparisons"]
    ls.annotations.delete(id=deleted)
    ls.annotations.update(id=emptied, result=[])  # the annotator took the choice back
    _wait(lambda: _status(world)["annotators"].get("n_comparisons") == before - 2 and _settled(world), timeout=60,
          what="the estimate without the two annotations")
    tasks = _tasks(world)
    assert tasks[deleted_task]["meta"][META_KEY] == [] and tasks[emptied_task]["meta"][META_KEY] == []
    assert tasks[mine[2][1]]["meta"][META_KEY] == [clicker]  # still compared by the left clicker


def test_label_studio_is_the_source_of_truth(world, annotated):
    ls = world["ls"]
    before = _settled(world)["annotators"]["n_comparisons"]
    # Annotations imported with their task send no annotation webhook: the import's job reads them.
    data = {**item(1), "n": "imported"}
    ls.projects.import_tasks(id=world["project"], request=[
        {"data": data, "annotations": [{"result": [region(strong_side(data))]}]}])
    _wait(lambda: _status(world)["annotators"].get("n_comparisons") == before + 1 and _settled(world), timeout=60,
          what="the imported annotation")
    # A comparison the backend lost (here: deleted from its state) comes back with START_TRAINING.
    db = sqlite3.connect(world["model_dir"] / "projects" / str(world["project"]) / "state.sqlite", timeout=30)
    with db:
        db.execute("DELETE FROM pairwise_comparisons WHERE annotation_id = (SELECT MAX(annotation_id) "
                   "FROM pairwise_comparisons)")
    db.close()
    ls.ml.train(id=world["ml"])
    sync = _wait(lambda: _settled(world)["job"].get("last", {}).get("sync"), timeout=60, what="the START_TRAINING job")
    assert sync["comparisons_changed"] is True and sync["annotators"]["comparisons"] == before + 1
    # Deleting a task drops its comparisons; its former mark is not written to a task that is gone.
    marked = next(t for t in _tasks(world).values() if t["meta"].get(META_KEY))
    n_marked = len(comparison_records([marked], TARGET))
    assert n_marked == 3
    ls.tasks.delete(id=str(marked["id"]))
    status = _wait(lambda: (s := _settled(world))["annotators"]["n_comparisons"] == before + 1 - n_marked and s,
                   timeout=60, what="the comparisons of the deleted task to go")
    assert status["job"]["state"] == "done" and status["job"]["error"] is None
