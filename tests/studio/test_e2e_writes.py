"""The pre-label job's writes against a real Label Studio 1.23.2, through a fault-injecting proxy.

Real parts: Label Studio (the session fixture), the backend's service and encoder in this process, its
``StudioClient`` and the SDK. The only fake is :class:`StudioProxy`, which speaks real HTTP and loses answers
the way a load balancer does after Label Studio committed a write (issue 14, items 5 and 6).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT

from backend.studio import client as client_module
from backend.studio import service as service_module
from backend.studio.client import StudioClient
from backend.studio.service import HCCService
from backend.studio.settings import Settings
from tests.studio.studio_proxy import StudioProxy

SAMPLES = ROOT / "backend" / "samples"
N_CLASSES = 3
IMPORT = r"^/api/projects/\d+/import/predictions"
BATCH = 3  # the write batch in these tests: 7 tasks make batches of 3, 3 and 1


def _rows(name: str) -> list[dict[str, str]]:
    with open(SAMPLES / name, newline="") as f:
        return list(csv.DictReader(f))


ANCHOR_ROWS, TASK_ROWS = _rows("banking77_anchors.csv"), _rows("banking77_tasks.csv")
CLASSES = sorted({r["category"] for r in ANCHOR_ROWS})[:N_CLASSES]
CONFIG = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
          + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")


@pytest.fixture(scope="module")
def ls(label_studio):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])


@pytest.fixture(scope="module")
def proxy(label_studio) -> Iterator[StudioProxy]:
    with StudioProxy(label_studio["url"]) as p:
        yield p


@pytest.fixture(scope="module")
def service(label_studio, proxy, tmp_path_factory) -> HCCService:
    """The backend's service (real encoder, no LLM), talking to Label Studio through the proxy; every task
    gets meta (``HCC_TASK_META=all``), which the meta tests below write."""
    settings = Settings(label_studio_url=proxy.url, label_studio_api_key=label_studio["token"],
                        model_dir=tmp_path_factory.mktemp("model_dir"), task_meta="all")
    return HCCService(settings)


@pytest.fixture(autouse=True)
def small_batches(proxy, monkeypatch) -> Iterator[None]:
    monkeypatch.setattr(client_module, "WRITE_BATCH", BATCH)
    # The read-back's pause, shortened for the test (raising=False: a client without it still runs the tests).
    monkeypatch.setattr(StudioClient, "import_backoff", 0.1, raising=False)
    proxy.clear()
    yield
    proxy.clear()


def _choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def _project(ls, n_tasks: int = 7) -> int:
    """A project with 4 anchors per class and ``n_tasks`` unlabelled tasks of those classes."""
    anchors = [r for c in CLASSES for r in [r for r in ANCHOR_ROWS if r["category"] == c][:4]]
    tasks = [r for r in TASK_ROWS if r["category"] in CLASSES][:n_tasks]
    assert len(tasks) == n_tasks
    project = ls.projects.create(title="hcc writes", label_config=CONFIG)
    ls.projects.import_tasks(id=project.id, request=[
        *({"data": {"text": r["text"]}, "annotations": [{"result": _choice(r["category"])}]} for r in anchors),
        *({"data": {"text": r["text"]}} for r in tasks)])
    return project.id


def _unlabelled(ls, project_id: int) -> list[dict[str, Any]]:
    tasks = [t.model_dump() for t in ls.tasks.list(project=project_id, fields="all")]
    return [t for t in tasks if not t["annotations"]]


def _versions(task: dict[str, Any], version: str) -> list[int]:
    return sorted(p["id"] for p in task["predictions"] if p["model_version"] == version)


def _prelabel(service: HCCService, project_id: int) -> str:
    model = service.model(project_id, CONFIG)
    service.prelabel(model)
    return model.model_version


# -- item 5: one prediction per task and model version, whatever happens to a write --------------------------
@pytest.mark.parametrize("mode", ["502_after", "drop_after", "slow_after", "502_before"])
def test_a_lost_answer_to_a_prediction_batch_never_duplicates_it(ls, proxy, service, monkeypatch, mode):
    if mode == "slow_after":  # a client timeout: the answer comes after the client gave up
        token = service.settings.label_studio_api_key
        monkeypatch.setattr(service, "client", lambda: StudioClient(proxy.url, token, timeout=3.0, import_timeout=3.0))
    project_id = _project(ls)
    # The first two batches' first attempts: Label Studio commits them (except 502_before), the client sees a failure.
    fault = proxy.fault("POST", IMPORT, mode, times=2, delay=4.0)
    version = _prelabel(service, project_id)
    assert fault.hits == 2
    tasks = _unlabelled(ls, project_id)
    assert len(tasks) == 7
    for task in tasks:
        assert len(_versions(task, version)) == 1, f"task {task['id']}: {task['predictions']}"
    # Only what was missing is sent again: nothing after a commit, the whole batch when nothing reached Label Studio.
    assert proxy.count("POST", IMPORT) == (5 if mode == "502_before" else 3)


def test_an_import_slower_than_the_read_timeout_is_waited_for_not_read_back(ls, proxy, service, monkeypatch):
    # Label Studio's import slows down as the project's predictions grow: a call may outlast the client's timeout
    # for reads (3 s here) and must still be waited for (its own timeout, 20 s here), not taken for lost.
    token = service.settings.label_studio_api_key
    monkeypatch.setattr(service, "client", lambda: StudioClient(proxy.url, token, timeout=3.0, import_timeout=20.0))
    project_id = _project(ls)
    fault = proxy.fault("POST", IMPORT, "slow_after", times=3, delay=4.0)
    version = _prelabel(service, project_id)
    assert fault.hits == 3
    assert proxy.count("POST", IMPORT) == 3  # the three batches once each
    assert proxy.count("GET", r"^/api/predictions/?\?") == 0  # no answer taken for lost, so nothing read back
    assert all(len(_versions(t, version)) == 1 for t in _unlabelled(ls, project_id))


def test_a_batch_too_large_for_the_proxy_goes_again_in_halves(ls, proxy, service, monkeypatch):
    monkeypatch.setattr(client_module, "WRITE_BATCH", 100)  # the 7 tasks as one call, as a real chunk goes
    project_id = _project(ls)
    one = len(json.dumps({"task": 1, "result": _choice(CLASSES[0]), "score": 0.5, "model_version": "x" * 40}))
    proxy.cap_body("POST", IMPORT, 3 * one)  # about two predictions per call get through
    version = _prelabel(service, project_id)
    assert all(len(_versions(t, version)) == 1 for t in _unlabelled(ls, project_id))
    assert proxy.count("POST", IMPORT) >= 3  # the whole refused, then at least two smaller calls


def test_after_a_413_the_client_keeps_to_a_size_the_proxy_lets_through(ls, proxy, service, monkeypatch):
    # A chunk goes as one call of up to WRITE_BATCH predictions; behind a proxy with a smaller body cap, each
    # chunk would be refused whole before going in halves. The client learns the cap from the first refusal.
    monkeypatch.setattr(client_module, "WRITE_BATCH", 100)
    project_id = _project(ls)
    one = len(json.dumps({"task": 1, "result": _choice(CLASSES[0]), "score": 0.5, "model_version": "x" * 40}))
    proxy.cap_body("POST", IMPORT, 3 * one)
    client = service.client()
    predictions = [{"task": t["id"], "result": _choice(CLASSES[0]), "score": 0.5, "model_version": "first"}
                   for t in _unlabelled(ls, project_id)]
    client.import_predictions(project_id, predictions)
    assert proxy.refused >= 1
    refused, calls = proxy.refused, proxy.count("POST", IMPORT)
    client.import_predictions(project_id, [{**p, "model_version": "second"} for p in predictions])
    assert proxy.refused == refused  # nothing refused the second time
    assert proxy.count("POST", IMPORT) - calls == -(-7 // client.body_cap)
    tasks = _unlabelled(ls, project_id)
    assert all(len(_versions(t, "first")) == 1 and len(_versions(t, "second")) == 1 for t in tasks)


def test_a_few_predictions_where_an_import_call_is_dear_go_one_by_one_with_their_ids(ls, proxy, service):
    # What an earlier job measured: each bulk import call costs Label Studio ~90 s (its recount of every task
    # of a large project), so 3 predictions go as single creates (~0.04 s each), which return ids.
    project_id = _project(ls, n_tasks=3)
    model = service.model(project_id, CONFIG)
    model.store.set("write_costs", {"fixed": 90.0, "tasks": 3, "per_item": 0.0002, "single": 0.04})
    version = _prelabel(service, project_id)
    assert proxy.count("POST", IMPORT) == 0
    assert proxy.count("POST", r"^/api/predictions/?$") == 3
    tasks = _unlabelled(ls, project_id)
    assert all(len(_versions(t, version)) == 1 for t in tasks)
    tracked = {t: pid for t, (pid, _) in model.store.written([t["id"] for t in tasks]).items()}
    assert tracked == {t["id"]: _versions(t, version)[0] for t in tasks}
    assert model.store.get("write_costs")["single"] > 0  # measured now, for the next write


def test_without_a_measured_cost_predictions_go_as_one_bulk_import(ls, proxy, service):
    project_id = _project(ls, n_tasks=3)
    _prelabel(service, project_id)
    assert proxy.count("POST", IMPORT) == 1
    assert proxy.count("POST", r"^/api/predictions/?$") == 0


def test_a_batch_that_keeps_failing_fails_the_write_after_bounded_attempts(ls, proxy, service):
    project_id = _project(ls, n_tasks=2)
    proxy.fault("POST", IMPORT, "502_before", times=100)
    with pytest.raises(client_module.StudioError, match="answered 502"):
        _prelabel(service, project_id)
    assert proxy.count("POST", IMPORT) == client_module.IMPORT_RETRIES + 1
    assert all(not t["predictions"] for t in _unlabelled(ls, project_id))


def test_the_next_write_deletes_an_old_duplicate_and_keeps_the_tracked_prediction(ls, service):
    project_id = _project(ls, n_tasks=3)
    version = _prelabel(service, project_id)
    task = _unlabelled(ls, project_id)[0]
    (tracked,) = _versions(task, version)
    # What an older backend's retried import left behind: the same prediction twice.
    ours = next(p for p in task["predictions"] if p["id"] == tracked)
    ls.predictions.create(task=task["id"], result=ours["result"], score=ours["score"], model_version=version)
    assert len(_versions(_unlabelled(ls, project_id)[0], version)) == 2
    # The next import writes a new prediction, so the ids are read back, and the duplicate goes.
    ls.projects.import_tasks(id=project_id, request=[{"data": {"text": TASK_ROWS[-1]["text"]}}])
    _prelabel(service, project_id)
    tasks = _unlabelled(ls, project_id)
    assert len(tasks) == 4
    assert all(len(_versions(t, version)) == 1 for t in tasks)
    assert _versions(next(t for t in tasks if t["id"] == task["id"]), version) == [tracked]


# -- item 6: task meta keys set by others survive our writes ------------------------------------------------
def test_a_meta_key_set_during_a_prelabel_survives_its_meta_write(ls, proxy, service):
    project_id = _project(ls, n_tasks=3)
    first = _unlabelled(ls, project_id)[0]["id"]
    done: list[int] = []

    def reviewer_sets_a_key(method: str, path: str) -> None:  # after the job's listing, before its meta write
        if not done:
            done.append(1)
            ls.tasks.update(id=str(first), meta={"reviewer_note": "check the amount"})
    proxy.on("POST", IMPORT, reviewer_sets_a_key)
    _prelabel(service, project_id)
    assert done
    meta = next(t for t in _unlabelled(ls, project_id) if t["id"] == first)["meta"]
    assert meta["reviewer_note"] == "check the amount"
    assert meta["hcc_stage"] and "needs_review" in meta and "hcc_labels" in meta


def test_our_meta_keys_are_replaced_or_removed_and_others_kept(ls, proxy, label_studio):
    project_id = _project(ls, n_tasks=1)
    task_id = _unlabelled(ls, project_id)[0]["id"]
    ls.tasks.update(id=str(task_id), meta={"needs_review": True, "hcc_stage": "combined", "hcc_gone": 1,
                                           "team": "payments"})
    client = StudioClient(proxy.url, label_studio["token"])
    ours = {"needs_review": False, "hcc_stage": "consistent"}
    client.update_meta({task_id: ours}, merge=True, owned=("needs_review", "hcc_stage", "hcc_gone"))
    assert ls.tasks.get(id=str(task_id)).meta == {**ours, "team": "payments"}
    proxy.clear()
    client.update_meta({task_id: ours}, merge=True, owned=("needs_review", "hcc_stage", "hcc_gone"))
    assert proxy.count("PATCH", r"^/api/tasks/") == 0  # nothing changed: no write
    assert ls.tasks.get(id=str(task_id)).meta == {**ours, "team": "payments"}


@pytest.mark.parametrize("mode", ["502_after", "drop_after"])
def test_a_lost_answer_to_a_single_prediction_or_the_review_tab_never_makes_a_second(ls, proxy, service, mode):
    """The other creating calls (a comparison project's one-by-one predictions, the review tab) had the SDK's
    blind retry: a 502 after Label Studio committed one made a second."""
    project_id = _project(ls, n_tasks=2)
    client = service.client()
    tasks = _unlabelled(ls, project_id)
    version = "hcc-single-writes"
    predictions = [{"task": t["id"], "result": _choice(CLASSES[0]), "score": 0.5, "model_version": version}
                   for t in tasks]
    fault = proxy.fault("POST", r"^/api/predictions/?$", mode, times=len(tasks))
    from backend.studio.pairwise import create_predictions

    create_predictions(client, predictions)  # how a comparison project writes its predictions
    assert fault.hits == len(tasks)
    for task in _unlabelled(ls, project_id):
        assert len(_versions(task, version)) == 1, f"task {task['id']}: {task['predictions']}"

    tab_fault = proxy.fault("POST", r"^/api/dm/views/?$", mode, times=1)
    tab = client.ensure_review_tab(project_id, threshold=0.5)
    assert tab_fault.hits == 1
    tabs = [v for v in ls.views.list(project=project_id) if (v.data or {}).get("title") == "Needs review"]
    assert [int(v.id) for v in tabs] == [tab]


# -- issue 12: the task meta of a large project does not hold up the next import's pre-label -----------------
def test_a_prelabel_queued_meanwhile_writes_the_meta_the_running_one_left(ls, proxy, service, monkeypatch):
    """One PATCH per task makes the meta Label Studio's slowest write (most of an hour for the flagged tasks of
    100,000). A pre-label queued while one runs (the next import call's webhook) plans every task's meta again,
    so the running one leaves it the meta instead of making it wait; each task's meta is still written once."""
    monkeypatch.setattr(service_module, "META_SLICE", 2)
    project_id = _project(ls, n_tasks=7)
    model = service.model(project_id, CONFIG)
    queued: list[bool] = []

    def the_next_import_arrives(method: str, path: str) -> None:
        if not queued:
            queued.append(service.queue_prelabel(model))
    proxy.on("POST", IMPORT, the_next_import_arrives)
    service.queue_prelabel(model)
    assert service.jobs.wait_idle(timeout=300)
    assert queued == [True]
    # A job begins by listing the project (its first pass asks for the count of annotations).
    listings = [i for i, (method, path) in enumerate(proxy.seen) if method == "GET"
                and path.startswith("/api/tasks/?") and "total_annotations" in path and "page=1" in path]
    patches = [i for i, (method, path) in enumerate(proxy.seen) if method == "PATCH" and path.startswith("/api/tasks/")]
    assert len(listings) == 2 and len(patches) == 7 and min(patches) > listings[1], proxy.seen
    tasks = _unlabelled(ls, project_id)
    assert all(t["meta"].get("hcc_stage") for t in tasks)
    assert all(len(_versions(t, model.model_version)) == 1 for t in tasks)
    assert model.store.get("last_run", {}).get("meta_left_to_the_next_job") == 0  # the second one wrote it all
