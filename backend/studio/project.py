"""One Label Studio project seen by the HCC engine: anchors from human labels, predictions from the pipeline.

The engine works on plain texts and labels; this module turns tasks into texts, annotations into anchors
and HCC records into Label Studio predictions and task meta. It keeps the project's state in a
``ProjectStore`` so every gunicorn worker and every restart sees the same anchors and records.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.confidence.calibration import Calibrator, fit_calibrator, threshold_for_precision
from backend.data import MAX_TEXT_CHARS, clean_text
from backend.labelling.encoder import Encoder
from backend.labelling.llm import LLMAnnotator, LLMError
from backend.labelling.pipeline import HCCPipeline, stored_answers
from backend.labelling.training import TrainingResult
from backend.labelling.transductive import Refinement
from backend.studio.labelconfig import ChoicesTarget
from backend.studio.settings import Settings
from backend.studio.store import Anchor, ProjectStore

log = logging.getLogger(__name__)

LLM_RETRY_SECONDS = 60.0  # after the LLM failed, requests are answered without it for this long
TRUSTED_STAGES = ("consistent",)  # records whose label joins the DCCA reference set of later batches
#: Records of one label a DCCA vote uses at most (the newest): the vote's cost stays bounded as a project grows.
REFERENCE_PER_LABEL = 200
NOT_FLAGGED = ("consistent", "encoder_only")  # "combined" (the pooled views disagreed) is flagged


class TaskDataError(ValueError):
    """A task's data cannot be labelled; the message names the task and the field."""


@dataclass
class Scores:
    values: dict[int, float]  # task id -> prediction score
    threshold: float  # flag for review below it
    message: str  # how the scores were made (calibrated on N reviews, or what the first probability rests on)
    calibrated: bool = False  # calibrated on reviews (else the records' own probability, or the agreement score)


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


def versioned(base_version: str, trained: dict[str, Any] | None) -> str:
    """The model version of a project: the configuration's, plus the adopted trained encoder's key."""
    return f"{base_version}-t{trained['key'][:8]}" if trained else base_version


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
    return clean_text(text[:MAX_TEXT_CHARS])


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


def probability_score(record: dict[str, Any]) -> float:
    """P(label is right) of a record before any review: a pooled run's score, else (a DCCA run, whose score
    is an agreement share) the prior's probability; a record without either gets its agreement score."""
    if record.get("score_kind") == "probability":
        return round(float(record.get("score") or 0.0), 4)
    if record.get("prior_probability") is not None:
        return round(float(record["prior_probability"]), 4)
    return review_score(record)


def published_probabilities(records: list[dict[str, Any]], calibrator: Calibrator) -> tuple[np.ndarray, bool]:
    """The prediction scores Label Studio shows (with calibration on), and whether the reviews calibrated
    them: the calibrator's P(label is right) once it has enough reviews, before that the records' own
    probability (:func:`probability_score`; a DCCA run's items whose annotators disagreed are flagged
    whatever it says, see :meth:`ProjectModel.prediction`)."""
    if calibrator.fallback_:
        return np.array([probability_score(r) for r in records], dtype=np.float64), False
    return (calibrator.predict_records(records) if records else np.zeros(0)), True


def disagreed(record: dict[str, Any]) -> bool:
    """The views of a DCCA run disagreed on the item (an agreement record outside the consistent stages)."""
    return record.get("score_kind") != "probability" and record.get("stage") not in NOT_FLAGGED


def review_score(record: dict[str, Any]) -> float:
    """The prediction score Label Studio shows and sorts by.

    A pooled run's score is the probability that the label is right, so with the default threshold the review
    tab holds the items more likely wrong than right, the least likely first. In a DCCA run consistent items
    score in [0.5, 1] and inconsistent ones in [0, 0.5): the tab holds exactly the items the views disagreed
    on, the least supported first.
    """
    score = float(record.get("score") or 0.0)
    if record.get("score_kind") == "probability":  # a pooled run: the score is already P(label is right)
        return round(score, 4)
    if record.get("stage") in NOT_FLAGGED:
        return round(0.5 + 0.5 * score, 4)
    return round(min(0.5 * score, 0.4999), 4)


