"""Comparison mode in Label Studio: ``<Pairwise>`` projects (a prompt and two responses, pick the better one).

- ``/predict`` and the pre-annotation job ask the weak-LLM judge (:class:`backend.annotators.judge.PairwiseJudge`, both
  orders) about every pair of a request in one batch; the prediction selects the side the judge prefers,
  its score is the judge's confidence ``C = 2 |p_left - 1/2|``.
- ``ANNOTATION_CREATED/UPDATED`` store the annotation as a comparison at once, ``ANNOTATIONS_DELETED`` and
  ``TASKS_DELETED`` drop comparisons; each change queues a re-estimation job: the attentiveness EM
  (:class:`backend.annotators.attentiveness.PairwiseAttentiveness`) over every stored comparison, with the
  judge's ``p_left`` (kept from its predictions) as the prior of every judged task, which writes
  ``annotators.csv`` / ``annotators.json`` into the project's directory, the ``annotators_summary`` shown
  by ``/status``, and the ``hcc_low_quality_annotators`` task meta.
- ``TASKS_CREATED`` queues pre-annotation of the unlabelled tasks; ``START_TRAINING`` re-reads every
  annotation from Label Studio and re-estimates.

Result format, checked against Label Studio 1.23.2: a ``<Pairwise name="pw" toName="left,right">`` result
is ``{"from_name": "pw", "to_name": "pw", "type": "pairwise", "value": {"selected": "left"|"right"}}`` (the
labelling UI writes ``to_name`` = the control's own name). Label Studio's bulk prediction import
(``/api/projects/ID/import/predictions``) validates results and silently drops that shape ("created": 0),
so predictions are written one by one through ``/api/predictions``, which stores it as is.

Task data keys: the two responses come from the config's ``<Text>`` objects; the prompt and the two models'
names from ``prompt``, ``model_left`` and ``model_right`` (env ``HCC_PAIRWISE_PROMPT_KEY``,
``HCC_PAIRWISE_MODEL_LEFT_KEY``, ``HCC_PAIRWISE_MODEL_RIGHT_KEY``). ``HCC_PAIRWISE_REFERENCE`` names the
reference model A (default: the estimator's pick, the highest win rate); ``HCC_MIN_ANNOTATOR_QUALITY``
(default 0.5) is the quality below which an annotator is flagged.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.studio.client import StudioClient, StudioError, TaskRecord
from backend.studio.jobs import JobQueue, run_recorded
from backend.studio.labelconfig import LabelConfigError, PairwiseTarget, parse_label_config
from backend.studio.settings import Settings
from backend.studio.store import ProjectStore

log = logging.getLogger(__name__)

SIDES = ("left", "right")
META_KEY = "hcc_low_quality_annotators"
TABLE_FILE = "annotators.csv"
REPORT_FILE = "annotators.json"
TABLE_COLUMNS = ("worker_id", "n_labels", "quality")
SUMMARY_MAX_ANNOTATORS = 500  # /status lists at most this many; the files hold them all
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ENV_PROMPT_KEY = "HCC_PAIRWISE_PROMPT_KEY"
ENV_MODEL_LEFT_KEY = "HCC_PAIRWISE_MODEL_LEFT_KEY"
ENV_MODEL_RIGHT_KEY = "HCC_PAIRWISE_MODEL_RIGHT_KEY"
ENV_REFERENCE = "HCC_PAIRWISE_REFERENCE"
ENV_MIN_QUALITY = "HCC_MIN_ANNOTATOR_QUALITY"


# -- configuration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairwiseKeys:
    """Task data keys of the prompt and of the models behind the left and the right response."""

    prompt: str = "prompt"
    model_left: str = "model_left"
    model_right: str = "model_right"

    @classmethod
    def from_env(cls) -> PairwiseKeys:
        env = os.environ.get
        return cls(prompt=env(ENV_PROMPT_KEY, "") or cls.prompt,
                   model_left=env(ENV_MODEL_LEFT_KEY, "") or cls.model_left,
                   model_right=env(ENV_MODEL_RIGHT_KEY, "") or cls.model_right)


def min_quality_from_env() -> float:
    raw = os.environ.get(ENV_MIN_QUALITY, "").strip()
    if not raw:
        return 0.5
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_MIN_QUALITY} must be a number in [0, 1], got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{ENV_MIN_QUALITY} must be a number in [0, 1], got {raw!r}")
    return value


def require_pairwise_target(label_config: str, project_id: Any = "?") -> PairwiseTarget:
    """The project's ``<Pairwise>`` target, or ``LabelConfigError`` saying why there is none."""
    try:
        targets = parse_label_config(label_config)
    except LabelConfigError as exc:
        raise LabelConfigError(f"project {project_id}: {exc}") from None
    pairs = [t for t in targets if isinstance(t, PairwiseTarget)]
    if not pairs:
        raise LabelConfigError(f"project {project_id}: the labelling config has no <Pairwise> over two <Text> "
                               "objects, so it holds no comparisons")
    return pairs[0]


