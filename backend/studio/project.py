"""One Label Studio project seen by the HCC engine: anchors from human labels, predictions from the pipeline.

The engine works on plain texts and labels; this module turns tasks into texts, annotations into anchors
and HCC records into Label Studio predictions and task meta. It keeps the project's state in a
``ProjectStore`` so every gunicorn worker and every restart sees the same anchors and records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.data import MAX_TEXT_CHARS
from backend.hcc import HCCPipeline
from backend.llm import LLMAnnotator, LLMAnswer
from backend.studio.labelconfig import ChoicesTarget
from backend.studio.settings import Settings
from backend.studio.store import Anchor, ProjectStore

log = logging.getLogger(__name__)

TRUSTED_STAGES = ("consistent",)  # records whose label joins the DCCA reference set of later batches
NOT_FLAGGED = ("consistent", "encoder_only")


class TaskDataError(ValueError):
    """A task's data cannot be labelled; the message names the task and the field."""


@dataclass
class Prediction:
    """What the backend writes to Label Studio for one task."""

    task_id: int
    label: str
    score: float
    needs_review: bool
    stage: str
    result: list[dict[str, Any]]

    def meta(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"needs_review": self.needs_review, "hcc_stage": self.stage,
                "hcc_labels": {k: record.get(k) for k in ("encoder_label", "llm_zero_shot", "llm_hinted")}}

    def written(self) -> dict[str, Any]:
        """The part whose change means the prediction in Label Studio must be updated."""
        return {"label": self.label, "score": self.score, "stage": self.stage}


def task_text(task: dict[str, Any], target: ChoicesTarget) -> str:
    """The text to label, or ``TaskDataError`` naming the task and the missing/bad field."""
    data = task.get("data")
    task_id = task.get("id", "?")
    if not isinstance(data, dict):
        raise TaskDataError(f"task {task_id}: has no 'data' object")
    if target.value_key not in data:
        raise TaskDataError(f"task {task_id}: data field {target.value_key!r} (from <Text value=\"$"
                            f"{target.value_key}\">) is missing")
    text = data[target.value_key]
    if not isinstance(text, str):
        raise TaskDataError(f"task {task_id}: data field {target.value_key!r} must be a string, "
                            f"got {type(text).__name__}")
    if not text.strip():
        raise TaskDataError(f"task {task_id}: data field {target.value_key!r} is empty")
    return text[:MAX_TEXT_CHARS]


def annotation_label(annotation: dict[str, Any], target: ChoicesTarget) -> str | None:
    """The chosen label of a submitted annotation for ``target``, or None (skipped, other control, unknown)."""
    if annotation.get("was_cancelled"):
        return None
    for region in annotation.get("result") or []:
        if region.get("from_name") != target.from_name:
            continue
        choices = (region.get("value") or {}).get("choices") or []
        if len(choices) == 1 and choices[0] in target.labels:
            return choices[0]
        if choices:
            log.warning("annotation %s: choice %r is not in the label set of <Choices name=%r>; not an anchor",
                        annotation.get("id"), choices, target.from_name)
    return None


def review_score(record: dict[str, Any]) -> float:
    """The prediction score Label Studio shows and sorts by.

    Consistent items score in [0.5, 1] and inconsistent ones in [0, 0.5), so with the default threshold the
    review tab holds exactly the items the views disagreed on, the least supported first.
    """
    score = float(record.get("score") or 0.0)
    if record.get("stage") in NOT_FLAGGED:
        return round(0.5 + 0.5 * score, 4)
    return round(min(0.5 * score, 0.4999), 4)


def stored_answers(records: Sequence[dict[str, Any]], views: Iterable[str]) -> dict[str, list[LLMAnswer]]:
    """Rebuild each view's LLM answers from stored records, so a re-vote needs no LLM call."""
    answers: dict[str, list[LLMAnswer]] = {}
    for view in views:
        answers[view] = [
            LLMAnswer(label=r.get(f"llm_{view}"), valid=r.get(f"llm_{view}") is not None,
                      raw=r.get(f"llm_{view}_raw", ""), probability=r.get(f"llm_{view}_probability"),
                      error=r.get(f"llm_{view}_error"), cached=True)
            for r in records
        ]
    return answers


