"""One project seen by the engine: task texts, annotation labels, review scores and re-votes without the LLM.

The pipeline, the project model and the SQLite store are the real ones. Only the two expensive dependencies
are replaced: the encoder maps known texts to hand-placed 2-D unit vectors (the real MiniLM takes ~20 s to
load on a shared CI box) and the LLM answers from a script while counting its calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.confidence.calibration import fit_calibrator
from backend.data import MAX_TEXT_CHARS
from backend.labelling.anchors import class_scores
from backend.labelling.llm import LLMAnswer, LLMError, LLMStats
from backend.labelling.pipeline import HCCConfig, HCCPipeline
from backend.labelling.transductive import Refinement
from backend.studio.labelconfig import ChoicesTarget
from backend.studio.project import (
    NOT_FLAGGED,
    REFERENCE_PER_LABEL,
    ProjectModel,
    ReferenceSet,
    TaskDataError,
    annotation_label,
    review_score,
    stored_answers,
    task_text,
)
from backend.studio.settings import Settings
from backend.studio.store import Anchor

LABELS = ("positive", "negative", "neutral")
TARGET = ChoicesTarget(from_name="sentiment", to_name="review", value_key="body", labels=LABELS)


def task(task_id: int, data: Any = None, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "data": data, **fields}


def choice(*labels: str, from_name: str = "sentiment", **annotation: Any) -> dict[str, Any]:
    """A Label Studio annotation choosing ``labels`` in the control ``from_name``."""
    region = {"from_name": from_name, "to_name": "review", "type": "choices", "value": {"choices": list(labels)}}
    return {"id": annotation.pop("id", 1), "result": [region], **annotation}


# -- task_text ---------------------------------------------------------------------------------------


def test_task_text_returns_the_configured_field() -> None:
    assert task_text(task(1, {"body": "it broke", "title": "x"}), TARGET) == "it broke"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"title": "no body here"}, ["'body'", "missing", "$body"]),
        ({"body": 42}, ["'body'", "string", "int"]),
        ({"body": None}, ["'body'", "string", "NoneType"]),
        ({"body": "  \n "}, ["'body'", "empty"]),
    ],
    ids=["missing", "number", "null", "blank"],
)
def test_task_text_errors_name_the_task_and_the_field(data: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(TaskDataError) as err:
        task_text(task(4711, data), TARGET)
    message = str(err.value)
    assert "task 4711" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("data", [None, "just a string", ["body"]], ids=["none", "string", "list"])
def test_task_without_a_data_object_is_refused(data: Any) -> None:
    with pytest.raises(TaskDataError) as err:
        task_text(task(9, data), TARGET)
    assert "task 9" in str(err.value) and "'data'" in str(err.value)


def test_task_data_error_is_a_value_error() -> None:
    assert issubclass(TaskDataError, ValueError)


def test_long_text_is_cut_to_the_engine_limit() -> None:
    long_text = "".join(chr(ord("a") + i % 26) for i in range(MAX_TEXT_CHARS + 500))
    text = task_text(task(1, {"body": long_text}), TARGET)
    assert len(text) == MAX_TEXT_CHARS
    assert long_text.startswith(text)
    short = long_text[: MAX_TEXT_CHARS - 1]
    assert task_text(task(2, {"body": short}), TARGET) == short  # below the limit: untouched


# -- annotation_label ----------------------------------------------------------------------------------


def test_annotation_label_reads_the_single_choice_of_the_control() -> None:
    assert annotation_label(choice("negative"), TARGET) == "negative"


def test_cancelled_annotation_is_no_label() -> None:
    assert annotation_label(choice("negative", was_cancelled=True), TARGET) is None


def test_only_the_targets_control_counts() -> None:
    assert annotation_label(choice("negative", from_name="topic"), TARGET) is None
    # A second control in the same annotation is skipped, the target's choice is found after it.
    both = choice("price", from_name="topic")
    both["result"].append(choice("positive")["result"][0])
    assert annotation_label(both, TARGET) == "positive"


def test_unknown_label_is_no_label_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.studio.project"):
        assert annotation_label(choice("furious", id=77), TARGET) is None
    assert any("77" in r.getMessage() and "furious" in r.getMessage() for r in caplog.records)


def test_several_choices_are_no_label() -> None:
    # A single-choice control edited into a multi-choice one: two labels cannot be one anchor.
    assert annotation_label(choice("positive", "negative"), TARGET) is None


@pytest.mark.parametrize("annotation", [{"id": 1}, {"id": 1, "result": None}, {"id": 1, "result": []},
                                        {"id": 1, "result": [{"from_name": "sentiment", "value": {}}]}])
def test_annotation_without_a_choice_is_no_label(annotation: dict[str, Any]) -> None:
    assert annotation_label(annotation, TARGET) is None


# -- review_score --------------------------------------------------------------------------------------

FLAGGED_STAGES = ("round1", "round2", "unresolved", "skipped", None)
SCORES = [i / 1000 for i in range(1001)] + [0.49999, 0.99999, 0.999999]


@pytest.mark.parametrize("stage", NOT_FLAGGED)
def test_review_score_of_agreeing_views_is_at_least_one_half(stage: str) -> None:
    assert min(review_score({"stage": stage, "score": s}) for s in SCORES) >= 0.5
    assert review_score({"stage": stage, "score": None}) >= 0.5  # a missing score is no reason to review


@pytest.mark.parametrize("stage", FLAGGED_STAGES)
def test_review_score_of_disagreeing_views_is_below_one_half(stage: str | None) -> None:
    assert max(review_score({"stage": stage, "score": s}) for s in SCORES) < 0.5


@pytest.mark.parametrize("stage", NOT_FLAGGED + FLAGGED_STAGES)
def test_review_score_is_monotone_in_the_record_score(stage: str | None) -> None:
    """Label Studio sorts the review tab by it: better supported items must never sort below worse ones."""
    values = [review_score({"stage": stage, "score": s}) for s in sorted(SCORES)]
    assert all(a <= b for a, b in pairwise(values))
    assert values[-1] > values[0]  # and it does follow the score, it is not a constant


# -- a project model on the real pipeline ----------------------------------------------------------------

ANGLES = {
    # anchors: two per class
    "great product": 0, "love it": 10, "awful": 120, "broken on arrival": 130, "it is a box": 240,
    "arrived on tuesday": 250,
    # items to label
    "nice": 5, "terrible": 125, "meh": 200, "hm": 60, "so so": 245,
}
ANCHOR_TEXTS = {"great product": "positive", "love it": "positive", "awful": "negative",
                "broken on arrival": "negative", "it is a box": "neutral", "arrived on tuesday": "neutral"}


class AngleEncoder:
    """The pipeline's encoder dependency: each known text is a unit vector at a fixed angle."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 2), np.float32)
        rad = [math.radians(ANGLES[t]) for t in texts]
        return np.array([[math.cos(r), math.sin(r)] for r in rad], dtype=np.float32)


