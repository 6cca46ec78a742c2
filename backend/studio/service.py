"""What the backend does for each Label Studio call: /setup, /predict, /webhook, and the background jobs.

- ``/predict`` labels a batch of tasks at once (one encoder batch, concurrent LLM calls) and answers one
  prediction per task; a task with bad data gets an empty prediction carrying the error, the others are
  predicted.
- ``TASKS_CREATED`` queues a *pre-label* job: rebuild the anchors from every annotation in the project, run
  the whole pipeline over the unlabelled tasks, write the predictions, then switch the project's
  ``model_version`` to theirs, write task meta and create the review tab.
- ``START_TRAINING`` (and every ``HCC_TRAIN_EVERY`` new annotations) queues a *training* job on its own
  worker: the encoder is fitted to the anchors (:mod:`backend.labelling.training`) while the current model
  keeps serving; when the trained encoder beats the frozen one on held-out anchors it is adopted, under a new
  ``model_version``, and a pre-label job re-writes every prediction with it, then deletes the old version's.
  Without an adoption the pre-label runs with the current encoder, as *Start training* always did.
- ``ANNOTATION_CREATED/UPDATED`` and ``ANNOTATIONS_DELETED`` change the anchors at once (well inside the
  1 s webhook timeout) and queue a *re-vote* job that re-runs DCCA with the stored LLM answers and updates
  the predictions whose label or score changed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.labelling.encoder import Encoder, EncoderError, resolve_model_path
from backend.labelling.training import TrainingError, train_encoder
from backend.studio.client import StudioClient, StudioError, TaskRecord
from backend.studio.jobs import MAX_RESUMES, JobQueue, ProcessLease, orphaned, project_lock, run_recorded
from backend.studio.labelconfig import LabelConfigError, PairwiseTarget, classification_target, parse_label_config
from backend.studio.prelabel import (
    FIRST_CHUNK,
    REFINE_SAMPLE,
    ChunkProgress,
    ChunkSizes,
    PendingMeta,
    PrelabelRun,
    import_costs,
    remember_import_costs,
    single_creates_cheaper,
)
from backend.studio.project import ProjectModel, Scores, TaskDataError, annotation_label, task_text, versioned
from backend.studio.settings import Settings
from backend.studio.store import Anchor, ProjectStore

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
PRELABEL_EVENTS = ("TASKS_CREATED",)
META_SLICE = 200  # task meta written between two looks at the job queue (~1 min of PATCHes here)
TRAINING_EVENTS = ("START_TRAINING",)
PREDICT_MARGIN_SECONDS = 5.0  # of /predict's time kept for the encoder-only answer and the reply
LATE_WRITE_DELAY_SECONDS = 5.0  # Label Studio stores a /predict answer's predictions within this
# The task meta keys a classification project's predictions own (Prediction.meta); others' keys are kept.
TASK_META_KEYS = ("needs_review", "hcc_stage", "hcc_labels")
# A prediction written before the meta policy existed: its task got our meta whatever its flag.
LEGACY_META = "written"


def pairwise_target(label_config: str) -> PairwiseTarget | None:
    """The ``<Pairwise>`` target of a comparison project (one without a ``<Choices>`` to predict), else None."""
    try:
        targets = parse_label_config(label_config)
    except LabelConfigError:
        return None
    pairs = [t for t in targets if isinstance(t, PairwiseTarget)]
    return pairs[0] if pairs and len(pairs) == len(targets) else None


class PayloadError(ValueError):
    """A request from Label Studio (or anyone) that does not have the shape the protocol gives it; the message
    names the field. The HTTP layer answers it with 400."""


MAX_ID = 2 ** 63 - 1  # Label Studio's ids are 64-bit; SQLite's INTEGER (the store) cannot hold more


def number_field(value: Any, where: str) -> int:
    """``value`` as an id, or :class:`PayloadError` naming ``where`` (e.g. ``annotation.id``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PayloadError(f"{where} must be a number, got {_brief(value)}")
    try:
        number = int(value)
    except ValueError:  # also a string of more digits than int() reads
        raise PayloadError(f"{where} must be a number, got {_brief(value)}") from None
    if not 0 <= number <= MAX_ID:
        raise PayloadError(f"{where} must be an id from 0 to 2**63-1, got {_brief(value)}")
    return number


def text_field(value: Any, where: str) -> str:
    """``value`` as a string (None as ""), or :class:`PayloadError` naming ``where`` (e.g. ``label_config``)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PayloadError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _brief(value: Any) -> str:
    """``repr(value)``, cut: an error message must not echo a megabyte a caller sent."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def object_field(value: Any, where: str, *, optional: bool = True) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object, got {type(value).__name__}")
    return value


