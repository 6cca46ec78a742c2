"""*Start training* end to end: the real Label Studio 1.23.2, the real backend process, real training of MiniLM.

The project's texts come from :func:`tests.synthetic_text.misleading_set`, where the frozen encoder is misled
and training is known to help, so the trained encoder is adopted: a new model version whose predictions
replace the frozen one's, while the frozen one serves until the new predictions exist.
"""

from __future__ import annotations

import requests
from conftest import BackendProcess, backend_status, project_tasks, wait_until

from tests.synthetic_text import SUBJECTS, misleading_set


def _choice(label: str) -> list[dict]:
    return [{"from_name": "subject", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def _ours(task: dict) -> list[dict]:
    return [p for p in task["predictions"] if p["model_version"].startswith("hcc-")]


def test_start_training_adopts_a_trained_encoder_under_a_new_version(label_studio, tmp_path):
    from label_studio_sdk import LabelStudio

    anchors, anchor_labels = misleading_set(15, seed=0)
    tasks, task_labels = misleading_set(3, seed=5)
    config = ('<View><Text name="text" value="$text"/><Choices name="subject" toName="text">'
              + "".join(f'<Choice value="{s}"/>' for s in SUBJECTS) + "</Choices></View>")
    env = {"LABEL_STUDIO_URL": label_studio["url"], "LABEL_STUDIO_API_KEY": label_studio["token"],
           "MODEL_DIR": str(tmp_path / "model_dir"), "HCC_LLM_BASE_URL": "", "LOG_LEVEL": "INFO",
           "HCC_CACHE_DIR": str(tmp_path / "cache"), "HCC_TRAIN_MAX_STEPS": "24", "HCC_TRAIN_EVERY": "0"}
    ls = LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])
    project = ls.projects.create(title="hcc training", label_config=config)
    backend = BackendProcess(env, tmp_path / "backend.log")
    world = {"ls": ls, "project": project.id, "backend": backend}
    try:
        ml = ls.ml.create(url=backend.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=[
            *({"data": {"text": t}, "annotations": [{"result": _choice(lab)}]} for t, lab in zip(anchors, anchor_labels,
                                                                                                  strict=True)),
            *({"data": {"text": t}} for t in tasks)])
        wait_until(lambda: backend_status(world)["last_run"].get("kind") == "prelabel"
                   and backend_status(world)["job"].get("state") == "done", timeout=240, what="pre-labelling")
        frozen = backend_status(world)["model_version"]
        unlabelled = [t for t in project_tasks(world).values() if not t["annotations"]]
        assert len(unlabelled) == len(tasks)
        assert all([p["model_version"] for p in _ours(t)] == [frozen] for t in unlabelled)

        ls.ml.train(id=ml.id)
        wait_until(lambda: backend_status(world)["training"].get("state") in ("running", "done"), timeout=60,
                   what="the training job to start")
        # The frozen encoder answers /predict until the trained one is adopted.
        task = unlabelled[0]
        body = {"tasks": [{"id": task["id"], "data": task["data"]}], "project": f"{project.id}.0",
                "label_config": config}
        during = requests.post(f"{backend.url}/predict", json=body, timeout=60).json()["results"][0]
        if backend_status(world)["training"].get("state") == "running":
            assert during["model_version"] == frozen

        status = wait_until(lambda: (s := backend_status(world))["training"].get("state") == "done" and s,
                            timeout=300, what="the training to finish")
        result = status["training"]["result"]
        assert result["adopted"], result["reason"]
        assert result["holdout_right_after"] > result["holdout_right_before"]
        assert result["trained_on"] == result["fit_anchors"]  # /status counts the texts it saw, never lists them
        trained = status["training"]["model_version"]
        assert trained.startswith(frozen + "-t") and status["model_version"] == trained
        # Every prediction is re-written by the trained model, then the frozen model's are deleted.
        wait_until(lambda: ls.projects.get(id=project.id).model_version == trained
                   and all([p["model_version"] for p in _ours(t)] == [trained]
                           for t in project_tasks(world).values() if not t["annotations"]),
                   timeout=240, what="the trained model's predictions to replace the frozen one's")
        right = {t["data"]["text"]: t for t in project_tasks(world).values() if not t["annotations"]}
        labels = {text: _ours(t)[0]["result"][0]["value"]["choices"][0] for text, t in right.items()}
        accuracy = sum(labels[t] == lab for t, lab in zip(tasks, task_labels, strict=True)) / len(tasks)
        assert accuracy >= 0.75, labels

        # A restart keeps the adopted model.
        backend.stop()
        world["backend"] = backend = BackendProcess(env, tmp_path / "backend.log")
        again = requests.post(f"{backend.url}/predict", json=body, timeout=60).json()["results"][0]
        assert again["model_version"] == trained and backend_status(world)["model_version"] == trained
    finally:
        world["backend"].stop()