def ok(label: str, probability: float | None = 0.9) -> LLMAnswer:
    return LLMAnswer(label=label, valid=True, raw=label, probability=probability)


# Per text, the answer of each view: agreeing, disagreeing, off the label set, failed, without logprobs.
SCRIPT: dict[str, dict[str, LLMAnswer]] = {
    "nice": {"zero_shot": ok("positive"), "hinted": ok("positive", 0.97)},
    "terrible": {"zero_shot": ok("negative", 0.6), "hinted": ok("negative")},
    "meh": {"zero_shot": ok("negative", 0.4), "hinted": ok("neutral", 0.55)},
    "hm": {"zero_shot": LLMAnswer(label=None, valid=False, raw="banana", probability=None),
           "hinted": LLMAnswer(label=None, valid=False, error="APITimeoutError: timed out")},
    "so so": {"zero_shot": ok("neutral", None), "hinted": ok("neutral", None)},
}


class ScriptedLLM:
    """The pipeline's LLM dependency: scripted answers per text and view, every call counted."""

    def __init__(self) -> None:
        self.stats = LLMStats()
        self.calls = 0

    def zero_shot(self, texts: Sequence[str], *, progress: Any = None) -> list[LLMAnswer]:
        self.calls += 1
        return [SCRIPT[t]["zero_shot"] for t in texts]

    def hinted(self, texts: Sequence[str], hints: Sequence[str], *, progress: Any = None) -> list[LLMAnswer]:
        self.calls += 1
        return [SCRIPT[t]["hinted"] for t in texts]

    def choose(self, texts: Sequence[str], candidates: Sequence[Sequence[str]], *, progress: Any = None
               ) -> list[LLMAnswer]:
        """The choice view: always the last candidate, with a distribution over all of them."""
        self.calls += 1
        return [LLMAnswer(label=c[-1], valid=True, raw=c[-1], probability=0.8,
                          distribution={**{x: 0.2 / (len(c) - 1) for x in c[:-1]}, c[-1]: 0.8}) for c in candidates]


