"""The HTTP layer answers malformed requests with a 400 that names the field, never a 500 (issue 14, item 9).

Flask's test client drives the real app, service, store and encoder; no Label Studio is needed because every
request here is refused before anything would be written to it.
"""

from __future__ import annotations

import logging

import pytest

from backend.studio.server import create_app
from backend.studio.service import HCCService
from backend.studio.settings import Settings
from model import HCCModel
from tests.fault_server import FaultServer, fault_server_fixture, unauthorized  # noqa: F401 - registers the fixture
from tests.fault_server import label as llm_label

CONFIG = ("<View><Text name='text' value='$text'/><Choices name='c' toName='text'><Choice value='yes'/>"
          "<Choice value='no'/></Choices></View>")
PROJECT = {"id": 3, "label_config": CONFIG}
REGION = {"from_name": "c", "to_name": "text", "type": "choices", "value": {"choices": ["yes"]}}


@pytest.fixture
def client(tmp_path):
    service = HCCService(Settings(model_dir=tmp_path))
    return create_app(HCCModel, service).test_client()


def annotation_event(**changes):
    body = {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": {"id": 5, "data": {"text": "hello"}},
            "annotation": {"id": 7, "result": [REGION]}}
    body.update(changes)
    return body


@pytest.mark.parametrize(("body", "named"), [
    ({"action": "ANNOTATION_CREATED", "project": {"id": "abc", "label_config": CONFIG}}, "project id"),
    (annotation_event(annotation={"id": "seven", "result": [REGION]}), "annotation.id"),
    (annotation_event(task={"id": None, "data": {"text": "hello"}}), "task.id"),
    (annotation_event(task={"data": {"text": "hello"}}, annotation={"id": 7, "result": [REGION]}), "task.id"),
    (annotation_event(annotation={"id": 7, "result": {"choices": ["yes"]}}), "annotation.result"),
    (annotation_event(annotation={"id": 7, "result": ["yes"]}), "annotation.result"),
    (annotation_event(annotation=["not", "an", "object"]), "annotation must be an object"),
    (annotation_event(task="five"), "task must be an object"),
    ({"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": {"id": 7}}, "annotations must be a list"),
    ({"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": [{"id": "x"}]}, "annotations[0].id"),
    ({"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": [7]}, "annotations[0] must be an object"),
    # Found by tests/studio/test_fuzz.py: each of these was a 500 with a traceback.
    (annotation_event(annotation={"id": 7, "result": [{**REGION, "value": {"choices": 7}}]}),
     "annotation.result[0].value.choices must be a list"),
    (annotation_event(annotation={"id": 7, "result": [{**REGION, "value": ["yes"]}]}),
     "annotation.result[0].value must be an object"),
    (annotation_event(project={"id": 3, "label_config": ["yes", "no"]}), "project.label_config must be a string"),
    (annotation_event(project={"id": 3, "label_config": 1e308}), "project.label_config must be a string"),
    (annotation_event(annotation={"id": 2 ** 63, "result": [REGION]}), "annotation.id must be an id"),
    (annotation_event(task={"id": -(2 ** 63) - 1, "data": {"text": "hello"}}), "task.id must be an id"),
    ({"action": "ANNOTATIONS_DELETED", "project": PROJECT, "annotations": [{"id": 2 ** 64}]}, "annotations[0].id"),
    ({"action": "TASKS_CREATED", "project": {"id": int("9" * 300), "label_config": CONFIG}}, "project"),
])
def test_malformed_webhooks_get_a_400_naming_the_field(client, caplog, body, named):
    with caplog.at_level(logging.WARNING):
        response = client.post("/webhook", json=body)
    assert response.status_code == 400, response.get_json()
    assert named in response.get_json()["error"]
    assert not any(r.exc_info for r in caplog.records)  # no traceback in the log