# -- Label Studio records ------------------------------------------------------------------------------------
class PairDataError(ValueError):
    """A task's data cannot be judged; the message names the task and the field."""


def _task_dict(task: Mapping[str, Any] | TaskRecord) -> Mapping[str, Any]:
    if isinstance(task, TaskRecord):
        return {"id": task.id, "data": task.data, "meta": task.meta, "annotations": task.annotations,
                "predictions": task.predictions}
    return task


def _user_id(value: Any) -> str:
    """``completed_by`` is a user id (webhooks, task lists) or a user object (single-task reads)."""
    if isinstance(value, Mapping):
        value = value.get("id", value.get("email"))
    return "" if value is None else str(value).strip()


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else "" if value is None else str(value)


def selection(annotation: Mapping[str, Any], target: PairwiseTarget) -> str | None:
    """``left``/``right`` chosen in a submitted annotation for ``target``; None when skipped or unselected."""
    if annotation.get("was_cancelled"):
        return None
    for region in annotation.get("result") or []:
        if not isinstance(region, Mapping) or region.get("from_name") != target.from_name:
            continue
        value = region.get("value") or {}
        selected = value.get("selected") if isinstance(value, Mapping) else None
        if selected in SIDES:
            return selected
    return None


def comparison_records(tasks: Iterable[Mapping[str, Any] | TaskRecord], target: PairwiseTarget,
                       keys: PairwiseKeys | None = None, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """One comparison record per submitted ``<Pairwise>`` choice, in the engine's field names.

    Each record has ``item_id`` (the task id), ``worker_id`` (``completed_by``), ``choice`` (``left``/
    ``right``), ``prompt``, ``response_left``, ``response_right``, ``model_left``, ``model_right`` (from the
    task data; "" when missing) and ``annotation_id``. Skipped annotations and annotations without a selection
    are not comparisons; an annotation without an annotator is left out and described in ``problems``.
    """
    keys = keys or PairwiseKeys()
    records = []
    for raw in tasks:
        task = _task_dict(raw)
        data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
        for annotation in task.get("annotations") or []:
            choice = selection(annotation, target)
            if choice is None:
                continue
            task_id = task.get("id", annotation.get("task"))
            worker = _user_id(annotation.get("completed_by"))
            if task_id is None:
                if problems is not None:
                    problems.append(f"annotation {annotation.get('id')}: no task id; left out")
                continue
            if not worker:
                if problems is not None:
                    problems.append(f"task {task.get('id')}, annotation {annotation.get('id')}: no annotator "
                                    "(completed_by); left out")
                continue
            records.append({
                "item_id": str(task_id), "worker_id": worker, "choice": choice,
                "prompt": _text(data, keys.prompt), "response_left": _text(data, target.left_key),
                "response_right": _text(data, target.right_key), "model_left": _text(data, keys.model_left),
                "model_right": _text(data, keys.model_right), "annotation_id": annotation.get("id"),
            })
    return records


def pair_texts(task: Mapping[str, Any], target: PairwiseTarget, keys: PairwiseKeys) -> tuple[str, str, str]:
    """(prompt, left, right) to judge, or ``PairDataError`` naming the task and the field.

    A missing prompt is judged as an empty one; a response must be a non-empty string.
    """
    task_id = task.get("id", "?")
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise PairDataError(f"task {task_id}: has no 'data' object")
    texts = []
    for key in (target.left_key, target.right_key):
        if key not in data or data[key] is None:
            raise PairDataError(f"task {task_id}: data field {key!r} (from <Text value=\"${key}\">) is missing")
        if not _is_text(data[key]):
            raise PairDataError(f"task {task_id}: data field {key!r} must be a string, got {type(data[key]).__name__}")
        text = str(data[key])  # Label Studio's <Text> shows numbers too
        if not text.strip():
            raise PairDataError(f"task {task_id}: data field {key!r} is empty")
        texts.append(text)
    prompt = data.get(keys.prompt)
    if prompt is not None and not _is_text(prompt):
        raise PairDataError(f"task {task_id}: data field {keys.prompt!r} (the prompt) must be a string, "
                            f"got {type(prompt).__name__}")
    return ("" if prompt is None else str(prompt)), texts[0], texts[1]


def _is_task_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def _is_text(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


# -- stored comparisons --------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairwise_comparisons (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    choice TEXT NOT NULL,
    prompt TEXT NOT NULL,
    model_left TEXT NOT NULL,
    model_right TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pairwise_comparisons_task ON pairwise_comparisons(task_id);
CREATE TABLE IF NOT EXISTS pairwise_judge (
    task_id INTEGER PRIMARY KEY,
    p_left REAL NOT NULL,
    updated REAL NOT NULL
);
"""
_FIELDS = ("task_id", "worker_id", "choice", "prompt", "model_left", "model_right")


class ComparisonStore:
    """The project's comparisons, one row per annotation, in a table of the project's ``state.sqlite``."""

    def __init__(self, store: ProjectStore) -> None:
        self.path = store.path  # the ProjectStore has created the file in WAL mode
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._local.db = db
        return db

    def _write(self, fn) -> Any:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    @staticmethod
    def _row(record: Mapping[str, Any]) -> tuple:
        return (int(record["item_id"]), str(record["worker_id"]), record["choice"], record.get("prompt") or "",
                record.get("model_left") or "", record.get("model_right") or "")

    def put(self, record: Mapping[str, Any]) -> bool:
        """Add or replace one annotation's comparison; returns whether anything changed."""
        annotation_id, row = int(record["annotation_id"]), self._row(record)

        def put(db: sqlite3.Connection) -> bool:
            old = db.execute(f"SELECT {', '.join(_FIELDS)} FROM pairwise_comparisons WHERE annotation_id = ?",
                             (annotation_id,)).fetchone()
            if old == row:
                return False
            db.execute("INSERT OR REPLACE INTO pairwise_comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (annotation_id, *row, time.time()))
            return True
        return self._write(put)

    def remove(self, annotation_ids: Iterable[int]) -> int:
        ids = [(int(i),) for i in annotation_ids]
        return self._write(lambda db: sum(db.execute("DELETE FROM pairwise_comparisons WHERE annotation_id = ?",
                                                     i).rowcount for i in ids))

    def remove_tasks(self, task_ids: Iterable[int]) -> int:
        ids = [(int(i),) for i in task_ids]

        def remove(db: sqlite3.Connection) -> int:
            db.executemany("DELETE FROM pairwise_judge WHERE task_id = ?", ids)
            return sum(db.execute("DELETE FROM pairwise_comparisons WHERE task_id = ?", i).rowcount for i in ids)
        return self._write(remove)

    def put_judge(self, p_left: Mapping[int, float]) -> None:
        """Keep the judge's P(left better) per task: the EM's prior for the task (the latest verdict wins)."""
        now = time.time()
        rows = [(int(task), float(p), now) for task, p in p_left.items()]
        self._write(lambda db: db.executemany("INSERT OR REPLACE INTO pairwise_judge VALUES (?, ?, ?)", rows))

    def judge(self, task_ids: Iterable[str]) -> dict[str, float]:
        """The stored P(left better) of these tasks (item ids as the records spell them), where there is one."""
        wanted = {int(t) for t in task_ids if str(t).isdigit()}
        rows = self._db().execute("SELECT task_id, p_left FROM pairwise_judge").fetchall()
        return {str(task): p for task, p in rows if task in wanted}

    def sync(self, records: Iterable[Mapping[str, Any]], *, listed_at: float) -> bool:
        """Make the table what Label Studio listed at ``listed_at``; rows written since (by a webhook that
        came in while the listing ran) are kept. Returns whether anything changed."""
        wanted = {int(r["annotation_id"]): self._row(r) for r in records if r.get("annotation_id") is not None}

        def sync(db: sqlite3.Connection) -> bool:
            rows = db.execute(f"SELECT annotation_id, {', '.join(_FIELDS)}, updated FROM pairwise_comparisons")
            current = {r[0]: (tuple(r[1:-1]), r[-1]) for r in rows}
            stale = [(a,) for a, (_, updated) in current.items() if a not in wanted and updated < listed_at]
            fresh = [(a, *row, time.time()) for a, row in wanted.items()
                     if a not in current or (current[a][0] != row and current[a][1] < listed_at)]
            db.executemany("DELETE FROM pairwise_comparisons WHERE annotation_id = ?", stale)
            db.executemany("INSERT OR REPLACE INTO pairwise_comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fresh)
            return bool(stale or fresh)
        return self._write(sync)

    def records(self) -> list[dict[str, Any]]:
        rows = self._db().execute(f"SELECT annotation_id, {', '.join(_FIELDS)} FROM pairwise_comparisons "
                                  "ORDER BY task_id, annotation_id")
        return [{"annotation_id": a, "item_id": str(t), "worker_id": w, "choice": c, "prompt": p,
                 "model_left": ml, "model_right": mr} for a, t, w, c, p, ml, mr in rows]


# -- annotator quality ---------------------------------------------------------------------------------------
def _meta_id(worker: str) -> int | str:
    """Label Studio user ids go into task meta as numbers."""
    return int(worker) if worker.isdigit() else worker


def estimate_annotators(records: list[Mapping[str, Any]], *, reference: str | None = None,
                        min_quality: float = 0.5, judge: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Fit the attentiveness EM on comparison records; a JSON-able report.

    ``judge``: item id -> the judge's P(left better), the prior of that item (``judged_items`` counts them).
    With one annotator per task the EM is otherwise only weakly identified and the flags stay silent
    (docs/comparison-mode.md, "Flagging careless annotators").

    ``annotators``: one entry per annotator (``worker_id``, ``n_labels``, ``quality`` = the posterior mean
    of ``eta``, ``quality_sd``, ``low_quality``); ``low_quality_annotators``: those below ``min_quality``;
    ``mu``, ``reference``, ``identifiability``, ``warnings`` (identifiability) and ``problems`` (dropped rows).
    Raises ``ValueError`` when no record is usable or the reference model is shown in no item.
    """
    from backend.annotators.preferences import fit_comparisons

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in est.warnings_, reported below
        est = fit_comparisons([{k: v for k, v in r.items() if k != "annotation_id"} for r in records],
                              judge=dict(judge or {}) or None, reference=reference or None)
    annotators = [
        {"worker_id": str(worker), "n_labels": int(est.n_labels_[worker]), "quality": round(float(eta), 6),
         "quality_sd": round(float(est.eta_sd_[worker]), 6), "low_quality": bool(eta < min_quality)}
        for worker, eta in est.eta_.items()
    ]
    annotators.sort(key=lambda a: (a["quality"], a["worker_id"]))
    return {
        "n_annotators": len(annotators), "n_comparisons": len(records), "n_used": int(est.n_labels_.sum()),
        "n_items": len(est.posteriors_), "reference": est.reference_, "mu": round(float(est.mu_), 6),
        "identifiability": est.identifiability_, "warnings": list(est.warnings_), "problems": list(est.problems_),
        "judged_items": len(judge or {}), "min_quality": min_quality,
        "low_quality_annotators": [_meta_id(a["worker_id"]) for a in annotators if a["low_quality"]],
        "annotators": annotators,
    }


def write_annotator_files(report: Mapping[str, Any], directory: Path) -> tuple[Path, Path]:
    """``annotators.csv`` (worker_id,n_labels,quality) and ``annotators.json`` (the report), replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    table, full = directory / TABLE_FILE, directory / REPORT_FILE
    tmp = table.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(TABLE_COLUMNS)
        for a in report["annotators"]:
            writer.writerow([a[c] for c in TABLE_COLUMNS])
    tmp.replace(table)
    tmp = full.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(full)
    return table, full


def low_quality_marks(records: Iterable[Mapping[str, Any]], low: Iterable[Any]) -> dict[str, list]:
    """task id -> the low-quality annotators among those who compared it (tasks without one left out)."""
    flagged = {str(w) for w in low}
    marks: dict[str, set] = {}
    for r in records:
        if str(r["worker_id"]) in flagged:
            marks.setdefault(str(r["item_id"]), set()).add(str(r["worker_id"]))
    return {task: sorted((_meta_id(w) for w in workers), key=str) for task, workers in marks.items()}


# -- the project model ---------------------------------------------------------------------------------------
def _empty(version: str, error: str) -> dict[str, Any]:
    return {"result": [], "score": 0.0, "model_version": version, "error": error}


class PairwiseProjectModel:
    """A ``<Pairwise>`` project: judge pre-annotations, stored comparisons, annotator quality."""

    kind = "pairwise"

    def __init__(self, project_id: int, target: PairwiseTarget, settings: Settings,
                 store: ProjectStore | None = None, client: Callable[[], StudioClient] | None = None) -> None:
        self.project_id = int(project_id)
        self._client = client
        self.target = target
        self.settings = settings
        self.keys = PairwiseKeys.from_env()
        self.reference = os.environ.get(ENV_REFERENCE, "").strip() or None
        self.min_quality = min_quality_from_env()
        self.store = store or ProjectStore(settings.project_dir(project_id))
        self.comparisons = ComparisonStore(self.store)
        self.store.set("kind", self.kind)
        self.judge = None
        if settings.llm_base_url:
            from backend.annotators.judge import PairwiseJudge

            self.judge = PairwiseJudge(
                base_url=settings.llm_base_url, model=settings.llm_model, api_key=settings.llm_api_key or None,
                cache_dir=settings.cache_dir / "llm", concurrency=settings.llm_concurrency,
                structured=settings.llm_structured,
                logprobs=settings.llm_logprobs is not False,  # the judge's confidence is read from them
            )

    # -- predictions -------------------------------------------------------------------------------
    def predict(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One Label Studio prediction per task; every judgeable pair is sent to the judge in one batch."""
        version = self.settings.model_version
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        todo: list[tuple[int, tuple[str, str, str]]] = []
        for i, task in enumerate(tasks):
            try:
                todo.append((i, pair_texts(task, self.target, self.keys)))
            except PairDataError as exc:
                results[i] = _empty(version, str(exc))
        if todo and self.judge is None:
            for i, _ in todo:
                results[i] = _empty(version, f"task {tasks[i].get('id', '?')}: no LLM judge is configured "
                                             "(set HCC_LLM_BASE_URL to pre-annotate comparisons)")
        elif todo:
            unique = list(dict.fromkeys(pair for _, pair in todo))  # a pair shown in several tasks is asked once
            verdicts = dict(zip(unique, self.judge.judge([p for p, _, _ in unique], [a for _, a, _ in unique],
                                                         [b for _, _, b in unique]), strict=True))
            for i, pair in todo:
                results[i] = self._prediction(tasks[i].get("id", "?"), verdicts[pair], version)
            self.comparisons.put_judge({int(tasks[i]["id"]): verdicts[pair].p_left for i, pair in todo
                                        if verdicts[pair].p_left is not None and _is_task_id(tasks[i].get("id"))})
        for result in results:
            if result and result.get("error"):
                log.warning("predict: %s", result["error"])
        return results  # type: ignore[return-value]

    def _prediction(self, task_id: Any, verdict, version: str) -> dict[str, Any]:
        if verdict.selected is None:
            if verdict.p_left is None:
                why = "; ".join(verdict.errors[:2]) or "no answer"
                return _empty(version, f"task {task_id}: the LLM judge gave no verdict ({why})")
            return _empty(version, f"task {task_id}: the LLM judge has no preference (p_left = {verdict.p_left})")
        result = [{"from_name": self.target.from_name, "to_name": self.target.from_name, "type": "pairwise",
                   "value": {"selected": verdict.selected}}]
        return {"result": result, "score": round(float(verdict.confidence), 6), "model_version": version}

    # -- webhook -----------------------------------------------------------------------------------
    def webhook(self, action: str | None, payload: dict[str, Any], jobs: JobQueue) -> dict[str, Any]:
        """Answer at once (Label Studio waits 1 s); the EM and the LLM run in background jobs."""
        try:
            return self._webhook(action, payload, jobs)
        except (TypeError, ValueError, AttributeError) as exc:  # ids that are not numbers, objects that are not
            log.warning("project %s: %s webhook ignored: %s", self.project_id, action, exc)
            return {"status": "ignored", "reason": f"malformed {action} payload: {exc}"}

    def _webhook(self, action: str | None, payload: dict[str, Any], jobs: JobQueue) -> dict[str, Any]:
        if action in ANNOTATION_EVENTS:
            annotation, task = payload.get("annotation") or {}, dict(payload.get("task") or {})
            if "id" not in annotation:
                return {"status": "ignored", "reason": "no annotation id"}
            task.setdefault("id", annotation.get("task"))
            problems: list[str] = []
            records = comparison_records([{**task, "annotations": [annotation]}], self.target, self.keys, problems)
            if records:
                changed = self.comparisons.put(records[0])
                result = {"status": "ok", "comparison": records[0]["choice"]}
            else:  # skipped, unselected, or no annotator: it must not stay a comparison
                changed = self.comparisons.remove([annotation["id"]]) > 0
                result = {"status": "ok", "comparison": None, **({"reason": problems[0]} if problems else {})}
            if changed:
                self.queue(jobs, "annotators")
            return {**result, "queued": changed}
        if action == "ANNOTATIONS_DELETED":
            ids = [a["id"] for a in payload.get("annotations") or [] if isinstance(a, Mapping) and "id" in a]
            removed = self.comparisons.remove(ids)
            if removed:
                self.queue(jobs, "annotators")
            return {"status": "ok", "comparisons_removed": removed}
        if action == "TASKS_DELETED":
            ids = [t["id"] for t in payload.get("tasks") or [] if isinstance(t, Mapping) and "id" in t]
            removed = self.comparisons.remove_tasks(ids)
            if removed:
                self.queue(jobs, "annotators")
            return {"status": "ok", "comparisons_removed": removed}
        if action == "TASKS_CREATED":
            if not self.settings.prelabel_on_import:
                return {"status": "ignored", "reason": "HCC_PRELABEL_ON_IMPORT is off"}
            return {"status": "queued" if self.queue(jobs, "prelabel") else "merged", "job": "prelabel"}
        if action == "START_TRAINING":
            return {"status": "queued" if self.queue(jobs, "sync") else "merged", "job": "sync"}
        return {"status": "ignored", "action": action}

    # -- jobs --------------------------------------------------------------------------------------
    def queue(self, jobs: JobQueue, kind: str) -> bool:
        def mark() -> None:
            if self.store.get("job", {}).get("state") != "running":  # a running job reports its own state
                self.store.update("job", queued=time.time(), state="queued", kind=kind, owner=jobs.owner)
        return jobs.submit(f"pairwise-{kind}:{self.project_id}", lambda: self.run_job(kind, owner=jobs.owner),
                           on_queued=mark)

    def client(self) -> StudioClient:
        """The Label Studio client of the backend's service (which knows the credentials /setup sent)."""
        if self._client is not None:  # the service's, which knows the credentials /setup sent
            return self._client()
        return StudioClient(self.settings.label_studio_url, self.settings.label_studio_api_key)

    def run_job(self, kind: str, *, owner: str | None = None) -> None:
        """``prelabel`` (judge the unlabelled tasks), ``sync`` (re-read the annotations) or ``annotators``."""
        store = self.store

        def work() -> dict[str, Any]:
            if kind == "annotators":
                return self.reestimate(self.client)  # files and summary even when Label Studio is down
            return self.prelabel(self.client(), judge=kind == "prelabel")

        summary = run_recorded(store, kind, work, project_id=self.project_id, owner=owner,
                               expected=(StudioError, LabelConfigError, ValueError))
        if summary is not None:
            last = {**store.get("job", {}).get("last", {}), kind: summary}
            store.update("job", state="done", step="done", finished=time.time(), last=last)

    def prelabel(self, client: StudioClient, *, judge: bool = True) -> dict[str, Any]:
        """Re-read the project's annotations (Label Studio is the source of truth), judge the unlabelled
        tasks without our prediction, write the predictions and re-estimate when the comparisons changed."""
        self.store.update("job", step="reading tasks")
        listed_at = time.time()
        tasks = [dict(_task_dict(t)) for t in client.tasks(self.project_id)]
        problems: list[str] = []
        changed = self.comparisons.sync(comparison_records(tasks, self.target, self.keys, problems),
                                        listed_at=listed_at)
        summary: dict[str, Any] = {"tasks": len(tasks), "comparisons_changed": changed, "problems": problems[:20]}
        if judge:
            summary.update(self._prelabel_tasks(client, tasks))
        if changed or self.store.get("annotators_summary") is None:
            summary["annotators"] = self.reestimate(lambda: client)
        return summary

    def _prelabel_tasks(self, client: StudioClient, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        version = self.settings.model_version
        todo = [t for t in tasks if not t["annotations"]
                and not any(p.get("model_version") == version for p in t.get("predictions") or [])]
        if self.judge is None:
            return {"predictions_written": 0, "skipped": "no LLM judge is configured (HCC_LLM_BASE_URL)"}
        self.store.update("job", step="judging", done=0, total=len(todo))
        results = self.predict(todo) if todo else []
        new = [{"task": int(t["id"]), **{k: r[k] for k in ("result", "score", "model_version")}}
               for t, r in zip(todo, results, strict=True) if r["result"]]
        errors = [r["error"] for r in results if r.get("error")]
        self.store.update("job", step="writing predictions", done=0, total=len(new))
        create_predictions(client, new)
        if new:  # only now: Label Studio refuses a model_version no prediction carries yet
            client.set_model_version(self.project_id, version)
        return {"judged": len(todo), "predictions_written": len(new), "n_errors": len(errors), "errors": errors[:20]}

    def reestimate(self, client: Callable[[], StudioClient]) -> dict[str, Any]:
        """The EM over every stored comparison -> files, ``annotators_summary``, then task meta (``client()``)."""
        self.store.update("job", step="estimating annotator quality")
        records = self.comparisons.records()
        if records:
            try:
                report = estimate_annotators(records, reference=self.reference, min_quality=self.min_quality,
                                             judge=self.comparisons.judge(r["item_id"] for r in records))
            except ValueError as exc:  # e.g. HCC_PAIRWISE_REFERENCE names a model no task shows
                self.store.update("annotators_summary", error=str(exc), n_comparisons=len(records),
                                  updated=time.time())
                raise
        else:
            report = {"n_annotators": 0, "n_comparisons": 0, "n_used": 0, "n_items": 0, "reference": None,
                      "mu": None, "identifiability": None, "warnings": [], "problems": [], "judged_items": 0,
                      "min_quality": self.min_quality, "low_quality_annotators": [], "annotators": []}
        report = {"project": self.project_id, "updated": time.time(), "error": None, **report}
        table, full = write_annotator_files(report, self.store.directory)
        summary = {k: v for k, v in report.items() if k != "annotators"}
        summary.update(table=str(table), report=str(full), annotators=report["annotators"][:SUMMARY_MAX_ANNOTATORS],
                       annotators_listed=min(len(report["annotators"]), SUMMARY_MAX_ANNOTATORS))
        self.store.set("annotators_summary", summary)
        marked = self._write_marks(client(), low_quality_marks(records, report["low_quality_annotators"]))
        return {"annotators": report["n_annotators"], "comparisons": report["n_comparisons"],
                "low_quality": len(report["low_quality_annotators"]), "tasks_marked": marked}

    def _write_marks(self, client: StudioClient, marks: dict[str, list]) -> int:
        """Write the changed ``hcc_low_quality_annotators`` meta (``[]`` where it no longer holds)."""
        before: dict[str, list] = self.store.get("low_quality_marks", {})
        changes = {int(t): {META_KEY: marks.get(t, [])} for t in set(before) | set(marks)
                   if before.get(t, []) != marks.get(t, [])}
        self.store.update("job", step="writing task meta", done=0, total=len(changes))
        try:
            client.update_meta(changes, merge=True)  # keep the other meta keys
        except StudioError:  # one by one, so that a task deleted meanwhile does not block the others
            for task_id, meta in changes.items():
                try:
                    client.update_meta({task_id: meta}, merge=True)
                except StudioError as exc:
                    if getattr(exc.__cause__, "status_code", None) != 404:
                        raise
                    log.info("project %s: task %s is gone; its meta is not written", self.project_id, task_id)
        self.store.set("low_quality_marks", marks)
        return sum(bool(marks.get(str(t))) for t in changes)


def create_predictions(client: StudioClient, predictions: list[dict[str, Any]]) -> None:
    """Create predictions one by one through ``/api/predictions`` (``StudioClient.create_predictions``: each at
    most once, whatever happens to an answer).

    Not ``client.import_predictions``: Label Studio 1.23.2's bulk import validates each result with the SDK's
    LabelInterface, which wants ``to_name`` to be an object tag, and silently drops the ``<Pairwise>`` shape
    the labelling UI itself writes (``to_name`` = the control's name) with ``{"created": 0}``.
    """
    client.create_predictions(predictions)
