"""On-disk cache of LLM responses, keyed by model, messages and request parameters.

SQLite in WAL mode, shared by every thread and every process (gunicorn workers, the CLI) that uses the same
cache directory: each write is one transaction, so a reader sees an answer whole or not at all. Each thread
of each process has its own connection; a connection is never used in a process forked after it was opened
(SQLite forbids it: its file locks belong to the process that took them). ``synchronous=NORMAL``: in WAL
mode a crash may lose the last answers, never the file, and a write no longer waits for the disk (measured
in docs/benchmarks.md: 100-130 writes/s from 10 threads with the default FULL, 1,400-3,500 with NORMAL on a
busy machine; at 100 LLM answers/s the FULL cache was the bottleneck). A cache that is busy beyond the
timeout (another process holds a long write) or unreadable costs a miss or an unsaved answer and a warning,
never the answer itself. Two workers that miss the same key at once both ask the LLM; the second write
replaces the first with an equal answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_BUSY_TIMEOUT = 30.0  # seconds a statement waits for another process's write lock


def request_key(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class ResponseCache:
    """A key -> JSON value store. ``path=None`` keeps entries in memory only."""

    def __init__(self, path: str | Path | None, *, timeout: float = _BUSY_TIMEOUT) -> None:
        self.path = Path(path) if path else None
        self.timeout = timeout
        self._local = threading.local()
        self._memory: dict[str, Any] = {}
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._run("open", lambda conn: conn)

    def _connect(self) -> sqlite3.Connection:
        # Keyed by process id too: after a fork the child's thread-local still holds the parent's connection.
        owner = (os.getpid(), getattr(self._local, "pid", None))
        conn = getattr(self._local, "conn", None)
        if conn is None or owner[0] != owner[1]:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            self._prepare(conn)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the table, retried while other processes open the same fresh file.

        Processes that switch a new file to WAL at the same moment can deadlock on its locks; SQLite then
        answers "database is locked" at once instead of waiting out the busy timeout (measured: 4% of six
        processes opening one fresh file together), so the wait is ours.
        """
        deadline, pause = time.monotonic() + self.timeout, 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    conn.close()
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 0.25)

    def _run(self, action: str, statement) -> Any:
        """``statement(connection)``; None (and a warning) when the database is busy or broken."""
        try:
            return statement(self._connect())
        except sqlite3.Error as exc:
            log.warning("LLM answer cache %s: %s skipped (%s: %s)", self.path, action, type(exc).__name__, exc)
            return None

    def get(self, key: str) -> Any | None:
        if not self.path:
            return self._memory.get(key)
        row = self._run("read", lambda conn: conn.execute(
            "SELECT value FROM responses WHERE key = ?", (key,)).fetchone())
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except (TypeError, ValueError):  # a value no version of this code writes: ask again
            return None

    def put(self, key: str, value: Any) -> bool:
        """Store one answer; whether it was stored."""
        if not self.path:
            self._memory[key] = value
            return True
        blob = json.dumps(value)
        done = self._run("write", lambda conn: conn.execute(
            "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, blob)))
        return done is not None