@pytest.mark.parametrize(("body", "named"), [
    ({"tasks": [{"data": {"text": "x"}}], "project": "3.0", "label_config": CONFIG}, "tasks[0].id"),
    ({"tasks": [{"id": None, "data": {"text": "x"}}], "project": "3.0", "label_config": CONFIG}, "tasks[0].id"),
    ({"tasks": [{"id": 1, "data": {"text": "x"}}, "two"], "project": "3.0", "label_config": CONFIG},
     "tasks[1] must be a task object"),
    ({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "3.0", "label_config": CONFIG, "params": [1]},
     "'params' must be an object"),
    ({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "three", "label_config": CONFIG}, "project id"),
    # Found by tests/studio/test_fuzz.py: each of these was a 500 with a traceback.
    ({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "3.0", "label_config": 5},
     "label_config must be a string"),
    ({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "3.0", "label_config": [CONFIG]},
     "label_config must be a string"),
    ({"tasks": [{"id": 2 ** 63, "data": {"text": "x"}}], "project": "3.0", "label_config": CONFIG}, "tasks[0].id"),
    ({"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "9" * 300 + ".1700000000", "label_config": CONFIG},
     "project id"),
    ({"tasks": [{"id": 1, "project": [3], "data": {"text": "x"}}], "label_config": CONFIG}, "project id"),
])
def test_malformed_predict_requests_get_a_400_naming_the_field(client, caplog, body, named):
    with caplog.at_level(logging.WARNING):
        response = client.post("/predict", json=body)
    assert response.status_code == 400, response.get_json()
    assert named in response.get_json()["error"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("route", ["/predict", "/webhook", "/setup"])
def test_a_deeply_nested_body_gets_a_400_not_a_recursion_error(client, caplog, route):
    # Found by the fuzz: json's parser recurses per level and get_json(silent=True) lets RecursionError through.
    with caplog.at_level(logging.WARNING):
        response = client.post(route, data=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert "nested too deeply" in response.get_json()["error"]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("body", "named"), [
    ({"project": "3.1700000000", "schema": 1.5}, "schema must be a string"),
    ({"project": "3.1700000000", "schema": CONFIG, "hostname": 8080, "access_token": "t"},
     "hostname must be a string"),
    ({"project": "3.1700000000", "schema": CONFIG, "hostname": "http://127.0.0.1:9", "access_token": ["t"]},
     "access_token must be a string"),
])
def test_malformed_setup_requests_get_a_400_naming_the_field(client, caplog, body, named):
    with caplog.at_level(logging.WARNING):
        response = client.post("/setup", json=body)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert named in response.get_json()["error"]
    assert not any(r.exc_info for r in caplog.records)


def test_a_setup_hostname_that_is_not_a_string_does_not_break_later_predicts(client, caplog):
    # It was kept as the Label Studio URL: the next /predict of a project without anchors was a 500.
    client.post("/setup", json={"project": "4.0", "schema": CONFIG, "hostname": 8080, "access_token": "t"})
    with caplog.at_level(logging.WARNING):
        response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "x"}}], "project": "4.0",
                                                 "label_config": CONFIG})
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("query", "named"), [("project=" + "9" * 300, "project must be an id"),
                                              ("project=abc", "project must be a number"), ("", "give the project")])
def test_status_with_an_unusable_project_gets_a_400(client, query, named):
    response = client.get(f"/status?{query}")  # a 300-digit id was a 500: "File name too long"
    assert response.status_code == 400 and named in response.get_json()["error"]


def test_http_errors_are_json_naming_the_problem(tmp_path):
    client = _app(tmp_path, max_request_mb=1)
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
    answers = {"405 Method Not Allowed": wrong_method, "404 Not Found": client.post("/train", json={}),
               "413 Request Entity Too Large": client.post("/webhook", data=b" " * (2 * 1024 * 1024),
                                                           content_type="application/json")}
    for named, response in answers.items():
        assert response.is_json and named in response.get_json()["error"], response.get_data(as_text=True)[:200]
    as_text = client.post("/predict", data='{"tasks": []}', content_type="text/plain")
    assert as_text.status_code == 400 and "Content-Type: application/json" in as_text.get_json()["error"]


def test_a_well_formed_annotation_still_becomes_an_anchor(client):
    response = client.post("/webhook", json=annotation_event())
    assert response.status_code == 200 and response.get_json()["anchor"] == "yes"
    assert client.get("/status?project=3").get_json()["anchors"] == 1


def _app(tmp_path, **settings):
    return create_app(HCCModel, HCCService(Settings(model_dir=tmp_path, **settings))).test_client()


