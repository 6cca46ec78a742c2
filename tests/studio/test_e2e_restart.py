"""Durable jobs against the real Label Studio (issue 14, item 4): a pre-label whose process is killed
(``kill -9``) in the middle of its LLM calls is resumed by the next process, and every task ends up with
exactly one prediction of the model version.

The LLM is the fault-injecting OpenAI-compatible server of ``tests/fault_server.py`` (real HTTP) answering
slowly, so that the kill lands inside the job, then quickly after the restart.
"""

from __future__ import annotations

import csv
import os
import signal
from urllib.parse import urlparse

from conftest import ROOT, BackendProcess, wait_until

from backend.studio import launch
from tests.fault_server import FaultServer
from tests.fault_server import label as llm_label

N_CLASSES = 4


def _rows(name: str) -> list[dict[str, str]]:
    with open(ROOT / "backend" / "samples" / name, newline="") as f:
        return list(csv.DictReader(f))


def _choice(label: str) -> list[dict]:
    return [{"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def _status(url: str, project: int) -> dict:
    import requests

    return requests.get(f"{url}/status", params={"project": project}, timeout=5).json()


def test_a_prelabel_killed_mid_run_is_resumed_by_the_next_process(label_studio, tmp_path):
    from label_studio_sdk import LabelStudio

    anchors_all, tasks_all = _rows("banking77_anchors.csv"), _rows("banking77_tasks.csv")
    classes = sorted({r["category"] for r in anchors_all})[:N_CLASSES]
    anchors = [r for r in anchors_all if r["category"] in classes]
    tasks = [r for r in tasks_all if r["category"] in classes][:20]
    config = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
              + "".join(f'<Choice value="{c}"/>' for c in classes) + "</Choices></View>")
    ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])

    with FaultServer(default=llm_label(classes[0], delay=0.5)) as llm:
        env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": label_studio["token"],
               "MODEL_DIR": str(tmp_path / "model_dir"), "HCC_CACHE_DIR": str(tmp_path / "cache"),
               "HCC_LLM_BASE_URL": llm.url, "HCC_LLM_MODEL": "fault-model", "HCC_LLM_STRUCTURED": "json_object",
               "HCC_LLM_CONCURRENCY": "1", "HCC_TRAIN": "0", "LOG_LEVEL": "INFO"}
        first = BackendProcess(env, tmp_path / "first.log")
        project = ls.projects.create(title="hcc restart", label_config=config)
        ls.ml.create(url=first.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=[
            *({"data": {"text": r["text"]}, "annotations": [{"result": _choice(r["category"])}]} for r in anchors),
            *({"data": {"text": r["text"]}} for r in tasks),
        ])
        wait_until(lambda: _status(first.url, project.id)["job"].get("state") == "running" and llm.request_count >= 3,
                   timeout=240, what="the pre-label to be asking the LLM")
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(30)
        assert _status_file_state(tmp_path, project.id) == "running"  # what the killed process left behind

        llm.default = llm_label(classes[0])  # the LLM answers at once from now on
        port = urlparse(first.url).port  # the URL Label Studio knows the backend by
        second = launch.start_backend(env, log=tmp_path / "second.log", port=port)
        try:
            status = wait_until(lambda: (s := _status(second.url, project.id))["job"].get("state") == "done"
                                and s["last_run"].get("kind") == "prelabel" and s, timeout=300,
                                what="the resumed pre-label to finish")
            assert status["last_run"].get("resumed_after_restart") == 1
            version = status["model_version"]
            listed = {t.id: t.model_dump() for t in ls.tasks.list(project=project.id, fields="all")}
            unlabelled = [t for t in listed.values() if not t["annotations"]]
            assert len(unlabelled) == len(tasks)
            for task in unlabelled:
                ours = [p for p in task["predictions"] if p["model_version"] == version]
                assert len(ours) == 1, (task["id"], ours)  # every task predicted, none twice
        finally:
            second.stop()


def _status_file_state(tmp_path, project: int) -> str | None:
    from backend.studio.store import ProjectStore

    return ProjectStore(tmp_path / "model_dir" / "projects" / str(project)).get("job", {}).get("state")
