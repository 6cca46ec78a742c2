"""The SQLite response cache and its request keys."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from backend.labelling.llm_cache import ResponseCache, request_key

RESPONSE = {"content": '{"label": "card_arrival"}', "logprobs": [["card", -0.5], ["_arrival", -0.25]]}


def test_round_trip_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "cache.sqlite"  # the parent folder is created on demand
    cache = ResponseCache(path)
    cache.put("k1", RESPONSE)
    cache.put("k2", {"content": "héllo ✓"})

    reopened = ResponseCache(path)  # a new process would see the same entries

    assert reopened.get("k1") == RESPONSE
    assert reopened.get("k2") == {"content": "héllo ✓"}
    assert reopened.get("missing") is None
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 2


def test_put_replaces_an_entry(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    cache.put("k", {"content": "old"})
    cache.put("k", {"content": "new"})

    assert ResponseCache(tmp_path / "cache.sqlite").get("k") == {"content": "new"}


def test_in_memory_mode_writes_no_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = ResponseCache(None)
    cache.put("k", RESPONSE)

    assert cache.get("k") == RESPONSE
    assert cache.get("other") is None
    assert list(tmp_path.iterdir()) == []
    assert ResponseCache(None).get("k") is None  # nothing is shared between in-memory caches


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    writers, per_writer = 8, 40
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(worker: int) -> None:
        try:
            start.wait()  # all threads hit the database at once
            for i in range(per_writer):
                cache.put(f"{worker}-{i}", {"worker": worker, "i": i})
                assert cache.get(f"{worker}-{i}") == {"worker": worker, "i": i}
        except BaseException as exc:  # collected here, reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    reader = ResponseCache(tmp_path / "cache.sqlite")
    for worker in range(writers):
        for i in range(per_writer):
            assert reader.get(f"{worker}-{i}") == {"worker": worker, "i": i}


def test_two_caches_on_one_file_see_each_other(tmp_path: Path) -> None:
    # e.g. two gunicorn workers sharing the cache directory
    first, second = ResponseCache(tmp_path / "c.sqlite"), ResponseCache(tmp_path / "c.sqlite")
    first.put("k", RESPONSE)
    assert second.get("k") == RESPONSE


def test_request_key_ignores_dict_order() -> None:
    one = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0,
           "response_format": {"type": "json_object", "schema": {"type": "object", "required": ["label"]}}}
    two = {"response_format": {"schema": {"required": ["label"], "type": "object"}, "type": "json_object"},
           "temperature": 0.0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}

    assert request_key(one) == request_key(two)
    assert len(request_key(one)) == 64 and int(request_key(one), 16) >= 0  # a sha256 hex digest


def test_request_key_changes_with_any_value() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0}
    variants = [
        {**base, "model": "n"},
        {**base, "temperature": 0.5},
        {**base, "messages": [{"role": "user", "content": "hi "}]},
        {**base, "messages": [{"role": "system", "content": "hi"}]},
        {**base, "logprobs": True},
    ]
    keys = {request_key(base), *(request_key(v) for v in variants)}
    assert len(keys) == len(variants) + 1


def test_request_key_is_stable_across_runs() -> None:
    # A fixed value: a change in how keys are made would silently invalidate every user's cache.
    assert request_key({"b": [1, "é"], "a": None}) == request_key({"a": None, "b": [1, "é"]})
    assert request_key({"a": 1}) == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"


def test_a_write_waits_for_another_process_lock_then_gives_up_without_raising(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite", timeout=0.1)
    other = sqlite3.connect(tmp_path / "c.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker's write transaction holds the lock

    assert cache.put("k", RESPONSE) is False  # skipped with a warning, not an error
    assert cache.get("k") is None  # WAL: reading goes on while the other process writes
    other.execute("ROLLBACK")
    assert cache.put("k", RESPONSE) is True and cache.get("k") == RESPONSE


def test_an_unreadable_value_is_a_miss(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        conn.execute("INSERT INTO responses (key, value) VALUES ('k', '{\"content\": ')")

    assert cache.get("k") is None  # asked again rather than failing the item


def test_writes_do_not_wait_for_the_disk(tmp_path: Path) -> None:
    # synchronous=NORMAL in WAL mode: the file survives a crash, the last answers may not; FULL made every
    # answer wait for an fsync (100-130 writes/s here, about the answers/s a served LLM gives: docs/benchmarks.md)
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("k", RESPONSE)
    conn = cache._connect()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def _fork_child(cache: ResponseCache, parent_connection_id: int, queue) -> None:
    cache.put("child", {"pid": os.getpid()})
    queue.put(id(cache._connect()) != parent_connection_id)


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_worker_opens_its_own_connection(tmp_path: Path) -> None:
    # gunicorn --preload forks workers after the app was loaded; SQLite forbids using a connection opened
    # before a fork in the child (its POSIX locks belong to the parent)
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put("parent", RESPONSE)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fork_child, args=(cache, id(cache._connect()), queue))
    child.start()
    child.join(timeout=60)

    assert child.exitcode == 0 and queue.get(timeout=5) is True
    assert cache.get("child") == {"pid": child.pid}


def _open_fresh(path: str, start, results) -> None:
    start.wait()
    cache = ResponseCache(path)
    results.put(cache.put(str(os.getpid()), 1) and cache.get(str(os.getpid())) == 1)


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_processes_opening_one_fresh_file_together_all_get_a_working_cache(tmp_path: Path) -> None:
    # processes switching a new file to WAL at once can deadlock; SQLite then says "locked" without waiting
    # (about 4% of openings here before the retry): each such worker lost its cache for the whole run
    ctx, rounds, workers = multiprocessing.get_context("fork"), 30, 6
    outcomes = []
    for round_ in range(rounds):
        start, results = ctx.Barrier(workers), ctx.Queue()
        path = str(tmp_path / f"fresh-{round_}.sqlite")
        procs = [ctx.Process(target=_open_fresh, args=(path, start, results)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        outcomes += [results.get(timeout=5) for _ in range(workers)]

    assert outcomes.count(True) == rounds * workers


def _hammer(path: str, worker: int, count: int, start) -> None:
    start.wait()  # every process opens the fresh file at once
    cache = ResponseCache(path)
    for i in range(count):
        cache.put(f"{worker}-{i}", {"worker": worker, "i": i, "pad": "x" * 500})
        assert cache.get(f"{worker}-{i}")["i"] == i
        cache.get(f"{(worker + 1) % 4}-{i}")  # read another worker's keys while it writes


def test_worker_processes_share_one_file(tmp_path: Path) -> None:
    path, workers, count = str(tmp_path / "shared.sqlite"), 4, 50
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as separate gunicorn workers are
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_hammer, args=(path, w, count, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)

    assert [proc.exitcode for proc in procs] == [0] * workers
    reader = ResponseCache(path)
    assert all(reader.get(f"{w}-{i}") == {"worker": w, "i": i, "pad": "x" * 500}
               for w in range(workers) for i in range(count))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
