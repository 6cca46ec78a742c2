"""Per-project state under ``MODEL_DIR``: anchors, the last HCC record of every task, settings, job status.

One SQLite file per project (WAL mode, busy timeout) so several gunicorn workers and the background job
threads can read and write at once without losing a write. Every change to the anchors bumps a revision
counter; a worker compares it with the revision its in-memory index was built from. Items carry the revision
of the write that last changed them, so a worker reads only the records changed since it last looked.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS anchors_task ON anchors(task_id);
CREATE TABLE IF NOT EXISTS items (
    task_id INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    prediction_id INTEGER,
    written TEXT,
    updated REAL NOT NULL,
    rev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS removed_anchors (annotation_id INTEGER PRIMARY KEY, removed REAL NOT NULL);
"""


_TIMEOUT = 30.0  # seconds a connection waits for another worker's write lock
_TOMBSTONE_SECONDS = 86400.0  # removed anchors are remembered this long (far longer than any task listing)


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the connection to WAL mode, waiting for other processes like every other statement does.

    SQLite answers this pragma "database is locked" at once, without the busy timeout, while another process
    opens or writes the file: two gunicorn workers touching one project at the same moment would fail a request.
    """
    deadline = time.monotonic() + _TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _timestamp(value: str) -> float:
    """Seconds since the epoch of an ISO 8601 time as Label Studio writes it (``...Z`` or ``+00:00``); an
    unreadable one counts as the oldest, so it never hides a readable newer event."""
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return float("-inf")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


@dataclass(frozen=True)
class ItemChanges:
    """What :meth:`ProjectStore.items_since` read."""

    revision: int  # the items revision of the snapshot: the next call's ``revision``
    deletions: int  # a count of deletions so far: when it changed, rows are gone that no change reports
    rows: dict[int, dict[str, Any]]  # task id -> the asked fields of its record


@dataclass(frozen=True)
class Anchor:
    annotation_id: int
    task_id: int
    text: str
    label: str


class ProjectStore:
    """The state of one Label Studio project, in ``<MODEL_DIR>/projects/<id>/state.sqlite``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "state.sqlite"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)  # executescript commits on its own: not inside _tx
        self._add_column("anchors", "source_updated", "TEXT")  # stores from before anchors kept updated_at
        self._add_column("items", "rev", "INTEGER NOT NULL DEFAULT 0")  # from before items had revisions
        self._db().execute("CREATE INDEX IF NOT EXISTS items_rev ON items(rev)")

    def _add_column(self, table: str, column: str, definition: str) -> None:
        if column in {row[1] for row in self._db().execute(f"PRAGMA table_info({table})")}:
            return
        try:
            self._db().execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.OperationalError as exc:  # another worker added it first
            if "duplicate column" not in str(exc):
                raise

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=_TIMEOUT, isolation_level=None)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks between workers
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- anchors -----------------------------------------------------------------------------------
    def put_anchor(self, anchor: Anchor, *, source_updated: str | None = None) -> bool:
        """Add or replace the anchor of one annotation (an update may change its label). ``source_updated`` is
        the annotation's ``updated_at`` in Label Studio: an event older than the one stored is late (webhooks
        can arrive out of order) and is ignored. Returns whether the anchor changed."""
        with self._tx() as db:
            row = db.execute("SELECT task_id, text, label, source_updated FROM anchors WHERE annotation_id = ?",
                             (anchor.annotation_id,)).fetchone()
            if row is not None and source_updated and row[3] and _timestamp(source_updated) < _timestamp(row[3]):
                return False
            if row is not None and row[:3] == (anchor.task_id, anchor.text, anchor.label):
                if source_updated and source_updated != row[3]:
                    db.execute("UPDATE anchors SET source_updated = ? WHERE annotation_id = ?",
                               (source_updated, anchor.annotation_id))
                return False  # unchanged (e.g. an update of another field): a bump would make every worker rebuild
            db.execute(
                "INSERT OR REPLACE INTO anchors (annotation_id, task_id, text, label, updated, source_updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (anchor.annotation_id, anchor.task_id, anchor.text, anchor.label, time.time(), source_updated),
            )
            self._bump(db)
            return True

    def remove_anchors(self, annotation_ids: Iterable[int]) -> list[Anchor]:
        """Drop the anchors of these annotations; returns the ones that existed."""
        ids = [int(i) for i in annotation_ids]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._tx() as db:
            query = f"SELECT annotation_id, task_id, text, label FROM anchors WHERE annotation_id IN ({marks})"
            rows = db.execute(query, ids).fetchall()
            db.execute(f"DELETE FROM anchors WHERE annotation_id IN ({marks})", ids)
            # Remembered for a rebuild from a task listing taken before this removal (replace_anchors).
            now = time.time()
            db.executemany("INSERT OR REPLACE INTO removed_anchors VALUES (?, ?)", [(i, now) for i in ids])
            db.execute("DELETE FROM removed_anchors WHERE removed < ?", (now - _TOMBSTONE_SECONDS,))
            if rows:
                self._bump(db)
        return [Anchor(*row) for row in rows]

    def replace_anchors(self, anchors: Iterable[Anchor], *, listed_at: float | None = None) -> None:
        """Make the anchors these (a rebuild from Label Studio, the source of truth).

        ``listed_at`` is when the task listing they come from began: an anchor a webhook added, changed or
        removed after that is newer than the listing and is kept as the webhook left it (a listing of a large
        project takes minutes; annotations go on meanwhile)."""
        now = time.time()
        rows = {a.annotation_id: (a.annotation_id, a.task_id, a.text, a.label, now) for a in anchors}
        with self._tx() as db:
            if listed_at is not None:
                newer = {row[0]: row for row in db.execute(
                    "SELECT annotation_id, task_id, text, label, updated FROM anchors WHERE updated >= ?",
                    (listed_at,))}
                gone = {row[0] for row in db.execute(
                    "SELECT annotation_id FROM removed_anchors WHERE removed >= ?", (listed_at,))}
                rows = {i: row for i, row in rows.items() if i not in gone}
                rows.update(newer)
            wanted = {row[:4] for row in rows.values()}
            current = set(db.execute("SELECT annotation_id, task_id, text, label FROM anchors"))
            if current == wanted:
                return  # every pre-label job rebuilds the anchors: most of the time nothing changed
            db.execute("DELETE FROM anchors")
            db.executemany("INSERT OR REPLACE INTO anchors (annotation_id, task_id, text, label, updated) "
                           "VALUES (?, ?, ?, ?, ?)", list(rows.values()))
            self._bump(db)

    def anchors(self) -> list[Anchor]:
        rows = self._db().execute("SELECT annotation_id, task_id, text, label FROM anchors ORDER BY annotation_id")
        return [Anchor(*row) for row in rows]

    def anchor_count(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM anchors").fetchone()[0])

    def anchored_tasks(self) -> set[int]:
        return {row[0] for row in self._db().execute("SELECT DISTINCT task_id FROM anchors")}

    def revision(self) -> int:
        return int(self.get("anchor_revision", 0))

    def _bump(self, db: sqlite3.Connection, key: str = "anchor_revision") -> int:
        """Add one to the counter at ``key`` inside the caller's write transaction; returns the new value. The
        write lock orders the transactions, so the counter grows in commit order (a clock would not)."""
        row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        value = int(json.loads(row[0])) + 1 if row else 1
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))
        return value

    # -- items: the last HCC record per task ----------------------------------------------------------
    def put_items(self, records: dict[int, dict[str, Any]]) -> None:
        """Store the records; the ones that changed get the next items revision (:meth:`items_since`)."""
        now = time.time()
        with self._tx() as db:
            revision = self._bump(db, "items_revision")
            db.executemany(
                "INSERT INTO items (task_id, record, updated, rev) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(task_id) DO UPDATE SET record = excluded.record, updated = excluded.updated, "
                "rev = excluded.rev WHERE items.record IS NOT excluded.record",  # unchanged: nothing to re-read
                [(int(t), json.dumps(r), now, revision) for t, r in records.items()],
            )

    def items_since(self, revision: int, fields: Sequence[str]) -> ItemChanges:
        """The records written after items revision ``revision`` (-1: all), only ``fields`` of each (SQLite
        reads them out of the JSON: a caller that needs three fields does not decode whole records). One
        snapshot: pass the returned revision to the next call and no write is missed or read twice."""
        for name in fields:
            if not name.isidentifier():
                raise ValueError(f"not a record field: {name!r}")
        columns = "".join(", json_extract(record, ?)" for _ in fields)
        db = self._db()
        db.execute("BEGIN")  # deferred: a read snapshot, writers go on
        try:
            counters = dict(db.execute("SELECT key, value FROM kv WHERE key IN ('items_revision', 'items_deleted')"))
            rows = db.execute(f"SELECT task_id{columns} FROM items WHERE rev > ?",
                              [f"$.{name}" for name in fields] + [int(revision)]).fetchall()
        finally:
            db.execute("COMMIT")
        return ItemChanges(revision=int(json.loads(counters.get("items_revision", "0"))),
                           deletions=int(json.loads(counters.get("items_deleted", "0"))),
                           rows={row[0]: dict(zip(fields, row[1:], strict=True)) for row in rows})

    def count_tasks(self) -> int:
        """Tasks the store knows of: those with a record and those with an anchor."""
        return int(self._db().execute("SELECT COUNT(*) FROM (SELECT task_id FROM items UNION "
                                      "SELECT task_id FROM anchors)").fetchone()[0])

    def items(self) -> dict[int, dict[str, Any]]:
        rows = self._db().execute("SELECT task_id, record FROM items ORDER BY task_id")
        return {task_id: json.loads(record) for task_id, record in rows}

    def items_of(self, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The records of these tasks (those that have one)."""
        ids = sorted({int(t) for t in task_ids})
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):  # below SQLite's limit on bound parameters
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db().execute(f"SELECT task_id, record FROM items WHERE task_id IN ({marks})", chunk)
            found.update((task_id, json.loads(record)) for task_id, record in rows)
        return found

    def predicted_tasks(self) -> set[int]:
        """Tasks whose stored record has a label: the backend predicted them."""
        rows = self._db().execute("SELECT task_id FROM items WHERE json_extract(record, '$.label') IS NOT NULL")
        return {row[0] for row in rows}

    def delete_items(self, task_ids: Iterable[int]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM items WHERE task_id = ?", [(int(t),) for t in task_ids])
            self._bump(db, "items_deleted")  # a reader of changed items cannot see a deletion: it reads all again

    def written(self, task_ids: Iterable[int] | None = None) -> dict[int, tuple[int | None, dict[str, Any] | None]]:
        """task -> (Label Studio prediction id, the prediction as last written), of every stored task or of
        those of ``task_ids`` (a chunk of a pre-label reads its own, not the project's)."""
        query = "SELECT task_id, prediction_id, written FROM items"
        if task_ids is None:
            rows = list(self._db().execute(query))
        else:
            ids, rows = sorted({int(t) for t in task_ids}), []
            for start in range(0, len(ids), 500):  # below SQLite's limit on bound parameters
                chunk = ids[start:start + 500]
                rows += self._db().execute(f"{query} WHERE task_id IN ({','.join('?' * len(chunk))})", chunk)
        return {t: (pid, json.loads(w) if w else None) for t, pid, w in rows}

    def mark_written(self, entries: dict[int, tuple[int | None, dict[str, Any]]]) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE items SET prediction_id = ?, written = ? WHERE task_id = ?",
                [(pid, json.dumps(pred), int(t)) for t, (pid, pred) in entries.items()],
            )

    # -- settings and status ----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self._db().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def update(self, key: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the dict stored at ``key`` atomically; returns the new dict."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            value = {**(json.loads(row[0]) if row else {}), **fields}
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))
        return value