def test_non_ascii_credentials_are_refused_not_a_500(tmp_path):
    import base64

    client = _app(tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret-pass")
    header = "Basic " + base64.b64encode("ütf:pässwörd".encode()).decode()
    assert client.get("/health", headers={"Authorization": header}).status_code == 401
    good = "Basic " + base64.b64encode(b"ls:s3cret-pass").decode()
    assert client.get("/health", headers={"Authorization": good}).status_code == 200
    unicode_client = _app(tmp_path, basic_auth_user="ädmin", basic_auth_pass="pässwörd")
    right = "Basic " + base64.b64encode("ädmin:pässwörd".encode()).decode()
    assert unicode_client.get("/health", headers={"Authorization": right}).status_code == 200


def test_a_user_without_a_password_is_a_startup_error(tmp_path):
    with pytest.raises(ValueError, match="BASIC_AUTH_PASS is empty"):
        _app(tmp_path, basic_auth_user="ls", basic_auth_pass="")


def test_metrics_count_routes_not_every_path_a_stranger_makes_up(tmp_path):
    client = _app(tmp_path)
    for n in range(20):
        client.get(f"/made-up-{n}")
    client.get("/health")
    requests_by_route = client.get("/metrics").get_json()["requests"]
    assert requests_by_route["(no such route)"] == 20 and requests_by_route["/health"] == 1
    assert not any("made-up" in route for route in requests_by_route)


def test_a_huge_body_is_refused_with_413(tmp_path):
    client = _app(tmp_path, max_request_mb=1)
    response = client.post("/predict", data=b"x" * (2 * 1024 * 1024), content_type="application/json")
    assert response.status_code == 413


def test_the_loopback_check_of_the_start_warning():
    from backend.studio.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_a_late_annotation_created_after_an_update_keeps_the_updated_label(tmp_path):
    service = HCCService(Settings(model_dir=tmp_path))
    client = create_app(HCCModel, service).test_client()
    updated = annotation_event(action="ANNOTATION_UPDATED", annotation={
        "id": 7, "updated_at": "2026-12-01T10:00:05.000000Z",
        "result": [{**REGION, "value": {"choices": ["no"]}}]})
    late = annotation_event(annotation={"id": 7, "updated_at": "2026-12-01T10:00:01.000000Z", "result": [REGION]})
    assert client.post("/webhook", json=updated).get_json()["anchor"] == "no"
    assert client.post("/webhook", json=late).get_json()["changed"] is False
    assert [a.label for a in service.store(3).anchors()] == ["no"]
    service.jobs.wait_idle(timeout=60)


def test_the_llm_refusing_gives_flagged_encoder_labels_not_a_500(tmp_path, fault_server: FaultServer, monkeypatch):
    from backend.studio import project as project_module
    from backend.studio.store import Anchor

    fault_server.default = unauthorized()  # e.g. the key was revoked: every call is refused
    service = HCCService(Settings(model_dir=tmp_path, llm_base_url=fault_server.url, llm_structured="json_object"))
    client = create_app(HCCModel, service).test_client()
    model = service.model(3, CONFIG)
    for i in range(30):
        text, label = (f"yes, I agree with point {i}", "yes") if i % 2 else (f"no, I refuse item {i}", "no")
        model.store.put_anchor(Anchor(i, i, text, label))
    model.store.set("anchors_synced", 1.0)
    body = {"tasks": [{"id": 100 + i, "data": {"text": t}} for i, t in enumerate(["yes please", "no thanks"])],
            "project": "3.0", "label_config": CONFIG}

    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    assert all(r["result"][0]["value"]["choices"][0] in ("yes", "no") for r in response.get_json()["results"])
    records = service.store(3).items()
    assert all("refused" in records[100 + i]["llm_unavailable"] for i in range(2))
    record = records[100]
    assert model.prediction(100, record, 0.99, 0.5).needs_review  # flagged whatever its score
    health = client.get("/health").get_json()
    assert health["llm_state"]["ok"] is False and "refused" in health["llm_state"]["error"]
    assert client.get("/status?project=3").get_json()["llm"]["ok"] is False

    asked = fault_server.request_count
    assert client.post("/predict", json=body).status_code == 200
    assert fault_server.request_count == asked  # within the retry window the LLM is not asked again

    monkeypatch.setattr(project_module, "LLM_RETRY_SECONDS", 0.0)
    fault_server.default = llm_label("yes")
    assert client.post("/predict", json=body).status_code == 200
    assert fault_server.request_count > asked and client.get("/health").get_json()["llm_state"]["ok"] is True


def _project_with_anchors(service: HCCService, n: int = 30):
    from backend.studio.store import Anchor

    model = service.model(3, CONFIG)
    for i in range(n):
        text, label = (f"yes, I agree with point {i}", "yes") if i % 2 else (f"no, I refuse item {i}", "no")
        model.store.put_anchor(Anchor(i, i, text, label))
    model.store.set("anchors_synced", 1.0)
    return model


def test_a_stalled_llm_gets_encoder_labels_in_time_and_the_full_labels_later(tmp_path, fault_server: FaultServer):
    from conftest import wait_until

    fault_server.default = llm_label("yes", delay=1.5)  # every answer far slower than /predict may wait
    service = HCCService(Settings(model_dir=tmp_path, llm_base_url=fault_server.url, llm_structured="json_object",
                                  predict_seconds=1.0))
    client = create_app(HCCModel, service).test_client()
    _project_with_anchors(service)
    body = {"tasks": [{"id": 100, "data": {"text": "maybe, who knows"}}], "project": "3.0", "label_config": CONFIG}

    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["results"][0]["result"][0]["value"]["choices"][0] in ("yes", "no")
    assert "did not answer" in service.store(3).items()[100]["llm_unavailable"]  # answered before the LLM did
    assert "did not answer" in client.get("/health").get_json()["llm_state"]["error"]
    # The run goes on in the background; its record replaces the encoder-only one once the LLM has answered.
    wait_until(lambda: "llm_unavailable" not in service.store(3).items()[100], timeout=120,
               what="the late full labels")


def test_predict_does_not_wait_for_a_running_prelabel(tmp_path, fault_server: FaultServer):
    import threading

    from conftest import wait_until

    fault_server.default = llm_label("yes", delay=1.0)
    service = HCCService(Settings(model_dir=tmp_path, llm_base_url=fault_server.url, llm_structured="json_object",
                                  llm_concurrency=1, predict_seconds=1.0))
    client = create_app(HCCModel, service).test_client()
    model = _project_with_anchors(service)
    long_run = threading.Thread(target=model.label, args=([{"id": 500 + i, "data": {"text": f"perhaps {i}"}}
                                                          for i in range(10)],))
    long_run.start()  # a pre-label: one LLM call per second, dozens of them
    wait_until(lambda: fault_server.request_count >= 1, timeout=60, what="the pre-label to ask the LLM")

    body = {"tasks": [{"id": 100, "data": {"text": "no, not at all"}}], "project": "3.0", "label_config": CONFIG}
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert long_run.is_alive()  # answered while the pre-label still waits for its LLM calls
    fault_server.default = llm_label("yes")  # let the pre-label finish quickly
    long_run.join(timeout=120)


def test_an_expired_personal_access_token_is_reported_and_predict_still_answers(tmp_path, caplog):
    import time

    import jwt

    expired = jwt.encode({"exp": int(time.time()) - 3600, "token_type": "refresh"}, "not-the-server-key")
    service = HCCService(Settings(model_dir=tmp_path, label_studio_url="http://127.0.0.1:9",
                                  label_studio_api_key=expired))
    client = create_app(HCCModel, service).test_client()
    _project_with_anchors(service).store.set("anchors_synced", None)  # /predict will try Label Studio first
    body = {"tasks": [{"id": 100, "data": {"text": "yes, sure"}}], "project": "3.0", "label_config": CONFIG}

    response = client.post("/predict", json=body)  # was a 500: the SDK's own error escaped
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["results"][0]["result"], response.get_json()
    studio = service.check_label_studio_now()["label_studio"]
    assert studio["ok"] is False and "expired" in studio["error"] and expired not in studio["error"]
    assert expired not in caplog.text  # the token itself is never logged


def test_an_llm_failure_recorded_by_a_process_now_gone_is_cleared_when_the_llm_answers(tmp_path, fault_server):
    """Found by bench/faults.py: after a kill -9 and restart, /status kept the dead process's "LLM down"."""
    fault_server.default = llm_label("yes")
    service = HCCService(Settings(model_dir=tmp_path, llm_base_url=fault_server.url, llm_structured="json_object"))
    client = create_app(HCCModel, service).test_client()
    _project_with_anchors(service).store.set("llm", {"ok": False, "error": "cannot reach the LLM", "at": 1.0})
    body = {"tasks": [{"id": 100, "data": {"text": "maybe, who knows"}}], "project": "3.0", "label_config": CONFIG}

    assert client.post("/predict", json=body).status_code == 200
    assert fault_server.request_count > 0  # the LLM was asked, and answered
    assert client.get("/status?project=3").get_json()["llm"]["ok"] is True
