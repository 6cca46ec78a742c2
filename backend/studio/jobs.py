"""Background jobs: Label Studio's webhooks must be answered within 1 s, the work takes minutes.

One worker thread per process runs jobs in order. A job asked for while the same job of the same project
is still waiting is merged into it (both want the project brought up to date), never dropped; a job asked
for while it runs is queued behind it. Jobs of one project never overlap, even across gunicorn workers:
each holds an exclusive file lock in the project's directory while it runs.
"""

from __future__ import annotations

import fcntl
import logging
import queue
import threading
import time
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


class JobQueue:
    """A single background worker with merging of identical waiting jobs."""

    def __init__(self, name: str = "hcc-jobs") -> None:
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
                 expected: tuple[type[Exception], ...] = ()) -> dict[str, Any] | None:
    """Run one project job under the project lock, recording its state in ``store`` (kv ``job``) for /status.

    ``expected`` errors (Label Studio unreachable, a bad config...) are logged as one line; anything else
    with its traceback. Returns the job's summary (with ``seconds``), or None when it failed.
    """
    with project_lock(store.directory):
        started = time.time()
        store.update("job", state="running", kind=kind, started=started, done=0, total=0, step="starting",
                     error=None)
        try:
            summary = work()
        except expected as exc:
            log.error("%s job of project %s failed: %s", kind, project_id, exc)
            store.update("job", state="failed", error=str(exc), finished=time.time())
            return None
        except Exception as exc:
            log.exception("%s job of project %s failed", kind, project_id)
            store.update("job", state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
            return None
        summary["seconds"] = round(time.time() - started, 2)
        log.info("project %s: %s done %s", project_id, kind, summary)
        return summary
