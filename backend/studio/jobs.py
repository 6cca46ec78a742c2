"""Background jobs: Label Studio's webhooks must be answered within 1 s, the work takes minutes.

One worker thread per process runs jobs in order. A job asked for while the same job of the same project
is still waiting is merged into it (both want the project brought up to date), never dropped; a job asked
for while it runs is queued behind it. Jobs of one project never overlap, even across gunicorn workers:
each holds an exclusive file lock in the project's directory while it runs.

Jobs are durable: a queued or running job is recorded in the project's store with the *lease* of the process
that owns it (:class:`ProcessLease`, a file lock held for the process's lifetime). A process that starts
finds the jobs whose owner is gone (killed, crashed, redeployed) and queues them again
(:func:`orphaned`); the jobs are idempotent (what was written is remembered, or found in Label Studio), so a
resumed job finishes the work without writing anything twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def project_lock(directory: Path, name: str = "job"):
    """An exclusive lock on ``directory/<name>.lock``, held across processes (gunicorn workers)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ProcessLease:
    """Proof that this process is alive, for other processes: an exclusive lock on
    ``<directory>/<id>.lock`` held until the process ends (the kernel releases it on ``kill -9`` too)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._handle = open(self.directory / f"{self.id}.lock", "w")  # noqa: SIM115 (held for the lifetime)
        fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def alive(self, owner: str | None) -> bool:
        """Whether the process holding lease ``owner`` still runs (this one always does)."""
        if not owner:
            return False
        if owner == self.id:
            return True
        path = self.directory / f"{Path(owner).name}.lock"
        try:
            handle = open(path)  # noqa: SIM115
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        path.unlink(missing_ok=True)  # its process is gone: nothing will hold this lock again
        return False


MAX_RESUMES = 3  # a job interrupted this many times in a row (say, it kills the process) is marked failed


def orphaned(state: dict[str, Any], lease: ProcessLease) -> bool:
    """Whether a job recorded as ``state`` (kv ``job`` or ``training``) was queued or running in a process
    that is gone."""
    return state.get("state") in ("queued", "running", "waiting") and not lease.alive(state.get("owner"))


class JobQueue:
    """A single background worker with merging of identical waiting jobs."""

    def __init__(self, name: str = "hcc-jobs", *, owner: str | None = None) -> None:
        self.owner = owner  # the lease id of this process, recorded with the jobs it queues
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, job: Callable[[], None], *, on_queued: Callable[[], None] | None = None) -> bool:
        """Queue ``job`` under ``key``; returns False when an identical job is already waiting.

        ``on_queued`` runs before the job can start (e.g. to record a "queued" status the job then overwrites).
        """
        with self._lock:
            if key in self._waiting:
                return False
            if on_queued is not None:
                # Before registering the key: if it raises, nothing is left waiting for a job never queued
                # (every later submit of the key would be merged into it and wait_idle would never return).
                on_queued()
            self._waiting.add(key)
            self._idle.clear()
        self._queue.put((key, job))
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)

    def waiting(self, key: str) -> bool:
        """Whether the job ``key`` is queued and has not started yet."""
        with self._lock:
            return key in self._waiting

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, job = item
            with self._lock:
                self._waiting.discard(key)  # a new request from now on must run again after this one
            try:
                job()
            except Exception:  # a failed job is logged and recorded by the job itself; the worker lives on
                log.exception("background job %s failed", key)
            finally:
                with self._lock:
                    if not self._waiting:
                        self._idle.set()


def run_recorded(store, kind: str, work: Callable[[], dict[str, Any]], *, project_id: int,
                 expected: tuple[type[Exception], ...] = (), owner: str | None = None,
                 retryable: Callable[[Exception], bool] = lambda exc: False, retries: int = 0,
                 retry_seconds: float = 10.0) -> dict[str, Any] | None:
    """Run one project job under the project lock, recording its state in ``store`` (kv ``job``) for /status.

    ``expected`` errors (Label Studio unreachable, a bad config...) are logged as one line; anything else
    with its traceback. An expected error that is ``retryable`` (Label Studio down, 5xx) runs the job again
    after ``retry_seconds``, doubling up to 5 min, at most ``retries`` times; meanwhile the state is
    ``waiting`` with the error and the time of the next attempt. Returns the job's summary (with
    ``seconds``), or None when it failed.
    """
    with project_lock(store.directory):
        started = time.time()
        previous = store.get("job", {})
        resumes = previous.get("resumes", 0) if previous.get("resumed") else 0
        store.update("job", state="running", kind=kind, started=started, done=0, total=0, step="starting",
                     error=None, owner=owner, attempt=0, retry_at=None)
        attempt = 0
        while True:
            try:
                summary = work()
                break
            except expected as exc:
                if attempt < retries and retryable(exc):
                    delay = min(retry_seconds * 2 ** attempt, 300.0)
                    attempt += 1
                    log.warning("%s job of project %s: %s; attempt %d of %d in %.0f s", kind, project_id, exc,
                                attempt + 1, retries + 1, delay)
                    store.update("job", state="waiting", error=str(exc), attempt=attempt,
                                 retry_at=time.time() + delay)
                    time.sleep(delay)
                    store.update("job", state="running", step="starting", error=None, retry_at=None)
                    continue
                log.error("%s job of project %s failed: %s", kind, project_id, exc)
                store.update("job", state="failed", error=str(exc), finished=time.time())
                return None
            except Exception as exc:
                log.exception("%s job of project %s failed", kind, project_id)
                store.update("job", state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
                return None
        summary["seconds"] = round(time.time() - started, 2)
        if resumes:
            summary["resumed_after_restart"] = resumes
        store.update("job", resumed=False, resumes=0)
        log.info("project %s: %s done %s", project_id, kind, summary)
        return summary
