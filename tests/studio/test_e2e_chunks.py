"""A pre-label over a real Label Studio 1.23.2 labels and writes its tasks chunk by chunk, and writes task meta
where the policy says (issue 12).

Real parts: Label Studio (the session fixture), the backend's service, its encoder and ``StudioClient`` in this
process. The chunks are made small so that a handful of tasks shows what 100,000 do.
"""

from __future__ import annotations

from typing import Any

import pytest

from backend.studio import service as service_module
from backend.studio.client import PREDICTIONS_ONLY, StudioClient, StudioError
from backend.studio.service import HCCService
from backend.studio.settings import Settings
from tests.studio.test_e2e_writes import CONFIG, _project, _unlabelled, _versions


@pytest.fixture(scope="module")
def ls(label_studio):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio["url"], api_key=label_studio["token"])


def test_each_chunk_is_written_before_the_next_is_labelled(ls, label_studio, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(service_module, "FIRST_CHUNK", 1)
    monkeypatch.setattr(service_module, "REFINE_SAMPLE", 5)
    # Every chunk as a bulk import, whose ids are read back: the choice of single creates (cheaper for a few
    # predictions once the import calls show a fixed cost) depends on this machine's timings.
    monkeypatch.setattr(service_module, "single_creates_cheaper", lambda *a, **k: False)
    service = HCCService(Settings(label_studio_url=label_studio["url"], label_studio_api_key=label_studio["token"],
                                  model_dir=tmp_path, prelabel_chunk=3))
    project_id = _project(ls, n_tasks=9)
    model = service.model(project_id, CONFIG)
    version = model.model_version
    seen_before: list[int] = []  # tasks with our prediction in Label Studio when each chunk starts
    label = model.label

    def labelled_chunk(tasks: list[dict[str, Any]], **kwargs: Any):
        seen_before.append(sum(bool(_versions(t, version)) for t in _unlabelled(ls, project_id)))
        assert kwargs.get("refine") is False  # one refinement for every chunk, fitted before the first
        return label(tasks, **kwargs)
    monkeypatch.setattr(model, "label", labelled_chunk)
    read_back: list[int] = []
    tasks = StudioClient.tasks

    def listed(self, project: int, ids=None, **kwargs):
        got = list(tasks(self, project, ids, **kwargs))
        if ids is not None and kwargs.get("include") == PREDICTIONS_ONLY:  # a read-back, not the listing's pass
            read_back.append(len(got))
        return iter(got)
    monkeypatch.setattr(StudioClient, "tasks", listed)

    summary = service.prelabel(model)

    assert seen_before == [0, 1, 3, 6]  # chunks of 1, 2, 3, 3
    assert summary["chunks"] == 4 and summary["labelled"] == 9 and summary["predictions_written"] == 9
    assert all(len(_versions(t, version)) == 1 for t in _unlabelled(ls, project_id))
    assert read_back == [1, 2, 3, 3]  # each chunk reads back its own tasks' prediction ids, not the project's
    refinement = model.pipeline.refinement()
    assert refinement is not None and refinement.items == 5  # fitted once, on the sample
    job = model.store.get("job")
    assert (job["done"], job["total"], job["predicted"], job["eta_s"]) == (9, 9, 9, 0.0) and job["rate"] > 0


OURS = {"needs_review", "hcc_stage", "hcc_labels"}


def _service(label_studio, model_dir, **settings: Any) -> HCCService:
    return HCCService(Settings(label_studio_url=label_studio["url"], label_studio_api_key=label_studio["token"],
                               model_dir=model_dir, **settings))


def _metas(ls, project_id: int) -> dict[int, dict[str, Any]]:
    return {t["id"]: t["meta"] for t in _unlabelled(ls, project_id)}


def test_flagged_tasks_get_meta_and_lose_it_when_no_longer_flagged(ls, label_studio, tmp_path) -> None:
    project_id = _project(ls, n_tasks=5)
    first = min(_metas(ls, project_id))
    ls.tasks.update(id=str(first), meta={"reviewer_note": "keep me"})
    # Every task flagged (calibration off: the flag is score < HCC_REVIEW_THRESHOLD): every task gets our meta.
    everyone = _service(label_studio, tmp_path, calibration=False, review_threshold=1.01)
    everyone.prelabel(everyone.model(project_id, CONFIG))
    metas = _metas(ls, project_id)
    assert all(meta["needs_review"] is True and set(meta) >= OURS for meta in metas.values())
    assert metas[first]["reviewer_note"] == "keep me"
    # None flagged: our keys leave every task, the reviewer's stays.
    nobody = _service(label_studio, tmp_path, calibration=False, review_threshold=0.0)
    nobody.prelabel(nobody.model(project_id, CONFIG))
    metas = _metas(ls, project_id)
    assert all(not OURS & set(meta) for meta in metas.values()), metas
    assert metas[first] == {"reviewer_note": "keep me"}


def test_task_meta_off_writes_none_and_a_bad_policy_is_named(ls, label_studio, tmp_path, monkeypatch) -> None:
    project_id = _project(ls, n_tasks=3)
    service = _service(label_studio, tmp_path, calibration=False, review_threshold=1.01, task_meta="off")
    summary = service.prelabel(service.model(project_id, CONFIG))
    assert summary["needs_review"] == 3 and summary["predictions_written"] == 3
    assert all(not OURS & set(meta) for meta in _metas(ls, project_id).values())
    monkeypatch.setenv("HCC_TASK_META", "some")
    with pytest.raises(ValueError, match="HCC_TASK_META must be one of flagged, all, off; got 'some'"):
        Settings.from_env()


def test_every_prediction_is_written_before_the_slow_task_meta(ls, label_studio, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(service_module, "FIRST_CHUNK", 2)
    service = _service(label_studio, tmp_path, calibration=False, review_threshold=1.01, prelabel_chunk=2)
    project_id = _project(ls, n_tasks=6)
    model = service.model(project_id, CONFIG)
    predicted_at_meta: list[int] = []
    update_meta = StudioClient.update_meta

    def meta_write(self, metas, **kwargs):
        predicted_at_meta.append(sum(bool(_versions(t, model.model_version)) for t in _unlabelled(ls, project_id)))
        return update_meta(self, metas, **kwargs)
    monkeypatch.setattr(StudioClient, "update_meta", meta_write)
    summary = service.prelabel(model)
    assert summary["chunks"] == 3 and predicted_at_meta == [6]  # one meta write, after the three chunks
    assert all(set(meta) >= OURS for meta in _metas(ls, project_id).values())


def test_meta_a_stopped_job_did_not_write_is_written_by_the_next(ls, label_studio, tmp_path, monkeypatch) -> None:
    service = _service(label_studio, tmp_path, calibration=False, review_threshold=1.01)
    project_id = _project(ls, n_tasks=4)
    model = service.model(project_id, CONFIG)
    update_meta = StudioClient.update_meta

    def refused(self, metas, **kwargs):
        raise StudioError("Label Studio went away")
    monkeypatch.setattr(StudioClient, "update_meta", refused)
    with pytest.raises(StudioError):
        service.prelabel(model)  # every prediction written, no meta
    assert all(_versions(t, model.model_version) for t in _unlabelled(ls, project_id))
    monkeypatch.setattr(StudioClient, "update_meta", update_meta)
    service.prelabel(model)  # the same predictions: only the meta is left to write
    assert all(set(meta) >= OURS for meta in _metas(ls, project_id).values())


def test_a_project_with_nothing_to_label_still_reports_its_threshold(ls, label_studio, tmp_path) -> None:
    project_id = _project(ls, n_tasks=0)  # only the annotated anchors
    service = _service(label_studio, tmp_path, review_threshold=0.4)
    summary = service.prelabel(service.model(project_id, CONFIG))
    assert summary["labelled"] == 0 and summary["chunks"] == 0 and summary["predictions_written"] == 0
    assert summary["review_threshold"] == 0.4 and summary["scores"]
