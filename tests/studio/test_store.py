"""ProjectStore: the per-project SQLite state every gunicorn worker and job thread shares."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from backend.studio.store import Anchor, ProjectStore


def anchor(annotation_id: int, label: str = "pos", task_id: int | None = None) -> Anchor:
    task = annotation_id * 10 if task_id is None else task_id
    return Anchor(annotation_id, task, f"text of annotation {annotation_id}", label)


@pytest.fixture
def store(tmp_path: Path) -> ProjectStore:
    return ProjectStore(tmp_path / "projects" / "7")


# -- anchors --------------------------------------------------------------------------------------------


def test_new_store_is_empty_and_at_revision_zero(store: ProjectStore) -> None:
    assert store.path.exists()
    assert store.anchors() == []
    assert store.anchored_tasks() == set()
    assert store.revision() == 0


def test_put_anchor_adds_and_replaces_by_annotation_id(store: ProjectStore) -> None:
    store.put_anchor(anchor(2, "pos"))
    store.put_anchor(anchor(1, "neg"))
    assert store.anchors() == [anchor(1, "neg"), anchor(2, "pos")]  # ordered by annotation id
    # An annotation update changes its label: one anchor, the new label.
    store.put_anchor(anchor(2, "neg"))
    assert store.anchors() == [anchor(1, "neg"), anchor(2, "neg")]
    assert store.anchored_tasks() == {10, 20}


def test_remove_anchors_returns_only_those_that_existed(store: ProjectStore) -> None:
    for i in (1, 2, 3):
        store.put_anchor(anchor(i))
    removed = store.remove_anchors([2, 99])
    assert removed == [anchor(2)]
    assert [a.annotation_id for a in store.anchors()] == [1, 3]
    assert store.remove_anchors([]) == []


def test_replace_anchors_makes_the_set_exactly_the_given_one(store: ProjectStore) -> None:
    for i in (1, 2, 3):
        store.put_anchor(anchor(i))
    store.replace_anchors([anchor(3, "neg"), anchor(4)])
    assert store.anchors() == [anchor(3, "neg"), anchor(4)]
    store.replace_anchors([])
    assert store.anchors() == []


def test_revision_bumps_only_on_real_changes(store: ProjectStore) -> None:
    """Workers rebuild their in-memory anchor index whenever the revision moves: no-ops must not move it."""
    steps = []

    def step(what: str) -> None:
        steps.append((what, store.revision()))

    store.put_anchor(anchor(1))
    step("add 1")
    store.put_anchor(anchor(1))
    step("same anchor again")
    store.put_anchor(anchor(1, "neg"))
    step("label of 1 changed")
    store.put_anchor(anchor(1, "neg", task_id=11))
    step("task of 1 changed")
    store.remove_anchors([42])
    step("remove a missing anchor")
    store.put_items({5: {"text": "x", "label": "pos"}})
    store.set("anything", 1)
    step("items and kv")
    store.replace_anchors([anchor(1, "neg", task_id=11)])
    step("replace with the same set")
    store.replace_anchors([anchor(1, "neg", task_id=11), anchor(2)])
    step("replace adding 2")
    store.remove_anchors([1])
    step("remove 1")

    changed = {"add 1", "label of 1 changed", "task of 1 changed", "replace adding 2", "remove 1"}
    previous = 0
    for what, revision in steps:
        if what in changed:
            assert revision > previous, f"{what}: the revision must move"
        else:
            assert revision == previous, f"{what}: nothing changed, the revision must stay"
        previous = revision


# -- items ----------------------------------------------------------------------------------------------


def test_items_put_update_and_delete(store: ProjectStore) -> None:
    store.put_items({1: {"text": "a", "label": "pos", "score": 0.9}, 2: {"text": "b", "label": None}})
    assert store.items() == {1: {"text": "a", "label": "pos", "score": 0.9}, 2: {"text": "b", "label": None}}
    store.put_items({2: {"text": "b", "label": "neg"}})
    assert store.items()[2] == {"text": "b", "label": "neg"}
    assert store.items()[1]["score"] == 0.9  # the other item is untouched
    store.delete_items([1])
    assert list(store.items()) == [2]


def test_predicted_tasks_are_those_with_a_labelled_record(store: ProjectStore) -> None:
    store.put_items({1: {"text": "a", "label": "pos"}, 2: {"text": " ", "label": None}, 3: {"text": "c"}})
    assert store.predicted_tasks() == {1}
    store.put_items({2: {"text": "b", "label": "neg"}})
    assert store.predicted_tasks() == {1, 2}


def test_written_marks_survive_a_record_update(store: ProjectStore) -> None:
    store.put_items({1: {"label": "pos"}, 2: {"label": "neg"}})
    assert store.written() == {1: (None, None), 2: (None, None)}
    store.mark_written({1: (501, {"label": "pos", "score": 0.8, "stage": "consistent"})})
    assert store.written()[1] == (501, {"label": "pos", "score": 0.8, "stage": "consistent"})
    assert store.written()[2] == (None, None)
    # A re-vote stores a fresh record: the prediction id must stay so the prediction is updated, not duplicated.
    store.put_items({1: {"label": "neg"}})
    assert store.items()[1] == {"label": "neg"}
    assert store.written()[1][0] == 501


# -- kv -------------------------------------------------------------------------------------------------


def test_kv_get_set_update(store: ProjectStore) -> None:
    assert store.get("job") is None
    assert store.get("job", {}) == {}
    store.set("label_config", "<View/>")
    assert store.get("label_config") == "<View/>"
    assert store.update("job", state="queued", kind="prelabel") == {"state": "queued", "kind": "prelabel"}
    assert store.update("job", state="running", done=3) == {"state": "running", "kind": "prelabel", "done": 3}
    assert store.get("job") == {"state": "running", "kind": "prelabel", "done": 3}


def test_concurrent_updates_merge_every_field(store: ProjectStore) -> None:
    def worker(i: int) -> None:
        for j in range(10):
            store.update("status", **{f"t{i}_{j}": j})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get("status")) == 8 * 10  # a non-atomic read-merge-write would lose some


# -- persistence and concurrency ------------------------------------------------------------------------


def test_state_survives_reopening(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    first = ProjectStore(directory)
    first.put_anchor(anchor(1))
    first.put_anchor(anchor(2, "neg"))
    first.put_items({10: {"text": "a", "label": "pos"}})
    first.mark_written({10: (77, {"label": "pos"})})
    first.set("label_config", "<View/>")
    first.update("job", state="done")
    revision = first.revision()

    again = ProjectStore(directory)
    assert again.anchors() == [anchor(1), anchor(2, "neg")]
    assert again.revision() == revision
    assert again.items() == {10: {"text": "a", "label": "pos"}}
    assert again.written() == {10: (77, {"label": "pos"})}
    assert again.get("label_config") == "<View/>"
    assert again.get("job") == {"state": "done"}


def test_threads_writing_at_once_lose_no_anchor(store: ProjectStore) -> None:
    n_threads, per_thread = 8, 25
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            start.wait()  # all threads hit the database together
            for k in range(per_thread):
                store.put_anchor(anchor(t * 1000 + k))
        except BaseException as exc:  # surfaced in the main thread: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {t * 1000 + k for t in range(n_threads) for k in range(per_thread)}
    assert {a.annotation_id for a in store.anchors()} == expected
    # Every put was a real change, so every one must have bumped the revision exactly once.
    assert store.revision() == len(expected)


def test_opening_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    """Switching to WAL is the one statement SQLite does not retry on a lock: the store must wait for it."""
    directory = tmp_path / "busy"
    directory.mkdir()
    # Another worker, mid-write; committed from a timer thread, hence check_same_thread=False.
    other = sqlite3.connect(directory / "state.sqlite", isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO kv VALUES ('from_other', '1')")
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    try:
        store = ProjectStore(directory)  # raised "database is locked" at once before the store waited
    finally:
        release.join()
        other.close()
    assert store.get("from_other") == 1
    store.put_anchor(anchor(1))
    assert store.anchors() == [anchor(1)]


def _write_anchors_in_process(directory: str, first_id: int, count: int, start, spans) -> None:
    """Run in a spawned process: open the store and write ``count`` anchors together with the other process."""
    start.wait(60)  # both processes are up: from here on they race
    began = time.monotonic()
    store = ProjectStore(directory)  # opened concurrently with the other process, on purpose
    for k in range(count):
        store.put_anchor(anchor(first_id + k))
    spans.put((began, time.monotonic()))


def test_processes_writing_at_once_lose_no_anchor(tmp_path: Path) -> None:
    """Two gunicorn workers are two processes: their writes to one project must all land."""
    directory = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")  # no fork: a forked SQLite connection would be shared
    start, spans = ctx.Barrier(2), ctx.Queue()
    per_process = 150
    procs = [ctx.Process(target=_write_anchors_in_process,
                         args=(str(directory), p * 10_000, per_process, start, spans)) for p in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    (a0, a1), (b0, b1) = spans.get(timeout=5), spans.get(timeout=5)
    assert max(a0, b0) < min(a1, b1), "the two processes did not write at the same time: the test proves nothing"
    store = ProjectStore(directory)
    expected = {p * 10_000 + k for p in range(2) for k in range(per_process)}
    assert {a.annotation_id for a in store.anchors()} == expected
    assert store.revision() == len(expected)


def test_a_late_older_event_does_not_overwrite_a_newer_label(store: ProjectStore) -> None:
    assert store.put_anchor(anchor(1, "neg"), source_updated="2026-12-01T10:00:05.000000Z")
    assert not store.put_anchor(anchor(1, "pos"), source_updated="2026-12-01T10:00:01.000000Z")  # late CREATED
    assert [a.label for a in store.anchors()] == ["neg"]
    assert store.put_anchor(anchor(1, "pos"), source_updated="2026-12-01T10:00:09+00:00")  # a newer update
    assert [a.label for a in store.anchors()] == ["pos"]
    assert store.put_anchor(anchor(1, "neg"))  # without a timestamp (older senders): the last event wins


def test_a_store_from_before_the_timestamps_opens_and_keeps_its_anchors(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old"
    path.mkdir()
    db = sqlite3.connect(path / "state.sqlite")
    db.executescript("CREATE TABLE anchors (annotation_id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, "
                     "text TEXT NOT NULL, label TEXT NOT NULL, updated REAL NOT NULL);"
                     "INSERT INTO anchors VALUES (1, 1, 'text 1', 'pos', 0);")
    db.close()
    old = ProjectStore(path)
    assert [a.label for a in old.anchors()] == ["pos"]
    assert old.put_anchor(anchor(1, "neg"), source_updated="2026-12-01T10:00:00Z")


def test_a_rebuild_from_an_older_listing_keeps_what_webhooks_changed_meanwhile(store: ProjectStore) -> None:
    store.replace_anchors([anchor(1, "pos"), anchor(2, "pos")])
    listed_at = time.time()  # a pre-label job starts listing the project's tasks...
    time.sleep(0.01)
    store.put_anchor(anchor(1, "neg"))  # ...while a reviewer changes one label,
    store.remove_anchors([2])  # deletes another annotation
    store.put_anchor(anchor(3, "pos"))  # and creates a third
    listing = [anchor(1, "pos"), anchor(2, "pos"), anchor(4, "neg")]  # what the listing saw, plus an import
    store.replace_anchors(listing, listed_at=listed_at)
    assert {a.annotation_id: a.label for a in store.anchors()} == {1: "neg", 3: "pos", 4: "neg"}
    # A later listing that began after those changes is the truth again, whole.
    store.replace_anchors([anchor(1, "pos")], listed_at=time.time())
    assert {a.annotation_id: a.label for a in store.anchors()} == {1: "pos"}


# -- items changed since a revision (what a worker reads to keep its in-memory view current) ---------------

FIELDS = ("stage", "label", "text")


def test_items_since_returns_only_the_records_changed_after_a_revision(store: ProjectStore) -> None:
    store.put_items({1: {"text": "a", "label": "pos", "stage": "consistent", "score": 0.9},
                     2: {"text": "b", "label": None, "stage": "skipped"}})
    first = store.items_since(-1, FIELDS)
    assert first.rows == {1: {"stage": "consistent", "label": "pos", "text": "a"},
                          2: {"stage": "skipped", "label": None, "text": "b"}}
    assert store.items_since(first.revision, FIELDS).rows == {}  # nothing new: nothing read
    other = ProjectStore(store.directory)  # another worker writes
    other.put_items({2: {"text": "b", "label": "neg", "stage": "combined"}, 3: {"text": "c", "label": "pos"}})
    second = store.items_since(first.revision, FIELDS)
    assert second.rows == {2: {"stage": "combined", "label": "neg", "text": "b"},
                           3: {"stage": None, "label": "pos", "text": "c"}}
    assert second.revision > first.revision
    # A record written again unchanged (a re-vote that changed nothing) is not re-read; a mark is no change.
    other.put_items({1: {"text": "a", "label": "pos", "stage": "consistent", "score": 0.9}})
    other.mark_written({1: (501, {"label": "pos"})})
    assert store.items_since(second.revision, ("label",)).rows == {}
    # A deletion is not a changed row: the count of deletions tells the reader to read everything again.
    store.delete_items([3])
    assert store.items_since(second.revision, FIELDS).deletions == second.deletions + 1
    assert sorted(store.items_since(-1, FIELDS).rows) == [1, 2]
    with pytest.raises(ValueError, match="not a record field"):
        store.items_since(-1, ("label') --",))


def test_items_since_uses_an_index_not_a_scan(store: ProjectStore) -> None:
    plan = " ".join(str(row) for row in store._db().execute(
        "EXPLAIN QUERY PLAN SELECT task_id FROM items WHERE rev > ?", (0,)))
    assert "items_rev" in plan


def test_a_store_from_before_item_revisions_opens_and_reads_its_items(tmp_path: Path) -> None:
    path = tmp_path / "old-items"
    path.mkdir()
    db = sqlite3.connect(path / "state.sqlite")
    db.executescript("CREATE TABLE items (task_id INTEGER PRIMARY KEY, record TEXT NOT NULL, prediction_id INTEGER, "
                     "written TEXT, updated REAL NOT NULL);"
                     """INSERT INTO items VALUES (1, '{"text": "a", "label": "pos"}', NULL, NULL, 0);""")
    db.close()
    old = ProjectStore(path)
    assert old.items_since(-1, ("label",)).rows == {1: {"label": "pos"}}
    revision = old.items_since(-1, ("label",)).revision
    old.put_items({2: {"label": "neg"}})
    assert old.items_since(revision, ("label",)).rows == {2: {"label": "neg"}}
