"""The calls this backend makes to Label Studio, through label-studio-sdk.

Everything Label Studio-specific about reading tasks and annotations and writing predictions, task meta,
the project's ``model_version`` and the review tab lives here, so the rest of the layer deals in plain
records. Secrets (the API key) are never logged or put into error messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REVIEW_TAB_TITLE = "Needs review"
PAGE_SIZE = 500
# Predictions per bulk import call at most. Label Studio 1.23.2 recounts every task of the project after each
# call (unless its memory-efficient import flag is on): measured on its SQLite server, 16 s at 25,000 tasks and
# 40 s at 50,000 whatever the call's size (bench/studio_writes.py), so a chunk goes as one call. ~200 bytes per
# prediction: a proxy's smaller body cap (nginx's is 1 MB) answers 413, and the client then keeps to the size
# that went through.
WRITE_BATCH = 20000
# The least time an import call is given before its answer counts as lost (that cost is minutes at 100,000
# predictions). A lost answer is read back before anything is sent again, so a timeout never duplicates a
# prediction, but it costs a round.
IMPORT_TIMEOUT = 600.0
# What a read-back of prediction ids asks for: Label Studio then skips every other data-manager column
# (annotators, agreement, counts...), 3x faster on its SQLite server. (With ``include``, annotations come as
# bare ids, so the full listing that reads the anchors cannot use it.)
PREDICTIONS_ONLY = "id,predictions"
# What the listing of a whole project asks for first: everything but the annotations, which then come in full
# for the tasks that have any (measured, 5,250 tasks of which 250 annotated: 8.3 s + 3.0 s against 37.8 s for
# one listing with every column). ``total_annotations`` counts submitted, not skipped, annotations.
WITHOUT_ANNOTATIONS = "id,data,meta,predictions,total_annotations"
# Task ids per filtered listing: they travel in the query string, which proxies cap at 4-8 KB.
IDS_PER_QUERY = 300
# One bulk import of a batch, then up to this many read-back-and-import rounds for a batch whose answer was lost.
IMPORT_RETRIES = 3
# The bulk import is not idempotent, so the SDK must not repeat it blind (see ``import_predictions``).
NO_RETRY: dict[str, Any] = {"max_retries": 0}


class StudioError(RuntimeError):
    """Label Studio could not be reached or refused a call; the message says which and why.

    ``retryable``: the same call may succeed later (Label Studio unreachable, timing out, 429 or 5xx), as
    opposed to a refusal that needs a person (a rejected key, a missing project).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class TaskRecord:
    """A task as the backend needs it."""

    id: int
    data: dict[str, Any]
    meta: dict[str, Any]
    annotations: list[dict[str, Any]]  # submitted, not skipped
    predictions: list[dict[str, Any]]


def _explain(exc: Exception, url: str, what: str) -> StudioError:
    status = getattr(exc, "status_code", None)
    if status in (401, 403):
        body = getattr(exc, "body", None)
        detail = str(body.get("detail", ""))[:200] if isinstance(body, dict) else ""  # e.g. "API key has expired"
        return StudioError(
            f"Label Studio at {url} rejected LABEL_STUDIO_API_KEY ({status}{': ' + detail if detail else ''}) while "
            f"trying to {what}: use a legacy token or a personal access token of a user with access to the project"
        )
    if status is not None:
        body = getattr(exc, "body", None)
        return StudioError(f"Label Studio at {url} answered {status} while trying to {what}: {str(body)[:300]}",
                           retryable=status == 429 or status >= 500)
    return StudioError(f"cannot reach Label Studio at {url} to {what}: {type(exc).__name__}: {exc}", retryable=True)