class ProjectModel:
    """The HCC engine bound to one project's label set, anchors and stored records."""

    def __init__(self, project_id: int, target: ChoicesTarget, settings: Settings, encoder,
                 store: ProjectStore | None = None) -> None:
        self.project_id = int(project_id)
        self.target = target
        self.settings = settings
        self.store = store or ProjectStore(settings.project_dir(project_id))
        llm = None
        if settings.llm_base_url:
            llm = LLMAnnotator(
                list(target.labels), base_url=settings.llm_base_url, model=settings.llm_model,
                api_key=settings.llm_api_key or None, descriptions=target.descriptions or None,
                cache_dir=settings.cache_dir / "llm", concurrency=settings.llm_concurrency,
                logprobs=settings.llm_logprobs, structured=settings.llm_structured,
            )
        self.pipeline = HCCPipeline(encoder, list(target.labels), llm=llm, config=settings.hcc)
        self._revision = -1
        self._lock = threading.RLock()  # the pipeline's anchors are swapped as a whole under it

    @property
    def has_llm(self) -> bool:
        return self.pipeline.llm is not None

    # -- anchors -----------------------------------------------------------------------------------
    def refresh_anchors(self) -> None:
        """Rebuild the in-memory anchors when another thread or worker changed them in the store."""
        revision = self.store.revision()
        if revision == self._revision:
            return
        with self._lock:
            anchors = self.store.anchors()
            self.pipeline.set_anchors([a.text for a in anchors], [a.label for a in anchors])
            self._revision = revision

    def anchors_from_tasks(self, tasks: Iterable[dict[str, Any]]) -> list[Anchor]:
        anchors = []
        for task in tasks:
            for annotation in task.get("annotations") or []:
                label = annotation_label(annotation, self.target)
                if label is None:
                    continue
                try:
                    text = task_text(task, self.target)
                except TaskDataError as exc:
                    log.warning("annotation %s is not an anchor: %s", annotation.get("id"), exc)
                    continue
                anchors.append(Anchor(int(annotation["id"]), int(task["id"]), text, label))
        return anchors

    # -- labelling ---------------------------------------------------------------------------------
    def label(self, tasks: Sequence[dict[str, Any]], *,
              progress: Callable[[str, int], None] | None = None) -> tuple[dict[int, dict], dict[int, str]]:
        """Run the whole pipeline on tasks: (task id -> HCC record, task id -> error of a bad task)."""
        self.refresh_anchors()
        texts, ids, errors = [], [], {}
        for task in tasks:
            try:
                texts.append(task_text(task, self.target))
                ids.append(int(task["id"]))
            except TaskDataError as exc:
                errors[int(task.get("id", -1))] = str(exc)
        if not ids:
            return {}, errors
        with self._lock:
            reference = self._reference(exclude=set(ids))
            result = self.pipeline.annotate(texts, progress=progress or False, reference=reference)
        records = dict(zip(ids, result.records, strict=True))
        self.store.put_items(records)
        return records, errors

    def revote(self, records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Re-run the encoder labels and DCCA over stored records with the current anchors; no LLM call."""
        self.refresh_anchors()
        if not records:
            return {}
        ids = list(records)
        texts = [records[t]["text"] for t in ids]
        with self._lock:
            answers = stored_answers([records[t] for t in ids], self.settings.hcc.llm_views) if self.has_llm else None
            result = self.pipeline.annotate(texts, answers=answers)
        fresh = dict(zip(ids, result.records, strict=True))
        self.store.put_items(fresh)
        return fresh

    def _reference(self, *, exclude: set[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Consistent items of earlier runs: they join DCCA's reference set for a new batch."""
        anchored = self.store.anchored_tasks()
        trusted = [(t, r) for t, r in self.store.items().items()
                   if r.get("stage") in TRUSTED_STAGES and t not in exclude and t not in anchored]
        if not trusted:
            return None
        vectors = self.pipeline.encoder.encode([r["text"] for _, r in trusted])
        labels = np.array([self.pipeline.index_of[r["label"]] for _, r in trusted], dtype=np.int64)
        return vectors, labels

    # -- Label Studio shapes --------------------------------------------------------------------------
    def prediction(self, task_id: int, record: dict[str, Any]) -> Prediction:
        score = review_score(record)
        result = [{"from_name": self.target.from_name, "to_name": self.target.to_name, "type": "choices",
                   "value": {"choices": [record["label"]]}}]
        return Prediction(task_id=task_id, label=record["label"], score=score,
                          needs_review=score < self.settings.review_threshold, stage=record["stage"], result=result)