def project_id_of(value: Any) -> int:
    """Label Studio names projects as ``{id}.{created_at}`` in /predict and /setup, as a dict in webhooks."""
    if isinstance(value, dict):
        value = value.get("id")
    try:
        number = int(str(value).split(".")[0])
    except (TypeError, ValueError):
        raise ValueError(f"cannot read a project id from {_brief(value)}") from None
    if not 0 <= number <= MAX_ID:  # it names a directory: a 300-digit one is "File name too long"
        raise ValueError(f"cannot read a project id from {_brief(value)}: not an id from 0 to 2**63-1")
    return number


class HCCService:
    """The backend's state in one process: settings, the shared encoder, project models, the job queue."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.settings.model_dir.mkdir(parents=True, exist_ok=True)
        self._encoder: Encoder | None = None
        self._second_encoder: Encoder | None = None
        # project id -> (the label config it was built from, its model), least recently used first; bounded
        # by HCC_MAX_PROJECTS_IN_MEMORY. A job keeps its own reference to a model evicted meanwhile.
        self._models: OrderedDict[int, tuple[str, ProjectModel]] = OrderedDict()
        self._lock = threading.Lock()
        self._setup_credentials: tuple[str, str] | None = None  # hostname and token /setup sent, in memory only
        self.lease = ProcessLease(self.settings.model_dir / "leases")  # jobs this process owns name it
        self.jobs = JobQueue(owner=self.lease.id)
        self.training_jobs = JobQueue("hcc-training", owner=self.lease.id)  # minutes long: re-votes go on
        self._health: dict[str, Any] = {"checked": 0.0}

    # -- shared parts ------------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = Encoder(self.settings.encoder, cache_dir=self.settings.cache_dir / "embeddings",
                                        precision=self.settings.encoder_precision)
            return self._encoder

    @property
    def second_encoder(self) -> Encoder | None:
        """``HCC_SECOND_ENCODER``'s encoder, or None when it is not set."""
        if not self.settings.second_encoder:
            return None
        with self._lock:
            if self._second_encoder is None:
                try:  # a packaged encoder that was never pulled fails here, at /setup, not in a later job
                    resolve_model_path(self.settings.second_encoder)
                except EncoderError as exc:
                    raise ValueError(f"HCC_SECOND_ENCODER: {exc}") from exc
                self._second_encoder = Encoder(self.settings.second_encoder,
                                               cache_dir=self.settings.cache_dir / "embeddings",
                                               precision=self.settings.encoder_precision)
            return self._second_encoder

    def client(self) -> StudioClient:
        """Label Studio as configured: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` as a pair when either
        is set (a missing one is a clear error), else the host and token that /setup sent, as a pair. Never a
        mix: the configured key must not follow a caller's ``hostname`` to another host."""
        url, key = self.settings.label_studio_url, self.settings.label_studio_api_key
        if not url and not key and self._setup_credentials:
            url, key = self._setup_credentials
        return StudioClient(url, key)

    def store(self, project_id: int) -> ProjectStore:
        return ProjectStore(self.settings.project_dir(project_id))

    def model(self, project_id: int, label_config: str) -> ProjectModel:
        """The project's model for this label config, built on first use and kept while the project is among
        the ``HCC_MAX_PROJECTS_IN_MEMORY`` most recently used. A new config text replaces the project's model
        (an edited config must not leave the old pipeline and its vectors behind)."""
        project_id = int(project_id)
        with self._lock:
            cached = self._models.get(project_id)
            if cached is not None and cached[0] == label_config:
                self._models.move_to_end(project_id)
                return cached[1]
        model = self._build_model(project_id, label_config)  # outside the lock: it may load an encoder
        with self._lock:
            cached = self._models.get(project_id)
            if cached is not None and cached[0] == label_config:  # another thread built it meanwhile
                self._models.move_to_end(project_id)
                return cached[1]
            self._models[project_id] = (label_config, model)
            self._models.move_to_end(project_id)
            while len(self._models) > self.settings.max_projects_in_memory:
                evicted, _ = self._models.popitem(last=False)  # nothing to close: jobs using it finish with it
                log.info("project %s: model unloaded (HCC_MAX_PROJECTS_IN_MEMORY=%d)", evicted,
                         self.settings.max_projects_in_memory)
        model.store.set("label_config", label_config)
        return model

    def _build_model(self, project_id: int, label_config: str) -> ProjectModel:
        pairwise = pairwise_target(label_config)
        if pairwise is not None:
            from backend.studio.pairwise import PairwiseProjectModel

            return PairwiseProjectModel(project_id, pairwise, self.settings, client=self.client)
        target = classification_target(label_config, from_name=self.settings.from_name or None)
        return ProjectModel(project_id, target, self.settings, self.encoder, second_encoder=self.second_encoder)

    # -- /health and /setup ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Quick (Label Studio waits 1 s): the Label Studio check runs in the background, at most once a minute."""
        if time.time() - self._health["checked"] > 60:
            self._health["checked"] = time.time()
            threading.Thread(target=self._check_label_studio, daemon=True).start()
        studio = {k: v for k, v in self._health.items() if k != "checked"}
        with self._lock:
            problems = [m.llm_problem for _, m in self._models.values() if getattr(m, "llm_problem", None)]
        llm_state = {"ok": not problems, **({"error": problems[-1]["error"]} if problems else {})}
        return {"status": "UP", "model_class": "HCCModel", "model_version": self.settings.model_version,
                "llm": self.settings.llm_model if self.settings.llm_base_url else None,
                **({"llm_state": llm_state} if self.settings.llm_base_url else {}), "label_studio": studio}

    def _check_label_studio(self) -> None:
        try:
            client = self.client()
            user = client.whoami()
            self._health.update(ok=True, url=client.url, user=user, error=None)
        except StudioError as exc:
            log.error("%s", exc)
            self._health.update(ok=False, error=str(exc))
        except Exception as exc:  # whatever it is, /health must say the check failed, not keep the last "ok"
            log.exception("checking Label Studio failed")
            self._health.update(ok=False, error=f"checking Label Studio failed: {type(exc).__name__}: {exc}")

    def check_label_studio_now(self) -> dict[str, Any]:
        self._health["checked"] = time.time()
        self._check_label_studio()
        return self.health()

    def setup(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("hostname") and payload.get("access_token"):
            self._setup_credentials = (payload["hostname"], payload["access_token"])
        project_id = project_id_of(payload.get("project"))
        model = self.model(project_id, payload.get("schema") or "")  # validates the config: a bad one fails
        return {"model_version": getattr(model, "model_version", self.settings.model_version)}

    # -- /predict ----------------------------------------------------------------------------------
    def predict(self, tasks: list[dict[str, Any]], project: Any, label_config: str) -> list[dict[str, Any]]:
        started = time.monotonic()
        project_id = project_id_of(project) if project is not None else project_id_of(tasks[0].get("project", 0))
        model = self.model(project_id, label_config)
        if getattr(model, "kind", "") == "pairwise":
            return model.predict(tasks)
        self._ensure_anchors(model)
        # Label Studio gives up on /predict after 100 s and then stores nothing: answer in time with what
        # the encoder says, and write the full labels once the LLM has answered.
        spent = time.monotonic() - started
        within = max(1.0, self.settings.predict_seconds - spent - PREDICT_MARGIN_SECONDS)
        records, errors = model.label(tasks, within=within, on_late=lambda late: self._complete_late(model, late))
        scores = model.batch_scores(records)
        version = model.model_version
        results = []
        for task in tasks:
            task_id = int(task["id"])  # checked by the HTTP layer
            record = records.get(task_id)
            if record is None or record.get("label") is None:
                error = errors.get(task_id) or f"task {task_id}: no label (no anchors yet and no valid LLM answer)"
                log.warning("predict: %s", error)
                results.append({"result": [], "score": 0.0, "model_version": version, "error": error})
                continue
            pred = model.prediction(task_id, record, scores.values[task_id], scores.threshold,
                                    calibrated=scores.calibrated)
            results.append({"result": pred.result, "score": pred.score, "model_version": version})
        return results

    def _complete_late(self, model: ProjectModel, records: dict[int, dict[str, Any]]) -> None:
        """The full labels of a /predict batch that was answered by the encoder alone in time: written over the
        predictions Label Studio stored from that answer (a job, after Label Studio has had time to store it)."""
        answered = time.time()

        def work() -> dict[str, Any]:
            time.sleep(max(0.0, answered + LATE_WRITE_DELAY_SECONDS - time.time()))
            model.store.update("job", step="writing the late labels of a /predict batch")
            written = self._write(model, self.client(), records, None)
            return {"late_predict": len(records), "updated": written["written"]}

        def run() -> None:
            summary = run_recorded(model.store, "late-predict", work, project_id=model.project_id,
                                   expected=(StudioError,), owner=self.lease.id)
            if summary is not None:
                model.store.update("job", state="done", step="done", finished=time.time())
        self.jobs.submit(f"late:{model.project_id}:{min(records)}:{answered}", run)

    def _ensure_anchors(self, model: ProjectModel) -> None:
        """An empty MODEL_DIR (new volume, lost disk) is rebuilt from the project's annotations once."""
        if model.store.get("anchors_synced") is not None:
            return
        listed_at = time.time()
        try:
            tasks = [_as_dict(t) for t in self.client().tasks(model.project_id)]
        except StudioError as exc:
            log.warning("project %s: cannot rebuild the anchors from Label Studio (%s); predicting with the %d "
                        "anchors on disk", model.project_id, exc, len(model.store.anchors()))
            return
        model.store.replace_anchors(model.anchors_from_tasks(tasks), listed_at=listed_at)
        model.store.set("anchors_synced", time.time())
        log.info("project %s: %d anchors rebuilt from Label Studio", model.project_id, len(model.store.anchors()))

    # -- /webhook ----------------------------------------------------------------------------------
    def webhook(self, payload: dict[str, Any]) -> dict[str, Any]:
        action = payload.get("action")
        project = payload.get("project")
        if not isinstance(project, dict) or "id" not in project:
            return {"status": "ignored", "reason": "no project in the payload"}
        project_id = number_field(project["id"], "project.id")
        label_config = text_field(project.get("label_config"), "project.label_config") or \
            self.store(project_id).get("label_config", "")
        try:
            model = self.model(project_id, label_config)
        except LabelConfigError as exc:
            return {"status": "ignored", "reason": str(exc)}
        if getattr(model, "kind", "") == "pairwise":
            return model.webhook(action, payload, self.jobs)
        if action in ANNOTATION_EVENTS:
            return self._on_annotation(model, payload)
        if action == "ANNOTATIONS_DELETED":
            annotations = payload.get("annotations") or []
            if not isinstance(annotations, list):
                raise PayloadError(f"annotations must be a list, got {type(annotations).__name__}")
            ids = [number_field(object_field(a, f"annotations[{i}]", optional=False).get("id"), f"annotations[{i}].id")
                   for i, a in enumerate(annotations)]
            removed = model.store.remove_anchors(ids)
            if removed:
                self.queue_revote(model)
            return {"status": "ok", "anchors_removed": len(removed)}
        if action in TRAINING_EVENTS and self.settings.train:
            queued = self.queue_training(model)
            return {"status": "queued" if queued else "merged", "job": "training"}
        if action in PRELABEL_EVENTS + TRAINING_EVENTS:
            if action == "TASKS_CREATED" and not self.settings.prelabel_on_import:
                return {"status": "ignored", "reason": "HCC_PRELABEL_ON_IMPORT is off"}
            queued = self.queue_prelabel(model)
            return {"status": "queued" if queued else "merged", "job": "prelabel"}
        return {"status": "ignored", "action": action}

    def _on_annotation(self, model: ProjectModel, payload: dict[str, Any]) -> dict[str, Any]:
        annotation = object_field(payload.get("annotation"), "annotation")
        task = object_field(payload.get("task"), "task")
        if "id" not in annotation:
            return {"status": "ignored", "reason": "no annotation id"}
        annotation_id = number_field(annotation["id"], "annotation.id")
        task_id = number_field(task["id"] if "id" in task else annotation.get("task"), "task.id")
        result = annotation.get("result")
        if result is not None and not (isinstance(result, list) and all(isinstance(r, dict) for r in result)):
            raise PayloadError(f"annotation {annotation_id}: annotation.result must be a list of objects")
        for i, region in enumerate(result or []):  # the shape annotation_label reads: value.choices, a list
            value = object_field(region.get("value"), f"annotation {annotation_id}: annotation.result[{i}].value")
            if not isinstance(value.get("choices"), list | None):
                raise PayloadError(f"annotation {annotation_id}: annotation.result[{i}].value.choices must be a "
                                   f"list, got {type(value['choices']).__name__}")
        label = annotation_label(annotation, model.target)
        if label is None:  # skipped, or no choice for this control: it must not stay an anchor
            removed = model.store.remove_anchors([annotation_id])
            if removed:
                self.queue_revote(model)
            return {"status": "ok", "anchor": None}
        try:
            text = task_text(task, model.target)
        except TaskDataError as exc:
            return {"status": "ignored", "reason": str(exc)}
        updated = annotation.get("updated_at") if isinstance(annotation.get("updated_at"), str) else None
        if not model.store.put_anchor(Anchor(annotation_id, task_id, text, label), source_updated=updated):
            return {"status": "ok", "anchor": label, "changed": False}  # unchanged, or a late, older event
        self.queue_revote(model)
        self._maybe_train(model)
        return {"status": "ok", "anchor": label}

    def _maybe_train(self, model: ProjectModel) -> None:
        """Queue a training once ``HCC_TRAIN_EVERY`` anchors were added since the last one started."""
        every = self.settings.train_every
        if not self.settings.train or every <= 0:
            return
        since = model.store.get("training", {}).get("anchors_at_start", 0)
        if model.store.anchor_count() - since >= every:
            self.queue_training(model)

    # -- jobs --------------------------------------------------------------------------------------
    def queue_prelabel(self, model: ProjectModel) -> bool:
        def mark() -> None:
            if model.store.get("job", {}).get("state") != "running":  # a running job reports its own state
                model.store.update("job", queued=time.time(), state="queued", kind="prelabel", owner=self.lease.id)
        return self.jobs.submit(f"prelabel:{model.project_id}", lambda: self._run_job(model, "prelabel"),
                                on_queued=mark)

    def queue_training(self, model: ProjectModel) -> bool:
        def mark() -> None:
            if model.store.get("training", {}).get("state") != "running":
                model.store.update("training", state="queued", queued=time.time(), owner=self.lease.id)
        return self.training_jobs.submit(f"train:{model.project_id}", lambda: self._run_training(model),
                                         on_queued=mark)

    def queue_revote(self, model: ProjectModel) -> bool:
        return self.jobs.submit(f"revote:{model.project_id}", lambda: self._run_job(model, "revote"))

    def status(self, project_id: int) -> dict[str, Any]:
        store = self.store(project_id)
        if store.get("kind") == "pairwise":
            return {"project": project_id, "kind": "pairwise", "job": store.get("job", {}),
                    "annotators": store.get("annotators_summary", {}), "pending_jobs": self.jobs.pending()}
        trained = store.get("encoder")
        version = versioned(self.settings.model_version, trained)
        return {"project": project_id, "model_version": version,
                "anchors": store.anchor_count(), "job": store.get("job", {}), "last_run": store.get("last_run", {}),
                "training": store.get("training", {}), "llm": store.get("llm"), "score": store.get("calibration"),
                "encoder": (trained or {}).get("model_path") or self.settings.encoder,
                "pending_jobs": self.jobs.pending() + self.training_jobs.pending()}

    def resume_jobs(self) -> list[str]:
        """Queue again the jobs that a process which is gone (killed, crashed, redeployed) had queued or was
        running; called once at start. Returns what was resumed (``"<kind>:<project>"``)."""
        root = self.settings.model_dir / "projects"
        resumed = []
        for directory in sorted(root.iterdir() if root.is_dir() else []):
            if directory.name.isdigit() and (directory / "state.sqlite").exists():
                try:
                    resumed += self._resume_project(int(directory.name))
                except Exception:  # one unreadable project must not keep the others' jobs from resuming
                    log.exception("project %s: cannot resume its jobs", directory.name)
        return resumed

    def _resume_project(self, project_id: int) -> list[str]:
        store = self.store(project_id)
        with project_lock(store.directory, "resume"):  # two workers starting at once: one claims each job
            job, training = store.get("job", {}), store.get("training", {})
            todo = [key for key, state in (("job", job), ("training", training)) if orphaned(state, self.lease)]
            if not todo:
                return []
            config = store.get("label_config")
            for key in todo:
                state = store.get(key, {})
                resumes = state.get("resumes", 0) + 1
                if not config or resumes > MAX_RESUMES:
                    why = "no label config stored" if not config else f"interrupted {MAX_RESUMES} times in a row"
                    log.error("project %s: the %s job interrupted by a restart is not resumed (%s)", project_id,
                              state.get("kind", key), why)
                    store.update(key, state="failed", error=f"interrupted by a restart; not resumed: {why}",
                                 finished=time.time())
                    continue
                store.update(key, state="queued", owner=self.lease.id, resumed=True, resumes=resumes,
                             queued=time.time())
        model = self.model(project_id, config) if config else None
        resumed = []
        for key in todo:
            state = store.get(key, {})
            if model is None or state.get("state") != "queued" or state.get("owner") != self.lease.id:
                continue
            kind = "training" if key == "training" else state.get("kind", "prelabel")
            log.warning("project %s: resuming the %s job a process that is gone left %s", project_id, kind,
                        "running" if state.get("started") else "queued")
            if getattr(model, "kind", "") == "pairwise":
                model.queue(self.jobs, kind)
            elif kind == "training":
                self.queue_training(model)
            elif kind == "revote":
                self.queue_revote(model)
            else:
                self.queue_prelabel(model)
            resumed.append(f"{kind}:{project_id}")
        return resumed

    def _run_job(self, model: ProjectModel, kind: str) -> None:
        work = (lambda: self.prelabel(model)) if kind == "prelabel" else (lambda: self.revote(model))
        summary = run_recorded(model.store, kind, work, project_id=model.project_id,
                               expected=(StudioError, LabelConfigError), owner=self.lease.id,
                               retryable=lambda exc: getattr(exc, "retryable", False),
                               retries=self.settings.job_retries, retry_seconds=self.settings.job_retry_seconds)
        if summary is not None:
            model.store.update("job", state="done", step="done", finished=time.time())
            model.store.set("last_run", {"kind": kind, **summary})

    def _run_training(self, model: ProjectModel) -> None:
        """Train under the project's training lock (not its job lock: re-votes and pre-labels go on meanwhile)."""
        store = model.store
        with project_lock(store.directory, "training"):
            anchors = store.anchors()
            store.update("training", state="running", started=time.time(), finished=None, step="training",
                         done=0, total=0, error=None, anchors_at_start=len(anchors), owner=self.lease.id)
            try:
                result = train_encoder(self.settings.encoder, [a.text for a in anchors], [a.label for a in anchors],
                                       trained_dir=self.settings.cache_dir / "trained",
                                       config=self.settings.training, progress=self._training_progress(store))
            except TrainingError as exc:
                log.error("training of project %s failed: %s", model.project_id, exc)
                store.update("training", state="failed", error=str(exc), finished=time.time())
                return
            except Exception as exc:  # the current model keeps serving; the failure is on /status
                log.exception("training of project %s failed", model.project_id)
                store.update("training", state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
                return
            changed = result.adopted and (model.trained or {}).get("key") != result.key
            if changed:
                model.adopt(result)
            store.update("training", state="done", step="done", finished=time.time(), result=result.as_dict(),
                         model_version=model.model_version)
            log.info("project %s: training %s", model.project_id, result.reason)
        self.queue_prelabel(model)  # re-label with the adopted encoder, or as Start training always did

    def _training_progress(self, store: ProjectStore):
        last = [0.0]

        def tick(step: int, total: int) -> None:
            if time.time() - last[0] > 1.0 or step == total:
                last[0] = time.time()
                store.update("training", done=step, total=total)
        return tick

    def prelabel(self, model: ProjectModel) -> dict[str, Any]:
        """The whole pipeline over the project's unlabelled tasks, written to Label Studio chunk by chunk.

        The tasks go in a seeded random order, so that every chunk is a sample of the project: the first
        predictions appear after the first small chunk, and the flag threshold set on the chunks so far holds
        for the rest. The centroids' refinement is fitted once, on a sample, before the first chunk: every
        chunk is labelled by the same model."""
        client, store = self.client(), model.store
        store.update("job", step="reading tasks")
        listed_at = time.time()
        tasks = [_as_dict(t) for t in client.tasks(model.project_id)]
        # Label Studio is the source of truth, except for what webhooks changed while the listing ran.
        store.replace_anchors(model.anchors_from_tasks(tasks), listed_at=listed_at)
        store.set("anchors_synced", time.time())
        unlabelled = [t for t in tasks if not t["annotations"]]
        random.Random(model.project_id).shuffle(unlabelled)
        log.info("project %s: %d tasks, %d unlabelled, %d anchors", model.project_id, len(tasks),
                 len(unlabelled), len(store.anchors()))
        progress = ChunkProgress(store, total=len(unlabelled))
        if unlabelled:
            store.update("job", step=f"refining the class centroids on {min(len(unlabelled), REFINE_SAMPLE)} tasks")
            model.refine_on(unlabelled[:REFINE_SAMPLE])
        existing = {t["id"]: t for t in tasks}
        run, llm_progress, meta = PrelabelRun(), self._progress(store), PendingMeta()
        sizes = ChunkSizes(first=FIRST_CHUNK, largest=self.settings.prelabel_chunk, calls=client.import_calls)
        start = 0
        while start < len(unlabelled):
            chunk = unlabelled[start:start + sizes.next()]
            start += len(chunk)
            progress.step(f"labelling {len(chunk)} tasks")
            records, errors = model.label(chunk, progress=llm_progress, refine=False)
            for error in errors.values():
                log.warning("pre-label: %s", error)
            progress.step(f"writing {len(records)} predictions")
            written = self._write(model, client, records, existing, earlier=run.scores,
                                  on_predictions=lambda n: progress.predicted(run.written + n), meta_later=meta,
                                  sizes=sizes)
            run.add(records, errors, written)
            progress.advance(len(chunk), predicted=run.written)
            remember_import_costs(store, sizes, len(tasks), client.create_calls)
        if not run.chunks:  # nothing to label: the threshold and the score's description are still the run's
            run.last_write = self._write(model, client, {}, existing)
        # Every prediction and the review tab first: the meta is one PATCH per task, Label Studio's slowest write
        # (~0.4 s each here: 15,000 flagged tasks of a 100,000-task project take most of an hour). A pre-label
        # queued meanwhile (say, by the next import call) plans every task's meta again, so this one leaves it
        # the meta not yet written rather than make it wait: the store marks a task's meta once it is written.
        meta_left = self._write_meta(store, client, meta, yield_to=f"prelabel:{model.project_id}")
        if meta_left:
            log.info("project %s: the meta of %d tasks is left to the pre-label queued next", model.project_id,
                     meta_left)
        n_cons = run.stages.get("consistent", 0)
        # CAI over the items both views labelled: every item in a DCCA run, the ones the LLM was asked in a pool
        answered = run.labelled if model.settings.hcc.combine == "dcca" else n_cons + run.stages.get("combined", 0)
        described = model.describe()
        last = run.last_write
        return {"tasks": len(tasks), "labelled": run.labelled, "errors": run.errors[:20],
                "n_errors": run.n_errors, "anchors": len(store.anchors()), "stages": run.stages,
                "cai": round(n_cons / (answered - n_cons + 1e-6), 4) if model.has_llm and answered else None,
                **described,
                "needs_review": run.needs_review, "predictions_written": run.written, "chunks": run.chunks,
                "meta_left_to_the_next_job": meta_left,
                "review_threshold": last.get("threshold"), "scores": last.get("scores")}

    def revote(self, model: ProjectModel) -> dict[str, Any]:
        """Re-vote the stored items after the anchors changed; label tasks that just lost their anchor."""
        store = model.store
        store.update("job", step="re-voting")
        anchored = store.anchored_tasks()
        items = {t: r for t, r in store.items().items() if t not in anchored and r.get("label") is not None}
        fresh = model.revote(items)
        client = self.client()
        written = self._write(model, client, fresh, None)
        return {"revoted": len(fresh), "anchors": len(store.anchors()), "updated": written["written"],
                "needs_review": written["needs_review"], "review_threshold": written["threshold"],
                "scores": written["scores"]}

    def _progress(self, store: ProjectStore):
        done = [0]
        last = [0.0]

        def tick(view: str, n: int) -> None:
            done[0] += n
            if time.time() - last[0] > 1.0:  # a status write per second, not per call
                last[0] = time.time()
                store.update("job", llm_calls=done[0], llm_step=f"LLM {view}")
        return tick

    def _write(self, model: ProjectModel, client: StudioClient, records: dict[int, dict],
               tasks: dict[int, dict] | None, *, earlier: list[float] | None = None,
               on_predictions: Callable[[int], None] | None = None,
               meta_later: PendingMeta | None = None, sizes: ChunkSizes | None = None) -> dict[str, Any]:
        """Create or update predictions whose content changed, switch model_version, meta, review tab.
        ``earlier``: the scores of the chunks this run wrote before (they join the flag threshold);
        ``on_predictions``: told how many predictions were written, once they are, before the task meta;
        ``meta_later``: collects the task meta instead of writing it (a pre-label writes every chunk's
        predictions first, then the meta, the slow part); ``sizes``: the pre-label's chunk sizes, whose fit of
        the import calls so far tells what a bulk import costs."""
        store, version = model.store, model.model_version
        known = store.written(list(records))
        scores = model.scores(records, earlier=earlier or ())
        plan = _WritePlan()
        for task_id, record in records.items():
            if record.get("label") is not None:
                self._plan_task(plan, model, client, task_id, record, scores, known.get(task_id, (None, None)),
                                tasks)
        created = self._create(model, client, plan.new, sizes)
        client.update_predictions(plan.updates)
        ids = created
        if len(created) < len(plan.new):  # the bulk import does not return ids: read back those of these
            # records' tasks, which also deletes their duplicates; a chunk reads its own tasks, not the project's
            tracked = {pid for pid, _ in known.values() if pid is not None} | set(plan.updates) | set(created.values())
            ids = client.prediction_ids(model.project_id, version, keep=tracked, tasks=list(records))
        if plan.new:
            plan.marks = {t: (pid if pid is not None else ids.get(t), w) for t, (pid, w) in plan.marks.items()}
        pending = PendingMeta(plan.metas, {t: plan.marks[t] for t in plan.metas})
        # A task's meta state is marked once its meta is written: a job stopped before that writes it again.
        store.mark_written({t: (pid, {**w, "meta": plan.had[t]}) if t in plan.metas else (pid, w)
                            for t, (pid, w) in plan.marks.items()})
        written = len(plan.new) + len(plan.updates)
        # Only now: Label Studio refuses a model_version no prediction carries yet.
        if written:
            client.set_model_version(model.project_id, version)
            client.ensure_review_tab(model.project_id, threshold=scores.threshold)
        if on_predictions is not None:
            on_predictions(written)
        if plan.stale:  # only now that their replacements are written and shown
            store.update("job", step=f"deleting {len(plan.stale)} predictions of the previous model")
            client.delete_predictions(plan.stale)
        if meta_later is not None:
            meta_later.add(pending)
        else:
            self._write_meta(store, client, pending)
        return {"written": written, "needs_review": plan.needs_review, "threshold": scores.threshold,
                "scores": scores.message, "values": list(scores.values.values())}

    def _create(self, model: ProjectModel, client: StudioClient, new: list[dict[str, Any]],
                sizes: ChunkSizes | None) -> dict[int, int]:
        """Create ``new`` predictions by the cheaper of Label Studio's two ways, as measured: one bulk import call
        (a fixed cost, the recount of the whole project, then a small cost each) or single creates (~40 ms each,
        no fixed cost, and their ids come back). A few predictions into a large project (a re-vote, a late
        /predict, an import of a few tasks) go one by one. Returns task -> prediction id, of the single creates."""
        if not new:
            return {}
        costs = import_costs(model.store, sizes, model.store.count_tasks())
        if costs is None or not single_creates_cheaper(len(new), fixed=costs[0], per_item=costs[1],
                                                       single=costs[2]):
            client.import_predictions(model.project_id, new)
            return {}
        log.info("project %s: %d predictions as single creates (a bulk import would cost ~%.0f s here)",
                 model.project_id, len(new), costs[0] + costs[1] * len(new))
        return client.create_predictions(new)

    def _plan_task(self, plan: _WritePlan, model: ProjectModel, client: StudioClient, task_id: int,
                   record: dict[str, Any], scores: Scores, known: tuple[int | None, dict | None],
                   tasks: dict[int, dict] | None) -> None:
        """Add to ``plan`` what one labelled task needs: a new prediction or an update (or nothing when the
        stored one is the same), its meta, the stale prediction of another model version, what to mark."""
        version = model.model_version
        pred = model.prediction(task_id, record, scores.values[task_id], scores.threshold,
                                calibrated=scores.calibrated)
        plan.needs_review += pred.needs_review
        pid, before = known
        # The task's meta is the task's, not the prediction's: what ours holds survives a version change.
        plan.had[task_id] = had_meta = before.get("meta", LEGACY_META) if before is not None else None
        meta = pred.needs_review if task_meta_wanted(self.settings.task_meta, pred.needs_review) else None
        written = {**pred.written(), "model_version": version, "meta": meta}
        if before is not None and before.get("model_version", self.settings.model_version) != version:
            if pid is not None:  # another model's prediction: replaced by a new one, deleted once it exists
                plan.stale.append(pid)
            pid, before = None, None
        if pid is None:  # e.g. Label Studio stored it from a /predict answer
            pid = _our_prediction(tasks.get(task_id), version) if tasks is not None else \
                client.prediction_id(task_id, version)
        same = before is not None and _prediction_part(before) == _prediction_part(written) and pid is not None
        if not same:
            if pid is None:
                plan.new.append({"task": task_id, "result": pred.result, "score": pred.score,
                                 "model_version": version})
            else:
                plan.updates[pid] = {"result": pred.result, "score": pred.score}
        if meta is not None and (not same or meta != had_meta):
            plan.metas[task_id] = pred.meta(record)
        elif meta is None and had_meta is not None:
            plan.metas[task_id] = {}  # our keys leave the task: the merge drops the owned keys it is not given
        if not same or meta != had_meta:
            plan.marks[task_id] = (pid, written)

    def _write_meta(self, store: ProjectStore, client: StudioClient, pending: PendingMeta, *,
                    yield_to: str | None = None) -> int:
        """Write the pending meta, ``META_SLICE`` tasks at a time; before each slice, stop if the job ``yield_to``
        waits (it will write what is left). Returns the number of tasks whose meta was left unwritten."""
        tasks = list(pending.metas)
        for start in range(0, len(tasks), META_SLICE):
            if yield_to is not None and self.jobs.waiting(yield_to):
                return len(tasks) - start
            part = tasks[start:start + META_SLICE]
            store.update("job", step=f"writing the meta of {len(tasks)} tasks ({start} done)")
            # Merged into each task's meta as it is right before its write, not the listing's (minutes old in a
            # pre-label): Label Studio's PATCH replaces meta whole, and a key someone set since must not be lost.
            client.update_meta({t: pending.metas[t] for t in part}, merge=True, owned=TASK_META_KEYS)
            store.mark_written({t: pending.marks[t] for t in part if t in pending.marks})
        return 0


@dataclass
class _WritePlan:
    """What one write will change in Label Studio, worked out task by task before any call."""

    new: list[dict[str, Any]] = field(default_factory=list)  # predictions to create
    updates: dict[int, dict[str, Any]] = field(default_factory=dict)  # prediction id -> new result and score
    metas: dict[int, dict[str, Any]] = field(default_factory=dict)  # task -> its meta ({}: our keys leave)
    marks: dict[int, tuple[int | None, dict[str, Any]]] = field(default_factory=dict)  # task -> (pid, state)
    stale: list[int] = field(default_factory=list)  # predictions of another model version, deleted last
    had: dict[int, Any] = field(default_factory=dict)  # task -> the meta state stored before this write
    needs_review: int = 0


def task_meta_wanted(policy: str, needs_review: bool) -> bool:
    """Whether a task gets our meta keys under ``HCC_TASK_META``: every task (``all``), the flagged ones
    (``flagged``: the tasks a reviewer opens; one PATCH per task is the only write Label Studio offers), none
    (``off``)."""
    return policy == "all" or (policy == "flagged" and needs_review)


def _prediction_part(written: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in written.items() if k != "meta"}


def _as_dict(task: TaskRecord) -> dict[str, Any]:
    return {"id": task.id, "data": task.data, "meta": task.meta, "annotations": task.annotations,
            "predictions": task.predictions}


def _our_prediction(task: dict | None, version: str) -> int | None:
    if not task:
        return None
    ids = [int(p["id"]) for p in task.get("predictions") or [] if p.get("model_version") == version]
    return max(ids) if ids else None
