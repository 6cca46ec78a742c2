"""Chunks and progress of the pre-label job (backend.studio.prelabel), without Label Studio."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.studio.client import WRITE_BATCH
from backend.studio.prelabel import ChunkProgress, PrelabelRun, chunks
from backend.studio.settings import Settings
from backend.studio.store import ProjectStore


@pytest.mark.parametrize(("n", "first", "largest", "sizes"), [
    (0, 2, 8, []),
    (1, 2, 8, [1]),
    (30, 2, 8, [2, 4, 8, 8, 8]),
    (7, 250, 2000, [7]),
    (5, 4, 2, [2, 2, 1]),  # a first chunk larger than the cap is capped
])
def test_chunks_grow_from_the_first_to_the_largest_and_cover_every_item_once(n, first, largest, sizes) -> None:
    got = list(chunks(list(range(n)), first=first, largest=largest))
    assert [len(c) for c in got] == sizes
    assert [i for c in got for i in c] == list(range(n))


def test_progress_reports_done_rate_and_time_left(tmp_path: Path, monkeypatch) -> None:
    store = ProjectStore(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr("backend.studio.prelabel.time.time", lambda: clock[0])
    progress = ChunkProgress(store, total=100)
    assert store.get("job")["done"] == 0 and store.get("job")["eta_s"] is None
    clock[0] += 10
    progress.advance(25, predicted=20)
    job = store.get("job")
    assert (job["done"], job["total"], job["rate"], job["eta_s"], job["predicted"]) == (25, 100, 2.5, 30.0, 20)
    progress.step("labelling 50 tasks")
    assert store.get("job")["step"] == "labelling 50 tasks (25 of 100 done)"


def test_a_run_adds_up_its_chunks_and_keeps_a_bounded_list_of_errors() -> None:
    run = PrelabelRun()
    for c in range(3):
        records = {10 * c + i: {"stage": "consistent" if i else "encoder_only"} for i in range(4)}
        errors = {100 + 10 * c + i: f"task {100 + 10 * c + i}: bad" for i in range(9)}
        run.add(records, errors, {"written": 3, "needs_review": 1, "values": [0.5] * 4, "threshold": 0.4})
    assert (run.chunks, run.labelled, run.written, run.needs_review, run.n_errors) == (3, 12, 9, 3, 27)
    assert run.stages == {"encoder_only": 3, "consistent": 9}
    assert len(run.errors) == 20 and len(run.scores) == 12 and run.last_write["threshold"] == 0.4


def test_a_chunk_of_the_default_size_goes_to_label_studio_in_one_import_call() -> None:
    # Each import call costs time that grows with the project's predictions (docs/benchmarks.md): a chunk
    # split into several calls pays it several times.
    assert Settings().prelabel_chunk <= WRITE_BATCH
