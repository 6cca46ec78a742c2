"""End to end against a real Label Studio 1.23.2, the real backend process, the real encoder and SmolLM2.

One project is pre-labelled once (module fixture); the tests then act on it as a reviewer would.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, BackendProcess, backend_status, project_tasks, settled_status, wait_http, wait_until

_wait, _status, _settled, _tasks = wait_until, backend_status, settled_status, project_tasks  # short names

pytestmark = pytest.mark.llm

SAMPLES = ROOT / "backend" / "samples"
N_CLASSES = 6
# A label with no anchor at all: the encoder cannot predict it until a reviewer uses it, so the first
# human label of this class must move the prediction of a near-duplicate task.
NEW_LABEL = "card_swallowed"
TWIN_A = "The cash machine ate my card and did not give it back, what now?"
TWIN_B = "The cash machine ate my card and never gave it back, what now?"


def _rows(name: str) -> list[dict[str, str]]:
    with open(SAMPLES / name, newline="") as f:
        return list(csv.DictReader(f))


def _choice(label: str) -> list[dict]:
    return [{"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]




@pytest.fixture(scope="module")
def world(label_studio, llm_server, tmp_path_factory):
    """A Banking77 sample project with the backend connected, pre-labelled on import."""
    from label_studio_sdk import LabelStudio

    anchors_all, tasks_all = _rows("banking77_anchors.csv"), _rows("banking77_tasks.csv")
    classes = sorted({r["category"] for r in anchors_all})[:N_CLASSES]
    anchors = [r for r in anchors_all if r["category"] in classes]
    tasks = [r for r in tasks_all if r["category"] in classes][:12]
    labels = [*classes, NEW_LABEL]
    config = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
              + "".join(f'<Choice value="{c}"/>' for c in labels) + "</Choices></View>")

    workdir = tmp_path_factory.mktemp("backend")
    env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": label_studio["token"],
           "MODEL_DIR": str(workdir / "model_dir"), "HCC_LLM_BASE_URL": llm_server, "HCC_LLM_MODEL": "smollm2-135m",
           "HCC_LLM_STRUCTURED": "grammar", "HCC_LLM_LOGPROBS": "0", "LOG_LEVEL": "INFO",
           "HCC_CACHE_DIR": str(workdir / "cache")}
    backend = BackendProcess(env, workdir / "backend.log")
    ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
    project = ls.projects.create(title="hcc e2e", label_config=config)
    ls.ml.create(url=backend.url, project=project.id, title="hcc")
    ls.projects.import_tasks(id=project.id, request=[
        *({"data": {"text": r["text"]}, "annotations": [{"result": _choice(r["category"])}]} for r in anchors),
        *({"data": {"text": r["text"]}} for r in tasks),
        {"data": {"text": TWIN_A}}, {"data": {"text": TWIN_B}},
    ])
    world = {"ls": ls, "project": project.id, "backend": backend, "env": env, "workdir": workdir,
             "n_anchors": len(anchors), "n_tasks": len(tasks) + 2, "labels": labels}
    _wait(lambda: _status(world)["last_run"].get("kind") == "prelabel"
          and _status(world)["job"].get("state") == "done", timeout=240, what="pre-labelling")
    try:
        yield world
    finally:
        world["backend"].stop()








def _our_prediction(task: dict, version: str) -> dict | None:
    preds = [p for p in task["predictions"] if p["model_version"] == version]
    return max(preds, key=lambda p: p["id"]) if preds else None


def _label(pred: dict) -> str:
    return pred["result"][0]["value"]["choices"][0]


def _task_by_text(world, text: str) -> dict:
    return next(t for t in _tasks(world).values() if t["data"]["text"] == text)


def test_import_prelabels_every_unlabelled_task(world):
    version = world["ls"].projects.get(id=world["project"]).model_version
    assert version.startswith("hcc-")  # switched to the predictions' version after writing them
    tasks = _tasks(world)
    unlabelled = [t for t in tasks.values() if not t["annotations"]]
    assert len(unlabelled) == world["n_tasks"]
    threshold = _status(world)["last_run"]["review_threshold"]
    assert 0.0 < threshold <= 1.0
    for task in unlabelled:
        pred = _our_prediction(task, version)
        assert pred is not None, f"task {task['id']} has no prediction"
        assert _label(pred) in world["labels"]
        assert 0.0 <= pred["score"] <= 1.0
        meta = task["meta"]
        if pred["score"] < threshold:  # HCC_TASK_META=flagged: our meta where a reviewer will look
            assert meta["needs_review"] is True
            assert meta["hcc_stage"] in ("consistent", "combined", "encoder_only")  # the pooled default
        else:
            assert not {"needs_review", "hcc_stage", "hcc_labels"} & set(meta), task
    last = _status(world)["last_run"]
    assert "no reviewed items yet" in last["scores"]  # calibrated score: the documented prior until reviews
    score = _status(world)["score"]  # what the score users see is, and what it rests on
    assert score["kind"] == "probability" and not score["calibrated"] and score["threshold"] == threshold
    assert "the pool's P(label is right)" in score["message"] and "cross-checked anchors" in score["message"]
    assert last["anchors"] == world["n_anchors"]
    assert last["labelled"] == world["n_tasks"] and last["views"]  # what the anchors showed of the LLM
    # The job refined the centroids on the project's tasks, or said why not
    assert "refined on" in last["refinement"]
    assert last["classifier"].startswith("classifier ")  # which classifier the anchors chose, and why
    answered = last["stages"].get("consistent", 0) + last["stages"].get("combined", 0)
    assert (last["cai"] is None) == (answered == 0)


def test_review_tab_holds_the_flagged_tasks_lowest_score_first(world):
    ls, version = world["ls"], world["ls"].projects.get(id=world["project"]).model_version
    views = [v for v in ls.views.list(project=world["project"]) if v.data.get("title") == "Needs review"]
    assert len(views) == 1
    flagged = {t["id"] for t in _tasks(world).values() if t["meta"].get("needs_review") and not t["annotations"]}
    in_tab = [t.model_dump() for t in ls.tasks.list(project=world["project"], view=views[0].id, fields="all")]
    assert {t["id"] for t in in_tab} == flagged
    scores = [_our_prediction(t, version)["score"] for t in in_tab]
    assert scores == sorted(scores)


def test_human_label_moves_a_neighbour_and_deleting_it_reverts(world):
    ls, version = world["ls"], world["ls"].projects.get(id=world["project"]).model_version
    twin_a, twin_b = _task_by_text(world, TWIN_A), _task_by_text(world, TWIN_B)
    before = _label(_our_prediction(twin_b, version))
    assert before != NEW_LABEL  # no anchor of it yet: nothing can predict it
    anchors_before = _status(world)["anchors"]

    t0 = time.time()
    annotation = ls.annotations.create(id=twin_a["id"], result=_choice(NEW_LABEL))
    assert time.time() - t0 < 5  # Label Studio waited on our webhook: it must have been answered at once
    _wait(lambda: _status(world)["anchors"] == anchors_before + 1, timeout=10, what="the new anchor")
    _wait(lambda: _label(_our_prediction(_task_by_text(world, TWIN_B), version)) == NEW_LABEL, timeout=60,
          what="the neighbour's prediction to follow the human label")

    ls.annotations.delete(id=annotation.id)
    _wait(lambda: _status(world)["anchors"] == anchors_before, timeout=10, what="the anchor to go")
    _wait(lambda: _label(_our_prediction(_task_by_text(world, TWIN_B), version)) == before, timeout=60,
          what="the neighbour's prediction to revert")


def test_malformed_task_gets_its_own_error_and_the_others_are_predicted(world):
    config = world["ls"].projects.get(id=world["project"]).label_config
    good = next(t for t in _tasks(world).values() if not t["annotations"])
    body = {"tasks": [{"id": good["id"], "data": good["data"]}, {"id": 999999, "data": {"body": "wrong key"}},
                      {"id": 999998, "data": {"text": 42}}],
            "project": f"{world['project']}.0", "label_config": config}
    r = requests.post(f"{world['backend'].url}/predict", json=body, timeout=120)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3
    assert _label(results[0]) in world["labels"] and results[0]["model_version"].startswith("hcc-")
    assert results[1]["result"] == [] and "999999" in results[1]["error"] and "'text'" in results[1]["error"]
    assert results[2]["result"] == [] and "must be a string" in results[2]["error"]


def test_concurrent_annotations_lose_no_anchor(world):
    ls = world["ls"]
    free = [t for t in _tasks(world).values() if not t["annotations"] and t["data"]["text"] not in (TWIN_A, TWIN_B)]
    chosen = free[:6]
    before = _status(world)["anchors"]
    created, errors = [], []

    def annotate(task):
        try:
            created.append(ls.annotations.create(id=task["id"], result=_choice(world["labels"][0])).id)
        except Exception as exc:  # surfaced below: a lost annotation must fail the test, not vanish
            errors.append(exc)

    threads = [threading.Thread(target=annotate, args=(t,)) for t in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _wait(lambda: _status(world)["anchors"] == before + len(chosen), timeout=20, what="every anchor")
    for annotation_id in created:  # leave the project as the other tests expect it
        ls.annotations.delete(id=annotation_id)
    _wait(lambda: _status(world)["anchors"] == before, timeout=20, what="anchors to be removed")


def test_state_survives_a_restart_under_gunicorn_workers(world):
    old = world["backend"]
    status_before = _settled(world)
    config = world["ls"].projects.get(id=world["project"]).label_config
    task = next(t for t in _tasks(world).values() if not t["annotations"])
    body = {"tasks": [{"id": task["id"], "data": task["data"]}], "project": f"{world['project']}.0",
            "label_config": config}
    first = requests.post(f"{old.url}/predict", json=body, timeout=120).json()["results"][0]
    old.stop()

    world["backend"] = BackendProcess(world["env"], world["workdir"] / "backend.log", gunicorn_workers=2)
    status_after = _status(world)
    assert status_after["anchors"] == status_before["anchors"]
    assert status_after["last_run"] == status_before["last_run"]
    again = [requests.post(f"{world['backend'].url}/predict", json=body, timeout=120).json()["results"][0]
             for _ in range(4)]  # spread over both workers
    assert all(r["result"] == first["result"] and r["score"] == first["score"] for r in again)


def test_wrong_api_key_is_reported_in_health_and_the_log(label_studio, tmp_path):
    log = tmp_path / "backend.log"
    env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": "not-a-valid-token",
           "MODEL_DIR": str(tmp_path / "model_dir"), "HCC_LLM_BASE_URL": "", "LOG_LEVEL": "INFO"}
    backend = BackendProcess(env, log)
    try:
        def reported():
            health = requests.get(f"{backend.url}/health", timeout=5).json()
            return health if health["label_studio"].get("ok") is False else None

        health = _wait(reported, timeout=20, what="the Label Studio check")
        assert "rejected LABEL_STUDIO_API_KEY" in health["label_studio"]["error"]
        assert "not-a-valid-token" not in health["label_studio"]["error"]  # never echo a secret
        text = Path(log).read_text()
        assert "rejected LABEL_STUDIO_API_KEY" in text and "not-a-valid-token" not in text
    finally:
        backend.stop()


def test_health_answers_even_without_label_studio_and_basic_auth_guards_every_route(tmp_path):
    env = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "x" * 20,
           "MODEL_DIR": str(tmp_path / "md"), "HCC_LLM_BASE_URL": "", "BASIC_AUTH_USER": "ls",
           "BASIC_AUTH_PASS": "s3cret-pass"}
    backend = BackendProcess(env, tmp_path / "backend.log")
    auth = ("ls", "s3cret-pass")
    try:
        wait_http(f"{backend.url}/health", timeout=5, auth=auth)
        for method, route in (("get", "/health"), ("post", "/predict"), ("post", "/webhook"), ("post", "/setup")):
            assert getattr(requests, method)(f"{backend.url}{route}", timeout=5).status_code == 401
            assert getattr(requests, method)(f"{backend.url}{route}", auth=("ls", "wrong"), timeout=5).status_code \
                == 401
        health = _wait(lambda: (h := requests.get(f"{backend.url}/health", auth=auth, timeout=5).json())
                       ["label_studio"].get("ok") is False and h, timeout=20, what="the failed check")
        assert "cannot reach Label Studio" in health["label_studio"]["error"]
    finally:
        backend.stop()


def test_an_empty_model_dir_is_rebuilt_from_label_studio(world, tmp_path):
    config = world["ls"].projects.get(id=world["project"]).label_config
    task = next(t for t in _tasks(world).values() if not t["annotations"])
    env = {**world["env"], "MODEL_DIR": str(tmp_path / "empty")}
    fresh = BackendProcess(env, tmp_path / "backend.log")
    try:
        body = {"tasks": [{"id": task["id"], "data": task["data"]}], "project": f"{world['project']}.0",
                "label_config": config}
        result = requests.post(f"{fresh.url}/predict", json=body, timeout=120).json()["results"][0]
        assert _label(result) in world["labels"]
        status = requests.get(f"{fresh.url}/status", params={"project": world["project"]}, timeout=5).json()
        assert status["anchors"] == world["n_anchors"]
    finally:
        fresh.stop()


def test_a_second_encoder_through_label_studio_and_a_missing_one_refused_at_connection(label_studio, tmp_path):
    from label_studio_sdk import LabelStudio

    from backend.studio.store import ProjectStore

    anchors_all, tasks_all = _rows("banking77_anchors.csv"), _rows("banking77_tasks.csv")
    classes = sorted({r["category"] for r in anchors_all})[:3]
    anchors = [r for r in anchors_all if r["category"] in classes]
    tasks = [r for r in tasks_all if r["category"] in classes][:6]
    config = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
              + "".join(f'<Choice value="{c}"/>' for c in classes) + "</Choices></View>")
    env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": label_studio["token"],
           "HCC_LLM_BASE_URL": "", "LOG_LEVEL": "INFO", "HCC_CACHE_DIR": str(tmp_path / "cache")}
    ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
    project = ls.projects.create(title="hcc second encoder", label_config=config)

    # Never pulled: connecting the model in Label Studio fails, and the backend's log says how to fix it.
    missing = BackendProcess({**env, "MODEL_DIR": str(tmp_path / "md-missing"),
                              "HCC_SECOND_ENCODER": "all-mpnet-base-v2"}, tmp_path / "missing.log")
    try:
        with pytest.raises(Exception) as refused:
            ls.ml.create(url=missing.url, project=project.id, title="hcc")
        # Label Studio shows that /setup failed and points at the backend's log, which names the fix.
        assert "/setup" in str(getattr(refused.value, "body", refused.value))
        assert "HCC_SECOND_ENCODER" in (tmp_path / "missing.log").read_text()
        assert "hcc encoder pull all-mpnet-base-v2" in (tmp_path / "missing.log").read_text()
    finally:
        missing.stop()

    # The packaged MiniLM as its own second opinion: the wiring, end to end, without a download.
    model_dir = tmp_path / "md"
    backend = BackendProcess({**env, "MODEL_DIR": str(model_dir), "HCC_SECOND_ENCODER": "all-MiniLM-L6-v2"},
                             tmp_path / "backend.log")
    world = {"ls": ls, "project": project.id, "backend": backend}
    try:
        ls.ml.create(url=backend.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=[
            *({"data": {"text": r["text"]}, "annotations": [{"result": _choice(r["category"])}]} for r in anchors),
            *({"data": {"text": r["text"]}} for r in tasks)])
        _wait(lambda: _status(world)["last_run"].get("kind") == "prelabel"
              and _status(world)["job"].get("state") == "done", timeout=240, what="pre-labelling")
        version = requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]
        predicted = [t for t in _tasks(world).values() if not t["annotations"]]
        assert len(predicted) == len(tasks)
        assert all(_our_prediction(t, version) is not None for t in predicted)
        records = ProjectStore(model_dir / "projects" / str(project.id)).items()
        labelled = [records[t["id"]] for t in predicted]
        assert all(r["encoder2_label"] == r["encoder_label"] and 0 < r["prior_probability"] < 1 for r in labelled)
    finally:
        backend.stop()