class StudioClient:
    """A thin wrapper over ``label_studio_sdk.LabelStudio`` for one Label Studio instance."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 30.0, concurrency: int = 4,
                 import_timeout: float | None = None) -> None:
        if not url:
            raise StudioError("LABEL_STUDIO_URL is not set: the backend needs it to write predictions")
        if not api_key:
            raise StudioError("LABEL_STUDIO_API_KEY is not set: the backend needs it to write predictions")
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.concurrency = concurrency
        # The most predictions per import call a proxy let through, once one refused a larger body (413).
        self.body_cap: int | None = None
        # (predictions, seconds) of each import call, for the pre-label's chunk sizes.
        self.import_calls: list[tuple[int, float]] = []
        # (predictions, seconds) of each create_predictions (single creates, ``concurrency`` at a time).
        self.create_calls: list[tuple[int, float]] = []
        self.import_timeout = import_timeout if import_timeout is not None else max(timeout, IMPORT_TIMEOUT)
        # The SDK checks a personal access token (a JWT) as it is built: an expired one raises here, and must
        # be the same clear StudioError as any other refusal, not an exception of the SDK's own.
        self._sdk = self._call("use LABEL_STUDIO_API_KEY", LabelStudio, base_url=self.url, api_key=api_key,
                               timeout=timeout)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the SDK raises ApiError, httpx errors, and JWT refresh errors
            raise _explain(exc, self.url, what) from exc

    # -- reads -------------------------------------------------------------------------------------
    def whoami(self) -> str:
        user = self._call("check the API key", self._sdk.users.whoami)
        return getattr(user, "email", None) or getattr(user, "username", "?")

    def project(self, project_id: int) -> dict[str, Any]:
        p = self._call(f"read project {project_id}", self._sdk.projects.get, id=project_id)
        return {"id": p.id, "title": p.title, "label_config": p.label_config, "model_version": p.model_version or ""}

    def tasks(self, project_id: int, ids: Collection[int] | None = None, *,
              include: str | None = None) -> Iterator[TaskRecord]:
        """Every task of the project (or only those of ``ids``) with its annotations and predictions; with
        ``include`` (Label Studio's field list, e.g. :data:`PREDICTIONS_ONLY`) only those fields."""
        if ids is None:
            yield from (self._listed(project_id, None, include) if include else self._every_task(project_id))
            return
        ordered = sorted(set(ids))
        for start in range(0, len(ordered), IDS_PER_QUERY):
            selected = {"selectedItems": {"all": False, "included": ordered[start:start + IDS_PER_QUERY]}}
            yield from self._listed(project_id, json.dumps(selected), include)

    def _every_task(self, project_id: int) -> Iterator[TaskRecord]:
        """The whole project in two passes: every task without its annotations, then the annotated ones in full.

        A task whose count of annotations is missing from the first pass is read in full too, so that a Label
        Studio that leaves the field out costs time, never an anchor."""
        light, annotated = [], []
        for task in self._listed(project_id, None, WITHOUT_ANNOTATIONS, raw=True):
            light.append(task)
            if task.get("total_annotations") != 0:
                annotated.append(int(task["id"]))
        full = {t.id: t for t in self.tasks(project_id, annotated)} if annotated else {}
        for task in light:
            yield full.get(int(task["id"])) or _task_record(task)

    def _listed(self, project_id: int, query: str | None, include: str | None, *,
                raw: bool = False) -> Iterator[Any]:
        what = f"list the tasks of project {project_id}"
        pager = self._call(what, self._sdk.tasks.list, project=project_id, fields="all", include=include,
                           page_size=PAGE_SIZE, query=query)
        try:
            for task in pager:
                yield task.model_dump() if raw else _task_record(task.model_dump())
        except Exception as exc:
            raise _explain(exc, self.url, what) from exc

    # -- writes ------------------------------------------------------------------------------------
    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> None:
        """Create predictions in batches, at most one per task and model version whatever happens to a batch.

        The bulk import is not idempotent: a proxy answering 502 (or a connection dropped, or a timeout) after
        Label Studio committed a batch looks like a failure, and the SDK's automatic retry would import the batch
        a second time. So the import goes without the SDK's retries; after a failure that may have been lost in
        transit, we read back which tasks of the batch now have a prediction of their version and send only the
        others, a bounded number of times with growing pauses. A refusal (400, 401, 404) is raised at once.
        The PATCHes and reads elsewhere are idempotent and keep the SDK's retries.
        """
        start = 0
        while start < len(predictions):
            # Read before each call: a 413 in the last one lowered it.
            batch = min(WRITE_BATCH, self.body_cap or WRITE_BATCH)
            self._import_batch(project_id, predictions[start:start + batch])
            start += batch

    import_backoff = 1.0  # seconds before the first read-back of a failed batch, doubled each round (tests shorten it)

    def _import_batch(self, project_id: int, batch: list[dict[str, Any]]) -> None:
        """One import call; a body refused as too large (413: a proxy's cap, nginx's is 1 MB by default, about
        5,000 predictions) goes again in halves. A 413 is answered before anything is stored."""
        try:
            self._send_one_import(project_id, batch)
        except StudioError as exc:
            if getattr(exc.__cause__, "status_code", None) != 413 or len(batch) < 2:
                raise
            half = len(batch) // 2
            self.body_cap = min(half, self.body_cap or half)
            log.warning("project %s: %d predictions in one call are too large for Label Studio or its proxy "
                        "(413); sending them in two calls", project_id, len(batch))
            self._import_batch(project_id, batch[:half])
            self._import_batch(project_id, batch[half:])

    def _send_one_import(self, project_id: int, batch: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        self._send_missing(f"write {len(batch)} predictions to project {project_id}", batch,
                           lambda pending: self._sdk.projects.import_predictions(
                               id=project_id, request=pending,
                               request_options={**NO_RETRY, "timeout": self.import_timeout}))
        self.import_calls.append((len(batch), time.perf_counter() - started))

    def create_predictions(self, predictions: list[dict[str, Any]]) -> dict[int, int]:
        """Create predictions one by one (concurrently) through ``/api/predictions``, each at most once (a lost
        answer is read back like a bulk import's); returns task id -> the id of each prediction whose answer
        came (a task whose answer was lost is missing: read its id back). Each call costs its own prediction,
        with none of the bulk import's per-call recount of the project."""
        created: dict[int, int] = {}

        def one(pred: dict[str, Any]) -> None:
            def send(pending: list[dict[str, Any]]) -> None:
                for p in pending:
                    answer = self._sdk.predictions.create(task=p["task"], result=p["result"], score=p["score"],
                                                          model_version=p["model_version"],
                                                          request_options=NO_RETRY)
                    if getattr(answer, "id", None) is not None:
                        created[int(p["task"])] = int(answer.id)
            self._send_missing(f"write the prediction of task {pred['task']}", [pred], send)
        started = time.perf_counter()
        self._parallel(one, predictions)
        if predictions:
            self.create_calls.append((len(predictions), time.perf_counter() - started))
        return created

    def _send_missing(self, what: str, batch: list[dict[str, Any]], send: Callable[[list[dict[str, Any]]], Any],
                      ) -> None:
        """``send`` the predictions of ``batch`` without the SDK's blind retries; after a failure whose answer may
        have been lost, read back which of them Label Studio stored and send only the others (bounded)."""
        pending = batch
        error: StudioError | None = None
        for attempt in range(IMPORT_RETRIES + 1):
            if attempt:
                # Pause first: after a timeout Label Studio may still be committing the batch we read back.
                time.sleep(self.import_backoff * 2 ** (attempt - 1))
                try:
                    pending = self._without_prediction(batch)
                except StudioError as exc:
                    error = exc
                    continue
                if not pending:
                    return
            try:
                send(pending)
                return
            except Exception as exc:
                error = _explain(exc, self.url, what)
                error.__cause__ = exc
                if not _maybe_lost(exc):
                    raise error from exc
                log.warning("%s (attempt %d of %d); reading back what Label Studio stored", error, attempt + 1,
                            IMPORT_RETRIES + 1)
        assert error is not None
        raise error

    def _without_prediction(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The predictions of ``batch`` whose task has no prediction of their model version in Label Studio."""
        def stored(task_id: int) -> set[str]:
            preds = self._call(f"list the predictions of task {task_id}", self._sdk.predictions.list, task=task_id)
            return {p.model_version or "" for p in preds}
        task_ids = sorted({int(p["task"]) for p in batch})
        versions = dict(zip(task_ids, self._parallel(stored, task_ids), strict=True))
        return [p for p in batch if (p.get("model_version") or "") not in versions[int(p["task"])]]

    def prediction_ids(self, project_id: int, model_version: str, *, keep: Collection[int] = (),
                       tasks: Collection[int] | None = None) -> dict[int, int]:
        """task id -> id of its prediction with this model version, over the project's tasks or those of
        ``tasks`` (a chunk just written: its read-back then costs the chunk, not the project); surplus
        predictions of that version are deleted.

        A task should have one prediction per model version; more come from a bulk import whose lost answer was
        retried (by an older backend, or by ours after a timeout while Label Studio was still committing). Since
        the backend reads every id here anyway, it repairs them: of a task's predictions of this version it keeps
        the one in ``keep`` (the ids the caller tracks), else the newest, which is the one the readers pick.
        """
        ids: dict[int, int] = {}
        surplus: list[int] = []
        for task in self.tasks(project_id, tasks, include=PREDICTIONS_ONLY):
            mine = sorted(int(p["id"]) for p in task.predictions if p.get("model_version") == model_version)
            if mine:
                kept = max((i for i in mine if i in keep), default=mine[-1])
                ids[task.id] = kept
                surplus += [i for i in mine if i != kept]
        if surplus:
            log.warning("project %s: deleting %d duplicate predictions of model version %s", project_id,
                        len(surplus), model_version)
            self.delete_predictions(surplus)
        return ids

    def prediction_id(self, task_id: int, model_version: str) -> int | None:
        """Id of the task's latest prediction with this model version, if any."""
        preds = self._call(f"list the predictions of task {task_id}", self._sdk.predictions.list, task=task_id)
        ids = [int(p.id) for p in preds if p.model_version == model_version]
        return max(ids) if ids else None

    def update_predictions(self, updates: dict[int, dict[str, Any]]) -> None:
        """prediction id -> {result, score}; sent concurrently."""
        def one(item):
            pid, pred = item
            self._call(f"update prediction {pid}", self._sdk.predictions.update, id=pid,
                       result=pred["result"], score=pred["score"])
        self._parallel(one, list(updates.items()))

    def delete_predictions(self, prediction_ids: list[int]) -> None:
        """Delete predictions by id, concurrently; one already gone is not an error."""
        def one(pid):
            try:
                self._sdk.predictions.delete(id=pid)
            except Exception as exc:
                if getattr(exc, "status_code", None) == 404:
                    return
                raise _explain(exc, self.url, f"delete prediction {pid}") from exc
        self._parallel(one, list(prediction_ids))

    def update_meta(self, metas: dict[int, dict[str, Any]], *, merge: bool = False,
                    owned: Iterable[str] = ()) -> None:
        """task id -> the task's new meta; sent concurrently.

        With ``merge`` the meta is merged into the task's meta as it is right before the write (Label Studio's
        PATCH replaces ``meta`` whole, so a key someone set since any earlier listing would otherwise be lost):
        the given keys win, the ``owned`` keys (the writer's own) are taken from the given meta only, so one it
        no longer writes is removed rather than kept, and every other key stays. A task whose meta would not
        change is not written.
        """
        owned = frozenset(owned)

        def one(item: tuple[int, dict[str, Any]]) -> None:
            task_id, meta = item
            if merge:
                current = self._call(f"read task {task_id}", self._sdk.tasks.get, id=str(task_id)).meta or {}
                meta = {**{k: v for k, v in current.items() if k not in owned}, **meta}
                if meta == current:
                    return
            self._call(f"update the meta of task {task_id}", self._sdk.tasks.update, id=str(task_id), meta=meta)
        self._parallel(one, list(metas.items()))

    def set_model_version(self, project_id: int, model_version: str) -> None:
        self._call(f"set model_version of project {project_id}", self._sdk.projects.update,
                   id=project_id, model_version=model_version)

    def ensure_review_tab(self, project_id: int, *, threshold: float) -> int:
        """Create the review tab once (or fix its filter); returns its id."""
        data = {
            "title": REVIEW_TAB_TITLE,
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
                {"filter": "filter:tasks:predictions_score", "operator": "less", "type": "Number", "value": threshold},
            ]},
            "ordering": ["tasks:predictions_score"],
        }
        views = self._call(f"list the tabs of project {project_id}", self._sdk.views.list, project=project_id)
        for view in views:
            if isinstance(view.data, dict) and view.data.get("title") == REVIEW_TAB_TITLE:
                if view.data.get("filters") != data["filters"]:
                    self._call("update the review tab", self._sdk.views.update, id=str(view.id), data=data)
                return int(view.id)
        try:  # without the SDK's blind retry: a lost answer must not make a second tab
            view = self._sdk.views.create(project=project_id, data=data, request_options=NO_RETRY)
        except Exception as exc:
            if not _maybe_lost(exc):
                raise _explain(exc, self.url, f"create the review tab of project {project_id}") from exc
            time.sleep(self.import_backoff)
            views = self._call(f"list the tabs of project {project_id}", self._sdk.views.list, project=project_id)
            found = [v for v in views if isinstance(v.data, dict) and v.data.get("title") == REVIEW_TAB_TITLE]
            if found:
                return int(found[0].id)
            view = self._call(f"create the review tab of project {project_id}", self._sdk.views.create,
                              project=project_id, data=data, request_options=NO_RETRY)
        return int(view.id)

    def _parallel(self, fn: Callable[[Any], Any], items: list) -> list:
        """``fn`` over ``items``, ``concurrency`` at a time; their results in order."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))


def _maybe_lost(exc: Exception) -> bool:
    """Whether a failed write may have been committed or may succeed later: no answer (a dropped connection, a
    timeout), a 5xx (e.g. a proxy's 502 after Label Studio answered), 408, 409 or 429. Not a refusal."""
    status = getattr(exc, "status_code", None)
    return status is None or status >= 500 or status in (408, 409, 429)


def _task_record(task: dict[str, Any]) -> TaskRecord:
    annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return TaskRecord(id=int(task["id"]), data=task.get("data") or {}, meta=task.get("meta") or {},
                      annotations=annotations, predictions=task.get("predictions") or [])