class ReferenceSet:
    """The trusted records of earlier runs (stage in ``TRUSTED_STAGES``, a label of the config, a task without an
    anchor) as vectors and label indices: DCCA's reference set next to the anchors.

    Kept in memory and brought up to date on each use from the records changed since the last one
    (:meth:`ProjectStore.items_since`: writes of other workers included), so a request reads and encodes what
    changed, not the whole project. Arrays handed out are never written again (a run may still use them while
    the next request updates the set): rows are appended past them, and a removal builds new arrays.

    A vote uses at most ``per_label`` records of each label, the newest: so a request's vote costs the same in
    a project of 1,000 records as in one of 100,000 (every record scanned made DCCA's /predict 4.7x slower at
    100k than at 1k, docs/benchmarks.md). The newest are kept since they were labelled with anchors closest to
    the current ones; a centroid's standard error over 200 items is 1/14 of their spread (not measured on accuracy).
    """

    FIELDS = ("stage", "label", "text")

    def __init__(self, encoder: Any, index_of: dict[str, int], *, per_label: int = REFERENCE_PER_LABEL) -> None:
        self.encoder = encoder  # the vectors are this encoder's: another one needs another set
        self.index_of = index_of
        self.per_label = per_label
        self.rows_read = 0  # records read from the store so far: the work the updates cost
        self._clear()
        self._anchor_revision: int | None = None
        self._anchored: set[int] = set()

    def _clear(self) -> None:
        self._revision, self._deletions = -1, 0
        self._tasks: list[int] = []  # row -> task id
        self._texts: list[str] = []  # row -> text (a changed text is encoded again)
        self._rows: dict[int, int] = {}  # task id -> row
        self._vectors = np.zeros((0, 0), dtype=np.float32)  # rows [0, len(self._tasks)) are in use
        self._labels = np.zeros(0, dtype=np.int64)
        self._by_label: dict[int, list[int]] = {}  # label -> its rows, oldest first
        self._voting: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (rows, vectors, labels) of a vote

    def __len__(self) -> int:
        return len(self._tasks)

    def arrays(self, exclude: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, label indices) of the newest ``per_label`` rows of each label, without the rows of the
        tasks in ``exclude`` (an excluded row leaves its place empty: a label may then have one row fewer)."""
        if self._voting is None:  # built again only after a change: its cost is per label, not per record
            rows = np.array(sorted(r for kept in self._by_label.values() for r in kept[-self.per_label:]), np.int64)
            self._voting = rows, self._vectors[rows], self._labels[rows]
        rows, vectors, labels = self._voting
        hit = [self._rows[t] for t in exclude if t in self._rows]
        if not hit:
            return vectors, labels
        keep = ~np.isin(rows, hit)
        return vectors[keep], labels[keep]

    def update(self, store: ProjectStore) -> None:
        revision = store.revision()
        if revision != self._anchor_revision:
            anchored = store.anchored_tasks()
            if self._anchored - anchored:  # a task lost its anchor: its record may be trusted again
                self._clear()
            else:
                self._remove(anchored & self._rows.keys())
            self._anchored, self._anchor_revision = anchored, revision
        changes = store.items_since(self._revision, self.FIELDS)
        if self._revision >= 0 and changes.deletions != self._deletions:  # rows are gone: read them all again
            self._clear()
            changes = store.items_since(-1, self.FIELDS)
        self.rows_read += len(changes.rows)
        self._apply(changes.rows)
        self._revision, self._deletions = changes.revision, changes.deletions

    def _apply(self, rows: dict[int, dict[str, Any]]) -> None:
        gone, new = set(), {}
        for task_id, record in rows.items():
            label = self.index_of.get(record["label"]) if record["stage"] in TRUSTED_STAGES else None
            trusted = label is not None and isinstance(record["text"], str) and task_id not in self._anchored
            row = self._rows.get(task_id)
            if row is not None and (not trusted or self._texts[row] != record["text"] or self._labels[row] != label):
                gone.add(task_id)  # untrusted now, or changed: a changed one is appended again below
            if trusted and (row is None or task_id in gone):
                new[task_id] = (record["text"], label)
        self._remove(gone)
        self._append(new)

    def _remove(self, tasks: set[int]) -> None:
        if not tasks:
            return
        keep = [row for row, task_id in enumerate(self._tasks) if task_id not in tasks]
        self._vectors, self._labels = self._vectors[keep], self._labels[keep]  # new arrays: handed-out ones stay
        self._tasks = [self._tasks[row] for row in keep]
        self._texts = [self._texts[row] for row in keep]
        self._rows = {task_id: row for row, task_id in enumerate(self._tasks)}
        self._by_label = {}
        for row, label in enumerate(self._labels[:len(self._tasks)].tolist()):
            self._by_label.setdefault(label, []).append(row)
        self._voting = None

    def _append(self, new: dict[int, tuple[str, int]]) -> None:
        if not new:
            return
        vectors = self.encoder.encode([text for text, _ in new.values()])
        n, k = len(self._tasks), len(new)
        if self._vectors.shape[1] != vectors.shape[1] or len(self._vectors) < n + k:
            capacity = max(2 * n, n + k, 256)  # doubling: appending a request's few rows copies nothing
            grown = np.zeros((capacity, vectors.shape[1]), dtype=np.float32)
            labels = np.zeros(capacity, dtype=np.int64)
            if n:
                grown[:n], labels[:n] = self._vectors[:n], self._labels[:n]
            self._vectors, self._labels = grown, labels
        self._vectors[n:n + k] = vectors
        self._labels[n:n + k] = [label for _, label in new.values()]
        for row, (task_id, (text, label)) in enumerate(new.items(), start=n):
            self._rows[task_id] = row
            self._tasks.append(task_id)
            self._texts.append(text)
            self._by_label.setdefault(label, []).append(row)
        self._voting = None


class ProjectModel:
    """The HCC engine bound to one project's label set, anchors and stored records."""

    def __init__(self, project_id: int, target: ChoicesTarget, settings: Settings, encoder,
                 store: ProjectStore | None = None, *, second_encoder=None) -> None:
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
                logprobs=bool(settings.llm_logprobs), choice_logprobs=settings.llm_logprobs,
                structured=settings.llm_structured,
            )
        self.pipeline = HCCPipeline(encoder, list(target.labels), llm=llm, config=settings.hcc,
                                    second_encoder=second_encoder, descriptions=dict(target.descriptions or {}))
        # The views' weights of the last full run: a re-vote after a restart combines them as before.
        self.pipeline.restore_pool(self.store.get("pool"))
        self._revision = -1
        self._calibrated: tuple[int, Calibrator] | None = None  # (anchor revision, calibrator fitted then)
        self._references: ReferenceSet | None = None  # built on first use, kept up to date from the store
        self._lock = threading.RLock()  # the pipeline's anchors are swapped as a whole under it
        self.trained: dict[str, Any] | None = None  # the adopted trained encoder ({key, model_path, ...})
        self.llm_problem: dict[str, Any] | None = None  # the last LLM failure, until it answers again
        self._fallback_pipeline: HCCPipeline | None = None  # encoder-only, for when the LLM cannot be asked
        # Runs of /predict batches bounded in time: the request answers, the run goes on here.
        self._runner = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"hcc-predict-{self.project_id}")
        self._use_stored_encoder()

    @property
    def has_llm(self) -> bool:
        return self.pipeline.llm is not None

    # -- the encoder: the shared one, or the one trained on this project's anchors --------------------------
    @property
    def model_version(self) -> str:
        """The configuration's version, plus the trained encoder's key once one was adopted: Label Studio
        then tells the trained model's predictions from the frozen one's."""
        return versioned(self.settings.model_version, self.trained)

    def _use_stored_encoder(self) -> None:
        """After a restart: the encoder this project adopted, if its directory is still there."""
        trained = self.store.get("encoder")
        if not trained:
            return
        if not trained.get("model_path") or not Path(trained["model_path"]).is_dir():
            log.warning("project %s: the trained encoder %s is gone; using %s until the next training",
                        self.project_id, trained.get("model_path"), self.settings.encoder)
            return
        self._swap_encoder(trained)

    def adopt(self, result: TrainingResult) -> None:
        """Use a trained encoder from now on (kept across restarts in the project's store)."""
        trained = {"key": result.key, "model_path": result.model_path, "base_model": result.base_model,
                   "anchors": result.anchors, "adopted_at": time.time()}
        self.store.set("encoder", trained)
        self._swap_encoder(trained)

    def _swap_encoder(self, trained: dict[str, Any]) -> None:
        encoder = Encoder(trained["model_path"], cache_dir=self.settings.cache_dir / "embeddings",
                          precision=self.settings.encoder_precision)
        with self._lock:
            self.pipeline.encoder = encoder
            self.trained = trained
            self._revision = -1  # the anchors are re-embedded by the new encoder on next use

    # -- anchors -----------------------------------------------------------------------------------
    def refresh_anchors(self) -> None:
        """Rebuild the in-memory anchors when another thread or worker changed them (or the encoder) in the
        store."""
        trained = self.store.get("encoder")
        if (trained or {}).get("key") != (self.trained or {}).get("key"):
            self._use_stored_encoder()  # another worker adopted a trained encoder
        revision = self.store.revision()
        if revision == self._revision:
            return
        with self._lock:
            anchors = self.store.anchors()
            known = set(self.target.labels)
            dropped = sorted({a.label for a in anchors if a.label not in known})
            if dropped:  # a label renamed or removed in the config: kept in the store, unused until it is back
                log.warning("project %s: %d anchors have labels the label config no longer has (%s); they are "
                            "not used", self.project_id, sum(a.label not in known for a in anchors), dropped[:5])
                anchors = [a for a in anchors if a.label in known]
            # Anchors labelled after a prediction existed came from the review order (hard items): they are
            # calibration pairs already and would bias the prior mapping's cross-check.
            predicted = self.store.predicted_tasks()
            self.pipeline.set_anchors([a.text for a in anchors], [a.label for a in anchors],
                                      cross_check=[a.task_id not in predicted for a in anchors])
            self._revision = revision

    def snapshot(self) -> HCCPipeline:
        """A consistent copy of the pipeline to compute on without the lock. Webhooks swap the anchors and a
        training swaps the encoder of ``self.pipeline`` at any time: a computation on it could pair one anchor
        set's cross-check with another's flags. What the copy computes once per anchor set is handed back by
        :meth:`_absorb` while its anchors are still the project's."""
        with self._lock:
            return copy.copy(self.pipeline)

    def describe(self) -> dict[str, str | None]:
        """In words, what the current anchors made of the pipeline: the views' weights, the classifier the
        anchors chose and the centroids' refinement (a job's report shows them)."""
        pipeline = self.snapshot()
        refinement = pipeline.refinement()
        described = {"views": (pipeline.pool_state() or {}).get("message"),
                     "classifier": pipeline.classifier_choice().message,
                     "refinement": refinement.message if refinement is not None else None}
        self._absorb(pipeline, save_pool=False)
        return described

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
    def label(self, tasks: Sequence[dict[str, Any]], *, progress: Callable[[str, int], None] | None = None,
              within: float | None = None, on_late: Callable[[dict[int, dict]], None] | None = None,
              refine: bool = False) -> tuple[dict[int, dict], dict[int, str]]:
        """Run the whole pipeline on tasks: (task id -> HCC record, task id -> error of a bad task).

        ``within`` bounds the time spent waiting for the LLM (``/predict`` must answer before Label Studio
        gives up): past it, the encoder's labels are returned, flagged with the reason, while the full run
        goes on in the background and hands its records to ``on_late``. ``refine=True`` (the pre-labelling job
        over the whole project) refits the centroids' refinement on these tasks; otherwise the refinement a
        job fitted for the current anchors is reused, and none is fitted (seconds of work on a large batch:
        not on a request's path; the re-vote job that follows an anchor change fits the next one).
        """
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
        with self._lock:  # a consistent copy; the run itself holds no lock, so a long job blocks no request
            pipeline = self.snapshot()
            reference = self._reference(exclude=set(ids))
        problem = self.llm_problem
        if problem is not None and time.time() - problem["at"] < LLM_RETRY_SECONDS:
            # Do not make every request wait for the LLM's retries (or its silence) again.
            result = self._encoder_only(pipeline, texts, reference, LLMError(problem["error"]), retry=False,
                                        refine=refine)
        elif within is None or not self.has_llm:
            result = self._annotate(pipeline, texts, reference, progress, refine)
        else:
            result = self._annotate_within(pipeline, ids, texts, reference, within, on_late, refine)
        records = dict(zip(ids, result.records, strict=True))
        self.store.put_items(records)
        return records, errors

    def refine_on(self, tasks: list[dict[str, Any]]) -> Refinement | None:
        """Fit the centroids' refinement of the current anchors on these tasks (a job's sample of the project,
        unlabelled) and keep it; the labels then come chunk by chunk with ``label(refine=False)``."""
        self.refresh_anchors()
        texts = []
        for task in tasks:
            try:
                texts.append(task_text(task, self.target))
            except TaskDataError:
                continue  # reported when that task is labelled
        pipeline = self.snapshot()
        refinement = pipeline.refine_on(texts)
        if refinement is not None:
            self._keep_fitted(pipeline, refinement=True)
        return refinement

    def _annotate(self, pipeline: HCCPipeline, texts: list[str], reference, progress=None, refine: bool = False):
        try:
            result = pipeline.annotate(texts, progress=progress or False, reference=reference, refine=refine)
        except LLMError as exc:  # LLM down or refusing: the encoder's labels, flagged, with the reason
            return self._encoder_only(pipeline, texts, reference, exc, refine=refine)
        self._llm_answered()
        self._absorb(pipeline)
        return result

    def _annotate_within(self, pipeline: HCCPipeline, ids: list[int], texts: list[str], reference,
                         within: float, on_late: Callable[[dict[int, dict]], None] | None, refine: bool = False):
        future = self._runner.submit(self._annotate, pipeline, texts, reference, None, refine)
        try:
            return future.result(timeout=within)
        except FutureTimeout:
            pass
        slow = LLMError(f"the LLM did not answer {len(texts)} item(s) within {within:.0f} s; the full labels are "
                        "written when it does")
        result = self._encoder_only(pipeline, texts, reference, slow, refine=refine)

        def finished(done) -> None:
            try:
                late = dict(zip(ids, done.result().records, strict=True))
            except Exception:
                log.exception("project %s: the background run of a late /predict failed", self.project_id)
                return
            self.store.put_items(late)
            if on_late is not None:
                on_late(late)
        future.add_done_callback(finished)
        return result

    def _absorb(self, pipeline: HCCPipeline, *, save_pool: bool = True) -> None:
        """Keep what a run on a copy of the pipeline computed once per anchor set (the anchors' cross-check,
        prior mapping and views' evidence), when the anchors did not change meanwhile; ``save_pool``: store
        the views' weights too (after a run that may have fitted them)."""
        with self._lock:
            main = self.pipeline
            if main.anchor_vectors is not pipeline.anchor_vectors or main.encoder is not pipeline.encoder:
                return
            for name in ("_prior", "_check", "_evidence", "_last_pool", "_refinement", "_choice"):
                if getattr(pipeline, name) is not None:
                    setattr(main, name, getattr(pipeline, name))
            pool = main.pool_state()
        if save_pool and pool is not None:
            self.store.set("pool", pool)

    def _encoder_only(self, pipeline: HCCPipeline, texts: list[str], reference, exc: Exception, *,
                      retry: bool = True, refine: bool = False):
        """The run without the LLM: every record says why (``llm_unavailable``) and is flagged for review.
        ``retry``: this failure is new, so the LLM is next asked ``LLM_RETRY_SECONDS`` from now. The centroids'
        refinement does not depend on the LLM: the fallback scores with the project's, or fits it
        (``refine``) and hands it to the project."""
        reason = f"the LLM could not be asked ({exc}); encoder-only label"
        if retry:
            log.warning("project %s: %s", self.project_id, reason)
            self.llm_problem = {"error": str(exc), "at": time.time()}
            self.store.set("llm", {"ok": False, **self.llm_problem})
        fallback = self._fallback(pipeline)
        fallback.use_classifier_choice(pipeline.choice_made)
        fallback.use_refinement(pipeline.refinement())
        result = fallback.annotate(texts, reference=reference, refine=refine)
        self._keep_fitted(fallback, refinement=refine)
        for record in result.records:
            if record.get("label") is not None:
                record["llm_unavailable"] = reason
        return result

    def _keep_fitted(self, fitted: HCCPipeline, *, refinement: bool) -> None:
        """Hand what the LLM-less fallback made once per anchor set back to the project: its classifier
        choice, and its refinement when it fitted one (``refinement``)."""
        with self._lock:
            main = self.pipeline
            if main.anchor_vectors is fitted.anchor_vectors and main.encoder is fitted.encoder:
                main.use_classifier_choice(fitted.choice_made)
                if refinement:
                    main.use_refinement(fitted.refinement())

    def _fallback(self, pipeline: HCCPipeline) -> HCCPipeline:
        """The pipeline without its LLM over the same anchors, built once per anchor set (its cross-check and
        prior mapping are then computed once, not on every request while the LLM is down)."""
        with self._lock:
            cached = self._fallback_pipeline
            if cached is not None and cached.anchor_vectors is pipeline.anchor_vectors \
                    and cached.encoder is pipeline.encoder:
                return cached
        fallback = HCCPipeline(pipeline.encoder, pipeline.labels, config=self.settings.hcc,
                               second_encoder=pipeline.second_encoder, descriptions=pipeline.descriptions)
        fallback.set_anchors(pipeline.anchor_texts, [pipeline.labels[i] for i in pipeline.anchor_labels],
                             cross_check=pipeline.anchor_cross_check)
        # The same anchor arrays, so a later request recognises the anchor set (set_anchors re-encoded them).
        fallback.anchor_vectors, fallback.anchor_vectors2 = pipeline.anchor_vectors, pipeline.anchor_vectors2
        with self._lock:
            self._fallback_pipeline = fallback
        return fallback

    def _llm_answered(self) -> None:
        if not self.has_llm:
            return
        # The failure may have been recorded by another process (one killed since, or another worker): the
        # store's record is cleared by whichever process sees the LLM answer, not only by the one that failed.
        recorded = self.llm_problem is not None or (self.store.get("llm") or {}).get("ok") is False
        if recorded:
            log.info("project %s: the LLM answers again", self.project_id)
            self.llm_problem = None
            self.store.set("llm", {"ok": True, "at": time.time()})

    def revote(self, records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Re-run the encoder labels and DCCA over stored records with the current anchors; no LLM call."""
        self.refresh_anchors()
        if not records:
            return {}
        ids = list(records)
        texts = [records[t]["text"] for t in ids]
        pipeline = self.snapshot()
        answers = stored_answers([records[t] for t in ids], self.settings.hcc.llm_views) if self.has_llm else None
        result = pipeline.annotate(texts, answers=answers)
        self._absorb(pipeline)
        fresh = dict(zip(ids, result.records, strict=True))
        self.store.put_items(fresh)
        return fresh

    def _reference(self, *, exclude: set[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Consistent items of earlier runs: they join DCCA's reference set for a new batch."""
        if self.settings.hcc.combine != "dcca" or not self.has_llm:
            return None  # only DCCA's votes with the LLM's views use it: nothing to read or encode
        references = self._references
        if references is None or references.encoder is not self.pipeline.encoder:  # e.g. a trained one adopted
            references = self._references = ReferenceSet(self.pipeline.encoder, self.pipeline.index_of)
        references.update(self.store)
        vectors, labels = references.arrays(exclude)
        return (vectors, labels) if len(labels) else None

    # -- scores ------------------------------------------------------------------------------------
    def reviewed_pairs(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Records of tasks a human labelled after the backend predicted them, and those human labels."""
        human = {a.task_id: a.label for a in self.store.anchors()}  # the latest label of each task
        items = self.store.items_of(human)  # the reviewed tasks' records only, not the whole project's
        tasks = [t for t in human if t in items and items[t].get("label") is not None]
        return [items[t] for t in tasks], [human[t] for t in tasks]

    def calibrator(self) -> Calibrator:
        """Fitted on every review so far; with too few it is the documented prior mapping (it says so).

        Reviews are anchors, so the fit is kept until the anchors change: /predict does not refit it.
        """
        revision = self.store.revision()
        if self._calibrated is not None and self._calibrated[0] == revision:
            return self._calibrated[1]
        records, labels = self.reviewed_pairs()
        calibrator = fit_calibrator(records, labels)
        self._calibrated = (revision, calibrator)
        return calibrator

    def _values(self, records: dict[int, dict[str, Any]]) -> tuple[dict[int, float], str, bool]:
        """(score per task, how it was made, whether it is a calibrated probability)."""
        ids = [t for t, r in records.items() if r.get("label") is not None]
        if not self.settings.calibration:
            return {t: review_score(records[t]) for t in ids}, "agreement score (HCC_CALIBRATION=0)", False
        cal = self.calibrator()
        probs, calibrated = published_probabilities([records[t] for t in ids], cal)
        message = cal.message_ if calibrated else f"{self.first_probability()}; {cal.message_}"
        return {t: round(float(p), 4) for t, p in zip(ids, probs, strict=True)}, message, calibrated

    def first_probability(self) -> str:
        """What the score before calibration rests on, in words (/status shows it)."""
        pipeline = self.snapshot()
        prior = pipeline.prior().message
        if self.settings.hcc.combine != "pool":
            self._absorb(pipeline, save_pool=False)
            return (f"until calibrated, the score is P(label is right) from the encoder's signals ({prior}); "
                    "items the annotators disagreed on are flagged whatever it is")
        evidence = pipeline.evidence(allow_llm=False)
        self._absorb(pipeline, save_pool=False)
        llm = (f"; where the LLM was asked, the views' weights fitted on {evidence.pool.items} anchors"
               if evidence.pool is not None and evidence.pool.adopted else "")
        fitted_on = (f"{evidence.temperature_anchors} cross-checked anchors the trained encoder never saw (of "
                     f"{evidence.anchors})" if evidence.unseen_only else f"{evidence.anchors} cross-checked anchors")
        return (f"until calibrated, the score is the pool's P(label is right): the encoder's temperature fitted on "
                f"{fitted_on}{llm}")

    def scores(self, records: dict[int, dict[str, Any]], *, earlier: Sequence[float] = ()) -> Scores:
        """Scores and the flag threshold over the project's unlabelled records (a pre-label or re-vote run;
        ``earlier``: the scores of the chunks this run already wrote, which set the threshold with these).

        Once enough reviews exist: P(label is right) from the calibrator, flagged below the threshold at
        which the unflagged items reach ``HCC_TARGET_PRECISION``. Before that: the records' own P(label is
        right) (:func:`published_probabilities`); with ``HCC_CALIBRATION=0``, the agreement score; either
        flagged below ``HCC_REVIEW_THRESHOLD``.
        """
        values, message, calibrated = self._values(records)
        if not calibrated:
            threshold = self.settings.review_threshold
        else:
            pooled = np.concatenate([np.asarray(earlier, float), np.fromiter(values.values(), float)])
            threshold = round(threshold_for_precision(pooled, self.settings.target_precision)
                              if len(pooled) else 1.0, 4)
        kind = "probability" if calibrated or self.settings.calibration else "agreement"
        self.store.set("calibration", {"kind": kind, "message": message, "threshold": threshold,
                                       "calibrated": calibrated, "target_precision": self.settings.target_precision})
        return Scores(values, threshold, message, calibrated)

    def batch_scores(self, records: dict[int, dict[str, Any]]) -> Scores:
        """Scores of a /predict batch, flagged with the threshold of the last project-wide run (a batch is
        too small a sample to set it)."""
        values, message, calibrated = self._values(records)
        last = self.store.get("calibration") or {}
        if not calibrated:
            return Scores(values, self.settings.review_threshold, message)
        if last.get("calibrated") and last.get("threshold") is not None:
            return Scores(values, float(last["threshold"]), message, True)
        threshold = threshold_for_precision(np.array(list(values.values())), self.settings.target_precision) \
            if values else 1.0
        return Scores(values, float(threshold), message, True)

    # -- Label Studio shapes --------------------------------------------------------------------------
    def prediction(self, task_id: int, record: dict[str, Any], score: float, threshold: float, *,
                   calibrated: bool = False) -> Prediction:
        result = [{"from_name": self.target.from_name, "to_name": self.target.to_name, "type": "choices",
                   "value": {"choices": [record["label"]]}}]
        # An encoder-only label given while the LLM was down is flagged whatever its score: a view is missing.
        # Until the reviews calibrate the score, a DCCA item whose annotators disagreed is flagged too: the
        # encoder's prior, its score then, cannot see the disagreement.
        flagged = score < threshold or bool(record.get("llm_unavailable")) or (not calibrated and disagreed(record))
        return Prediction(task_id=task_id, label=record["label"], score=score, needs_review=flagged,
                          stage=record["stage"], result=result)