@pytest.fixture
def model(tmp_path: Path) -> ProjectModel:
    # The paper's two views and DCCA: the scripted answers below exercise each DCCA stage.
    dcca = HCCConfig(combine="dcca", llm_views=("zero_shot", "hinted"))
    settings = Settings(model_dir=tmp_path, hcc=dcca)  # no HCC_LLM_BASE_URL: the scripted LLM is plugged in below
    project = ProjectModel(5, TARGET, settings, AngleEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.pipeline.llm = ScriptedLLM()
    return project


def item_tasks() -> list[dict[str, Any]]:
    return [task(10 + i, {"body": text}) for i, text in enumerate(SCRIPT)]


def test_label_stores_records_and_reports_bad_tasks(model: ProjectModel) -> None:
    records, errors = model.label(item_tasks() + [task(99, {"text": "wrong key"})])
    assert sorted(records) == [10 + i for i in range(len(SCRIPT))]
    assert list(errors) == [99] and "task 99" in errors[99] and "'body'" in errors[99]
    assert model.store.items() == records  # what a re-vote in another worker will read back
    stages = {r["stage"] for r in records.values()}
    # The script must exercise both sides of the review split, or the checks below prove little.
    assert stages & set(NOT_FLAGGED) and stages - set(NOT_FLAGGED)
    model.settings.calibration = False  # the agreement score: flagged exactly when the views disagreed
    scores = model.scores(records)
    assert scores.threshold == 0.5
    for task_id, record in records.items():
        pred = model.prediction(task_id, record, scores.values[task_id], scores.threshold)
        assert pred.needs_review == (record["stage"] not in NOT_FLAGGED)
        assert pred.result == [{"from_name": "sentiment", "to_name": "review", "type": "choices",
                                "value": {"choices": [record["label"]]}}]


def test_scores_are_a_probability_from_the_first_prediction_then_calibrated(model: ProjectModel) -> None:
    records, _ = model.label(item_tasks())
    early = model.scores(records)  # no reviews yet: the records' own P(right), not the DCCA agreement share
    assert "no reviewed items yet" in early.message and early.threshold == model.settings.review_threshold
    assert "P(label is right) from the encoder's signals" in early.message and not early.calibrated
    assert all(early.values[t] == round(r["prior_probability"], 4) for t, r in records.items())
    assert model.store.get("calibration")["kind"] == "probability"
    # The encoder's prior cannot see that the views disagreed: those items stay flagged until calibrated.
    for task_id, record in records.items():
        pred = model.prediction(task_id, record, early.values[task_id], early.threshold)
        assert pred.needs_review == (record["stage"] not in NOT_FLAGGED or early.values[task_id] < early.threshold)
    # Reviews of every predicted task, half of them disagreeing with the prediction: enough pairs to calibrate.
    model.calibrator = lambda: fit_calibrator(  # type: ignore[method-assign]
        [records[t] for t in records] * 4,
        [r["label"] if i % 2 else "__other__" for i, r in enumerate(list(records.values()) * 4)],
        min_pairs=4, min_per_class=2)
    late = model.scores(records)
    assert "calibrated on" in late.message and late.calibrated
    assert all(0.0 < v < 1.0 for v in late.values.values())
    accepted = [v for v in late.values.values() if v >= late.threshold]
    # The unflagged items' expected precision (their mean probability) meets the target, when any are kept.
    assert not accepted or sum(accepted) / len(accepted) >= model.settings.target_precision - 1e-9
    assert model.store.get("calibration")["threshold"] == late.threshold
    batch = model.batch_scores({t: records[t] for t in list(records)[:1]})
    assert batch.threshold == late.threshold  # a /predict batch reuses the project-wide threshold


def test_a_calibrated_threshold_set_chunk_by_chunk_is_the_one_of_the_whole_run(model: ProjectModel) -> None:
    records, _ = model.label(item_tasks())
    model.calibrator = lambda: fit_calibrator(  # type: ignore[method-assign]
        [records[t] for t in records] * 4,
        [r["label"] if i % 3 else "__other__" for i, r in enumerate(list(records.values()) * 4)],
        min_pairs=4, min_per_class=2)
    model.settings.target_precision = 0.6  # below these scores: the threshold keeps some items unflagged
    whole = model.scores(records)
    assert whole.calibrated and whole.threshold < 1.0
    ids = sorted(records, key=lambda t: whole.values[t])  # the surest items last: the last chunk alone differs
    first, last = {t: records[t] for t in ids[:3]}, {t: records[t] for t in ids[3:]}
    alone = model.scores(last)
    assert alone.threshold != whole.threshold  # else this split could not tell the pooling from its absence
    chunked = model.scores(last, earlier=list(model.scores(first).values.values()))
    assert chunked.threshold == whole.threshold
    assert model.store.get("calibration")["threshold"] == whole.threshold  # what /predict batches then reuse


def test_reviewed_anchors_do_not_fit_the_prior_mapping(model: ProjectModel) -> None:
    records, _ = model.label(item_tasks())
    assert records[10]["prior_probability"] > 0
    # A reviewer labels two predicted tasks: they become anchors, but not cross-check anchors.
    model.store.put_anchor(Anchor(annotation_id=201, task_id=10, text="nice", label="positive"))
    model.store.put_anchor(Anchor(annotation_id=202, task_id=12, text="meh", label="neutral"))
    model.refresh_anchors()
    pipe = model.pipeline
    flags = dict(zip(pipe.anchor_texts, pipe.anchor_cross_check.tolist(), strict=True))
    assert flags == {**dict.fromkeys(ANCHOR_TEXTS, True), "nice": False, "meh": False}
    assert pipe.prior().pairs == len(ANCHOR_TEXTS)


def test_scores_read_one_anchor_set_while_a_webhook_swaps_the_anchors(model: ProjectModel, monkeypatch) -> None:
    """A re-vote's scores fit the prior mapping while annotation webhooks change the anchors: the fit must see
    one anchor set. It once ran on the shared pipeline and paired the cross-check of 12 anchors with the flags
    of 13 ('operands could not be broadcast together'); it now runs on a snapshot."""
    records, _ = model.label(item_tasks())
    model.store.put_anchor(Anchor(annotation_id=301, task_id=50, text="nice", label="positive"))
    model.refresh_anchors()  # a first webhook: the prior mapping is to be refitted on the next scores
    model.store.put_anchor(Anchor(annotation_id=302, task_id=51, text="terrible", label="negative"))
    real = HCCPipeline.cross_check
    landed: list[int] = []

    def cross_check_then_a_webhook(pipeline: HCCPipeline):
        check = real(pipeline)
        if not landed:  # the second webhook lands between the cross-check and the use of the anchors' flags
            landed.append(len(pipeline.anchor_labels))
            model.refresh_anchors()
        return check

    monkeypatch.setattr(HCCPipeline, "cross_check", cross_check_then_a_webhook)
    scores = model.scores(records)
    assert landed == [len(ANCHOR_TEXTS) + 1] and len(model.pipeline.anchor_labels) == len(ANCHOR_TEXTS) + 2
    assert set(scores.values) == set(records)
    # The prior fitted on the older anchors was not kept for the newer ones; theirs is fitted when next needed.
    assert model.pipeline._prior is None
    assert model.pipeline.prior().pairs == len(ANCHOR_TEXTS) + 2


def test_stored_answers_round_trip_the_llm_answers(model: ProjectModel) -> None:
    records, _ = model.label(item_tasks())
    stored = model.store.items()  # through SQLite and JSON, as a re-vote gets them
    ids = sorted(stored)
    views = model.settings.hcc.llm_views
    answers = stored_answers([stored[t] for t in ids], views)
    assert set(answers) == set(views)
    for view in views:
        for t, got in zip(ids, answers[view], strict=True):
            original = SCRIPT[stored[t]["text"]][view]
            assert isinstance(got, LLMAnswer)
            assert (got.label, got.valid, got.probability, got.error) == \
                (original.label, original.valid, original.probability, original.error)
            assert got.cached  # it did not come from the LLM this time
            if not original.valid:  # the raw text is kept for the answers that missed the label set
                assert got.raw == original.raw


def test_revote_reproduces_the_labels_without_calling_the_llm(model: ProjectModel) -> None:
    records, _ = model.label(item_tasks())
    calls = model.pipeline.llm.calls
    assert calls > 0
    fresh = model.revote(model.store.items())
    assert model.pipeline.llm.calls == calls
    assert fresh == records  # same anchors, same answers: the same records


def test_anchors_from_tasks_keeps_only_usable_annotations(model: ProjectModel, caplog) -> None:
    tasks = [
        task(1, {"body": "nice"}, annotations=[choice("positive", id=11)]),
        task(2, {"body": "meh"}, annotations=[choice("neutral", id=21, was_cancelled=True),
                                              choice("negative", id=22)]),
        task(3, {"title": "no body"}, annotations=[choice("negative", id=31)]),  # bad data: logged, skipped
        task(4, {"body": "hm"}, annotations=[choice("furious", id=41)]),  # not in the label set
        task(5, {"body": "so so"}),  # not annotated
    ]
    with caplog.at_level(logging.WARNING, logger="backend.studio.project"):
        anchors = model.anchors_from_tasks(tasks)
    assert anchors == [Anchor(11, 1, "nice", "positive"), Anchor(22, 2, "meh", "negative")]
    assert any("31" in r.getMessage() and "task 3" in r.getMessage() for r in caplog.records)


def test_settings_read_the_classifier_and_precision_and_refuse_bad_values(monkeypatch) -> None:
    monkeypatch.setenv("HCC_CLASSIFIER", "Ensemble")
    monkeypatch.setenv("HCC_ENCODER_PRECISION", "float32")
    settings = Settings.from_env()
    assert settings.hcc.classifier == "ensemble" and settings.encoder_precision == "float32"
    monkeypatch.setenv("HCC_ENCODER_PRECISION", "bfloat16")
    assert Settings.from_env().model_version != settings.model_version  # other vectors, other predictions
    monkeypatch.setenv("HCC_CLASSIFIER", "knn")
    with pytest.raises(ValueError, match="HCC_CLASSIFIER must be one of .*'knn'"):
        Settings.from_env()


def test_settings_read_the_anchor_llm_cap_and_refuse_one_that_cannot_weigh_the_llm(monkeypatch) -> None:
    monkeypatch.delenv("HCC_ANCHOR_LLM_CAP", raising=False)
    default = Settings.from_env()
    monkeypatch.setenv("HCC_ANCHOR_LLM_CAP", "30")
    capped = Settings.from_env()
    assert (default.hcc.anchor_llm_cap, capped.hcc.anchor_llm_cap) == (100, 30)
    assert capped.model_version != default.model_version  # other evidence, other weights
    monkeypatch.setenv("HCC_ANCHOR_LLM_CAP", "0")
    assert Settings.from_env().hcc.anchor_llm_cap == 0  # the LLM is never weighed, so never asked
    monkeypatch.setenv("HCC_ANCHOR_LLM_CAP", "-1")
    with pytest.raises(ValueError, match="HCC_ANCHOR_LLM_CAP must be at least 0, got -1"):
        Settings.from_env()
    monkeypatch.setenv("HCC_ANCHOR_LLM_CAP", "5")  # calls that could never earn the LLM a weight
    with pytest.raises(ValueError, match="HCC_ANCHOR_LLM_CAP must be 0 .* or at least 20 .*, got 5"):
        Settings.from_env()


def test_a_second_encoder_reaches_the_records_and_the_model_version(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HCC_SECOND_ENCODER", raising=False)
    plain = Settings.from_env()
    monkeypatch.setenv("HCC_SECOND_ENCODER", " all-mpnet-base-v2 ")
    settings = Settings.from_env()
    assert settings.second_encoder == "all-mpnet-base-v2" and plain.second_encoder == ""
    assert settings.model_version != plain.model_version  # another score, another model version
    project = ProjectModel(6, TARGET, Settings(model_dir=tmp_path), AngleEncoder(), second_encoder=AngleEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    records, _ = project.label(item_tasks())
    # The same geometry in both spaces: the second encoder backs every label the first one gave.
    assert all(r["encoder2_label"] == r["encoder_label"] for r in records.values())
    assert all(r["encoder2_probability"] == r["encoder_probability"] for r in records.values())
    assert "encoder2_logit" in project.pipeline.prior().weights


def test_the_service_builds_the_second_encoder_only_when_set(tmp_path: Path) -> None:
    from backend.labelling.encoder import DEFAULT_ENCODER
    from backend.studio.service import HCCService

    assert HCCService(Settings(model_dir=tmp_path)).second_encoder is None
    service = HCCService(Settings(model_dir=tmp_path, second_encoder=DEFAULT_ENCODER))
    second = service.second_encoder
    assert second is not None and second is service.second_encoder  # built once
    model = service.model(7, "<View><Text name='t' value='$text'/><Choices name='c' toName='t'>"
                             "<Choice value='yes'/><Choice value='no'/></Choices></View>")
    assert model.pipeline.second_encoder is second


def test_a_second_encoder_that_was_never_pulled_fails_setup_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    from backend.studio.service import HCCService

    monkeypatch.setenv("HCC_CACHE_DIR", str(tmp_path / "empty-cache"))
    service = HCCService(Settings(model_dir=tmp_path, second_encoder="all-mpnet-base-v2"))
    config = ("<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='yes'/>"
              "<Choice value='no'/></Choices></View>")
    with pytest.raises(ValueError, match="HCC_SECOND_ENCODER: .*hcc encoder pull all-mpnet-base-v2"):
        service.setup({"project": 8, "schema": config})


def test_the_pooled_default_labels_and_revotes_in_a_project(tmp_path: Path) -> None:
    # Six anchors are too few to weigh the LLM: it is asked about the anchors only, and labels stay the encoder's.
    project = ProjectModel(7, TARGET, Settings(model_dir=tmp_path), AngleEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.pipeline.llm = ScriptedLLM()
    records, _ = project.label(item_tasks())
    assert project.settings.hcc.combine == "pool"
    assert {r["stage"] for r in records.values()} == {"encoder_only"}
    assert all(r["label"] == r["encoder_label"] for r in records.values())
    assert all(0.0 < r["score"] <= 1.0 for r in records.values())
    # before any review the tab holds the items more likely wrong than right: the score is a probability
    first = project.scores(records)
    assert all(first.values[t] == r["score"] for t, r in records.items())
    assert "the pool's P(label is right)" in first.message and "cross-checked anchors" in first.message
    project.settings.calibration = False
    scores = project.scores(records)
    assert all(scores.values[t] == r["score"] for t, r in records.items())
    flagged = {t for t, r in records.items()
               if project.prediction(t, r, scores.values[t], scores.threshold).needs_review}
    assert flagged == {t for t, r in records.items() if r["score"] < 0.5}
    doubtful = {"stage": "encoder_only", "score": 0.3, "score_kind": "probability", "label": "neutral"}
    assert review_score(doubtful) == 0.3  # a DCCA record of that stage would score 0.65 and go unflagged
    assert project.prediction(1, doubtful, review_score(doubtful), scores.threshold).needs_review
    calls = project.pipeline.llm.calls
    assert calls == 1  # the anchors' question; no item was asked
    project.revote(project.store.items())
    assert project.pipeline.llm.calls == calls


def test_a_project_keeps_the_views_weights_across_a_restart(tmp_path: Path) -> None:
    project = ProjectModel(8, TARGET, Settings(model_dir=tmp_path), AngleEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.pipeline.llm = ScriptedLLM()
    project.label(item_tasks())
    saved = project.store.get("pool")
    assert saved is not None and saved == project.pipeline.pool_state()
    restarted = ProjectModel(8, TARGET, Settings(model_dir=tmp_path), AngleEncoder())
    assert restarted.pipeline.pool_state() == saved


def test_training_settings_are_read_and_bad_values_named(monkeypatch) -> None:
    monkeypatch.setenv("HCC_TRAIN_EVERY", "25")
    monkeypatch.setenv("HCC_TRAIN_MAX_STEPS", "50")
    monkeypatch.setenv("HCC_TRAIN", "0")
    assert Settings.from_env().training.refit is False
    monkeypatch.setenv("HCC_TRAIN_REFIT", "1")
    settings = Settings.from_env()
    assert settings.train_every == 25 and settings.training.max_steps == 50 and settings.train is False
    assert settings.training.refit is True
    monkeypatch.setenv("HCC_TRAIN_EVERY", "often")
    with pytest.raises(ValueError, match="HCC_TRAIN_EVERY must be a whole number, got 'often'"):
        Settings.from_env()
    monkeypatch.setenv("HCC_TRAIN_EVERY", "5")
    monkeypatch.setenv("HCC_TRAIN_MAX_STEPS", "0")
    with pytest.raises(ValueError, match="HCC_TRAIN_MAX_STEPS must be at least 1"):
        Settings.from_env()


def test_new_annotations_queue_a_training_every_n_and_a_lost_training_keeps_the_model(tmp_path: Path) -> None:
    from backend.studio.service import HCCService

    # No Label Studio: the jobs that write to it fail and say so; the training itself needs none.
    service = HCCService(Settings(model_dir=tmp_path, train_every=3))
    config = ("<View><Text name='text' value='$text'/><Choices name='c' toName='text'><Choice value='yes'/>"
              "<Choice value='no'/></Choices></View>")
    project = {"id": 9, "label_config": config}
    version = service.model(9, config).model_version

    def annotate(n: int) -> dict:
        return service.webhook({"action": "ANNOTATION_CREATED", "project": project,
                                "task": {"id": n, "data": {"text": f"text number {n}"}},
                                "annotation": {"id": 100 + n, "result": [
                                    {"from_name": "c", "to_name": "text", "type": "choices",
                                     "value": {"choices": ["yes" if n % 2 else "no"]}}]}})

    for n in (1, 2):
        annotate(n)
    assert service.store(9).get("training") is None  # 2 new anchors: below HCC_TRAIN_EVERY
    annotate(3)
    assert service.training_jobs.wait_idle(timeout=120)
    training = service.status(9)["training"]
    assert training["state"] == "done" and training["anchors_at_start"] == 3
    assert not training["result"]["adopted"] and "not trained" in training["result"]["reason"]
    assert service.model(9, config).model_version == version == service.status(9)["model_version"]
    annotate(4)  # one more since the last training: none queued
    assert service.training_jobs.wait_idle(timeout=5) and service.status(9)["training"]["anchors_at_start"] == 3
    assert service.jobs.wait_idle(timeout=60)  # the re-votes and re-label, which fail without Label Studio


def test_a_task_text_with_a_lone_surrogate_is_cleaned() -> None:
    assert task_text(task(1, {"body": "it \ud800 broke"}), TARGET) == "it \ufffd broke"


def test_anchors_of_a_label_the_config_no_longer_has_are_left_out_not_an_error(tmp_path: Path, caplog) -> None:
    project = ProjectModel(10, TARGET, Settings(model_dir=tmp_path), AngleEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.store.put_anchor(Anchor(annotation_id=999, task_id=99, text="great", label="renamed_label"))
    with caplog.at_level(logging.WARNING):
        records, errors = project.label(item_tasks())
    assert records and all(r["label"] in LABELS for r in records.values())
    assert any("renamed_label" in r.getMessage() for r in caplog.records)
    assert len(project.store.anchors()) == len(ANCHOR_TEXTS) + 1  # kept, in case the label comes back


# -- models kept in memory by the service -------------------------------------------------------------

YES_NO = ("<View><Text name='text' value='$text'/><Choices name='c' toName='text'><Choice value='yes'/>"
          "<Choice value='no'/></Choices></View>")


def test_the_service_keeps_one_model_per_project_and_only_the_recently_used_projects(tmp_path: Path) -> None:
    from backend.studio.service import HCCService

    service = HCCService(Settings(model_dir=tmp_path, max_projects_in_memory=2))
    # A config edited five times: each edit replaces the project's model, none is left behind.
    edits = [YES_NO.replace("<Choice value='no'/>", f"<Choice value='no'/><Choice value='maybe{i}'/>")
             for i in range(5)]
    models = [service.model(1, config) for config in edits]
    assert len({id(m) for m in models}) == 5 and len(service._models) == 1
    assert service.model(1, edits[-1]) is models[-1] and models[-1].target.labels[-1] == "maybe4"
    assert service.store(1).get("label_config") == edits[-1]
    # Least recently used projects go first: 1 was used after 2, so 3 evicts 2.
    two = service.model(2, YES_NO)
    assert service.model(1, edits[-1]) is models[-1]
    service.model(3, YES_NO)
    assert list(service._models) == [1, 3]
    assert service.model(1, edits[-1]) is models[-1]  # still the same object: not rebuilt
    assert service.model(2, YES_NO) is not two  # rebuilt from its store on next use
    assert service.health()["status"] == "UP"
    # A job that still holds the evicted model goes on with it (real encoder, real store).
    for i, (text, label) in enumerate([("yes please", "yes"), ("absolutely yes", "yes"), ("no thanks", "no"),
                                       ("certainly not", "no")], start=1):
        two.store.put_anchor(Anchor(annotation_id=i, task_id=i, text=text, label=label))
    records, errors = two.label([task(10, {"text": "no way"}), task(11, {"text": "yes, sure"})])
    assert not errors and [records[10]["label"], records[11]["label"]] == ["no", "yes"]


def test_the_number_of_projects_in_memory_is_read_and_bad_values_named(monkeypatch) -> None:
    monkeypatch.delenv("HCC_MAX_PROJECTS_IN_MEMORY", raising=False)
    assert Settings.from_env().max_projects_in_memory == 32
    monkeypatch.setenv("HCC_MAX_PROJECTS_IN_MEMORY", "5")
    assert Settings.from_env().max_projects_in_memory == 5
    monkeypatch.setenv("HCC_MAX_PROJECTS_IN_MEMORY", "0")
    with pytest.raises(ValueError, match="HCC_MAX_PROJECTS_IN_MEMORY must be at least 1, got 0"):
        Settings.from_env()
    monkeypatch.setenv("HCC_MAX_PROJECTS_IN_MEMORY", "lots")
    with pytest.raises(ValueError, match="HCC_MAX_PROJECTS_IN_MEMORY must be a whole number, got 'lots'"):
        Settings.from_env()


# -- DCCA's reference set: kept in memory, read from the store only where it changed ----------------------


class CountingEncoder(AngleEncoder):
    """Any text is a unit vector at an angle from its hash (the known ones at theirs); texts encoded are counted.
    ``turn`` rotates every vector: another encoder, another embedding space."""

    def __init__(self, turn: float = 0.0) -> None:
        self.turn = turn
        self.texts = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        if not texts:
            return np.zeros((0, 2), np.float32)
        import zlib

        rad = [math.radians(self.turn + (ANGLES[t] if t in ANGLES else zlib.crc32(t.encode()) % 360)) for t in texts]
        return np.array([[math.cos(r), math.sin(r)] for r in rad], dtype=np.float32)


def dcca_project(directory: Path, encoder: CountingEncoder) -> ProjectModel:
    settings = Settings(model_dir=directory, hcc=HCCConfig(combine="dcca", llm_views=("zero_shot", "hinted")))
    project = ProjectModel(5, TARGET, settings, encoder)
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.pipeline.llm = ScriptedLLM()
    return project


def stored(n: int, first: int = 1000) -> dict[int, dict[str, Any]]:
    """Records of earlier runs: three in four trusted (consistent), the rest not."""
    return {first + i: {"text": f"stored text {i}", "label": LABELS[i % 3],
                        "stage": "consistent" if i % 4 else "combined"} for i in range(n)}


def per_request_work(directory: Path, n_stored: int) -> tuple[int, int]:
    """(store rows read, texts encoded) by a /predict of one task after a first one, with n_stored records."""
    encoder = CountingEncoder()
    project = dcca_project(directory, encoder)
    project.store.put_items(stored(n_stored))
    project.label([task(10, {"body": "nice"})])  # the first request after a start reads the project once
    rows = [0]
    for name in ("items", "items_since"):  # every way of reading records, counted by the rows they return
        method = getattr(project.store, name, None)
        if method is not None:
            def counted(*args, _method=method, **kwargs):
                out = _method(*args, **kwargs)
                rows[0] += len(out.rows if hasattr(out, "rows") else out)
                return out
            setattr(project.store, name, counted)
    encoded = encoder.texts
    records, _ = project.label([task(11, {"body": "terrible"})])
    assert records[11]["label"] == "negative"
    return rows[0], encoder.texts - encoded


def test_the_work_of_a_predict_does_not_grow_with_the_records_stored(tmp_path: Path) -> None:
    small = per_request_work(tmp_path / "small", 200)
    large = per_request_work(tmp_path / "large", 20_000)
    # It read the one record the first request wrote, encoded it and the new task: with 200 records or 20,000.
    assert large == small and small[0] <= 1 and small[1] <= 2


def reference_rows(reference: tuple[np.ndarray, np.ndarray] | None) -> list[tuple[int, float, float]]:
    if reference is None:
        return []
    vectors, labels = reference
    return sorted((int(label), round(float(x), 5), round(float(y), 5)) for label, (x, y) in zip(labels, vectors,
                                                                                              strict=True))


def from_scratch(project: ProjectModel, exclude: set[int]) -> list[tuple[int, float, float]]:
    """The reference set as the whole store defines it, built from every record."""
    anchored = project.store.anchored_tasks()
    trusted = [r for t, r in project.store.items().items() if r.get("stage") in ("consistent",)
               and t not in exclude and t not in anchored and r.get("label") in project.pipeline.index_of]
    if not trusted:
        return []
    vectors = project.pipeline.encoder.encode([r["text"] for r in trusted])
    labels = np.array([project.pipeline.index_of[r["label"]] for r in trusted])
    return reference_rows((vectors, labels))


def test_the_reference_set_follows_every_change_another_worker_makes(tmp_path: Path) -> None:
    here = dcca_project(tmp_path, CountingEncoder())
    there = ProjectModel(5, TARGET, here.settings, CountingEncoder())  # another gunicorn worker, same store
    there.store.put_items(stored(40))
    held = here._reference(exclude={1001})
    assert reference_rows(held) == from_scratch(here, {1001}) and len(held[1]) == 29
    kept = (held[0].copy(), held[1].copy())
    changes = {
        1001: {"text": "stored text 1", "label": "positive", "stage": "combined"},  # no longer trusted
        1002: {"text": "stored text 2", "label": "neutral", "stage": "consistent"},  # another label
        1003: {"text": "a text edited in the task", "label": "positive", "stage": "consistent"},
        1004: {"text": "stored text 4", "label": "positive", "stage": "consistent"},  # now trusted
        2000: {"text": "a new trusted item", "label": "negative", "stage": "consistent"},
        2001: {"text": "a label the config dropped", "label": "renamed", "stage": "consistent"},
    }
    there.store.put_items(changes)
    assert reference_rows(here._reference(exclude={1005})) == from_scratch(here, {1005})
    there.store.put_anchor(Anchor(annotation_id=900, task_id=1006, text="stored text 6", label="neutral"))
    assert reference_rows(here._reference(exclude=set())) == from_scratch(here, set())  # an anchored task is out
    there.store.remove_anchors([900])
    assert reference_rows(here._reference(exclude=set())) == from_scratch(here, set())  # and back in
    there.store.delete_items([1007, 2000])
    assert reference_rows(here._reference(exclude=set())) == from_scratch(here, set())
    here.pipeline.encoder = CountingEncoder(turn=90.0)  # a trained encoder adopted: another embedding space
    assert reference_rows(here._reference(exclude=set())) == from_scratch(here, set())
    # Arrays handed to an earlier run are never written over while it may still use them.
    np.testing.assert_array_equal(held[0], kept[0])
    np.testing.assert_array_equal(held[1], kept[1])


def test_a_vote_uses_the_newest_records_of_each_label_and_no_more(tmp_path: Path) -> None:
    project = dcca_project(tmp_path, CountingEncoder())
    project._references = ReferenceSet(project.pipeline.encoder, project.pipeline.index_of, per_label=5)
    project.store.put_items(stored(40))  # 30 trusted, 10 of each label
    project.store.put_items({1100 + i: {"text": f"later text {i}", "label": LABELS[i % 3], "stage": "consistent"}
                             for i in range(6)})  # two more of each label, written last
    newest = {label: [t for t in sorted(project.store.items()) if project.store.items()[t]["stage"] == "consistent"
                      and project.store.items()[t]["label"] == label][-5:] for label in LABELS}
    assert reference_rows(project._reference(exclude=set())) == from_tasks(project, sum(newest.values(), []))
    # An excluded task (the batch's own) leaves its place empty rather than pulling in an older record.
    held_out = newest[LABELS[0]][-1]
    kept = [t for t in sum(newest.values(), []) if t != held_out]
    assert reference_rows(project._reference(exclude={held_out})) == from_tasks(project, kept)


def test_the_vote_reads_as_many_records_with_20000_stored_as_with_2000(tmp_path: Path) -> None:
    sizes = []
    for n in (2_000, 20_000):
        project = dcca_project(tmp_path / str(n), CountingEncoder())
        project.store.put_items(stored(n))
        sizes.append(len(project._reference(exclude=set())[1]))
    assert sizes[0] == sizes[1] == 3 * REFERENCE_PER_LABEL


def from_tasks(project: ProjectModel, tasks: list[int]) -> list[tuple[int, float, float]]:
    items = project.store.items()
    vectors = project.pipeline.encoder.encode([items[t]["text"] for t in tasks])
    return reference_rows((vectors, np.array([project.pipeline.index_of[items[t]["label"]] for t in tasks])))


def test_a_pooled_project_reads_no_reference_set(tmp_path: Path) -> None:
    project = ProjectModel(7, TARGET, Settings(model_dir=tmp_path), CountingEncoder())
    project.pipeline.llm = ScriptedLLM()
    project.store.put_items(stored(40))
    assert project._reference(exclude=set()) is None  # the pool does not vote with it: nothing read or encoded
    assert project.pipeline.encoder.texts == 0


def test_the_reviews_are_read_from_the_reviewed_tasks_records_only(tmp_path: Path) -> None:
    project = dcca_project(tmp_path, CountingEncoder())
    project.store.put_items(stored(2_000))
    project.store.put_anchor(Anchor(annotation_id=901, task_id=1001, text="stored text 1", label="negative"))
    project.store.put_anchor(Anchor(annotation_id=902, task_id=1002, text="stored text 2", label="positive"))
    read = []
    for name in ("items", "items_of"):
        method = getattr(project.store, name, None)
        if method is not None:
            def counted(*args, _method=method, **kwargs):
                out = _method(*args, **kwargs)
                read.append(len(out))
                return out
            setattr(project.store, name, counted)
    records, labels = project.reviewed_pairs()
    assert [r["text"] for r in records] == ["stored text 1", "stored text 2"] and labels == ["negative", "positive"]
    assert sum(read) == 2  # the two reviewed tasks' records, not the project's 2,000


def test_the_llm_concurrency_cap_is_read_and_bad_values_named(monkeypatch) -> None:
    monkeypatch.delenv("HCC_LLM_CONCURRENCY", raising=False)
    assert Settings.from_env().llm_concurrency == 64  # a cap: the limit in flight adapts below it
    monkeypatch.setenv("HCC_LLM_CONCURRENCY", "8")
    assert Settings.from_env().llm_concurrency == 8
    monkeypatch.setenv("HCC_LLM_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="HCC_LLM_CONCURRENCY must be at least 1, got 0"):
        Settings.from_env()


# -- the centroids' refinement: fitted by jobs, reused by requests, shared with the LLM-less fallback ---------


def refining_project(tmp_path: Path, llm: Any) -> tuple[ProjectModel, list[dict[str, Any]]]:
    project = ProjectModel(9, TARGET, Settings(model_dir=tmp_path), CountingEncoder())
    for i, (text, label) in enumerate(ANCHOR_TEXTS.items(), start=1):
        project.store.put_anchor(Anchor(annotation_id=100 + i, task_id=i, text=text, label=label))
    project.pipeline.llm = llm
    return project, [task(1000 + i, {"body": f"imported text {i}"}) for i in range(60)]


def test_a_request_never_fits_the_refinement_and_reuses_the_one_a_job_fitted(tmp_path: Path) -> None:
    project, batch = refining_project(tmp_path, ScriptedLLM())
    project.label(batch)  # a /predict of 60 tasks: seconds of fitting on a large project, not on this path
    assert project.pipeline.refinement() is None
    project.label(batch, refine=True)  # the pre-labelling job
    fitted = project.pipeline.refinement()
    assert fitted is not None and fitted.items == len(batch)
    project.label(batch)
    assert project.pipeline.refinement() is fitted


class DownLLM(ScriptedLLM):
    """An LLM that cannot be reached."""

    def zero_shot(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> list[LLMAnswer]:
        raise LLMError("connection refused")

    hinted = choose = zero_shot


def turned_refinement(project: ProjectModel, degrees: float, items: int) -> Refinement:
    """An adopted refinement whose centroids are the plain ones turned by ``degrees``: labels that follow it
    differ from the plain ones near the class borders."""
    pipeline = project.pipeline
    plain = np.stack([pipeline.anchor_vectors[pipeline.anchor_labels == c].mean(axis=0) for c in range(3)])
    angle = math.radians(degrees)
    turned = plain @ np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    unit = (turned / np.linalg.norm(turned, axis=1, keepdims=True)).astype(np.float32)
    return Refinement(True, 0.1, 0.01, len(pipeline.anchor_labels), items, "turned for the test", centroids=unit,
                      present=np.ones(3, bool), plain_centroids=plain.astype(np.float32))


def test_with_the_llm_down_the_labels_use_the_projects_refinement(tmp_path: Path) -> None:
    project, batch = refining_project(tmp_path, DownLLM())
    project.refresh_anchors()
    refinement = turned_refinement(project, 50, len(batch))
    project.pipeline.use_refinement(refinement)
    records, _ = project.label(batch)

    assert all("llm_unavailable" in r for r in records.values())
    assert project._fallback_pipeline.refinement() is refinement  # neither refitted nor dropped
    vectors = project.pipeline.encoder.encode([t["data"]["body"] for t in batch])
    refined = [LABELS[i] for i in refinement.scores(vectors).labels]
    assert [records[t["id"]]["encoder_label"] for t in batch] == refined
    plain = class_scores(vectors, project.pipeline.anchor_vectors, project.pipeline.anchor_labels, len(LABELS),
                         method="centroid").labels
    assert refined != [LABELS[i] for i in plain]  # the refinement moved labels, so this test can tell


def test_a_job_run_while_the_llm_is_down_still_fits_the_projects_refinement(tmp_path: Path) -> None:
    project, batch = refining_project(tmp_path, DownLLM())
    records, _ = project.label(batch, refine=True)
    assert all("llm_unavailable" in r for r in records.values())
    fitted = project.pipeline.refinement()
    assert fitted is not None and fitted is project._fallback_pipeline.refinement()


def test_the_classifier_is_chosen_once_per_anchor_set_not_on_every_request(tmp_path: Path) -> None:
    project, batch = refining_project(tmp_path, ScriptedLLM())
    project.label(batch[:3])
    chosen = project.pipeline._choice  # made on the request's copy of the pipeline, kept by the project
    assert chosen is not None and chosen.method in ("centroid", "ensemble")
    project.label(batch[3:6])
    assert project.pipeline._choice is chosen


def counted_choices(monkeypatch) -> list[int]:
    """Count the classifier choices the pipelines make from now on."""
    import backend.labelling.pipeline as pipeline_module

    made: list[int] = []
    real = pipeline_module.choose_classifier

    def counting(*args: Any, **kwargs: Any):
        made.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline_module, "choose_classifier", counting)
    return made


def test_with_the_llm_down_the_labels_use_the_projects_classifier_choice(tmp_path: Path, monkeypatch) -> None:
    project, batch = refining_project(tmp_path, DownLLM())
    project.refresh_anchors()
    chosen = project.pipeline.classifier_choice()
    made = counted_choices(monkeypatch)
    records, _ = project.label(batch[:5])
    assert all("llm_unavailable" in r for r in records.values())
    assert made == [] and project._fallback_pipeline.choice_made is chosen


def test_a_choice_made_while_the_llm_is_down_is_kept_by_the_project(tmp_path: Path, monkeypatch) -> None:
    project, batch = refining_project(tmp_path, DownLLM())
    made = counted_choices(monkeypatch)
    project.label(batch[:5])
    assert len(made) == 1 and project.pipeline.choice_made is project._fallback_pipeline.choice_made
    project.pipeline.llm = ScriptedLLM()  # the LLM answers again: the same anchors, no new choice
    project.label(batch[5:10])
    assert len(made) == 1
