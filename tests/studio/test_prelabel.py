"""Chunks and progress of the pre-label job (backend.studio.prelabel), without Label Studio."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.studio.client import WRITE_BATCH
from backend.studio.prelabel import (
    FIXED_SHARE,
    ChunkProgress,
    ChunkSizes,
    PrelabelRun,
    import_costs,
    remember_import_costs,
    single_creates_cheaper,
)
from backend.studio.settings import Settings
from backend.studio.store import ProjectStore


def _walk(n: int, sizes: ChunkSizes, call_seconds=None) -> list[int]:
    """The chunk sizes a job of ``n`` tasks makes; ``call_seconds(size)``: what each chunk's import call takes."""
    got, start = [], 0
    while start < n:
        size = min(sizes.next(), n - start)
        got.append(size)
        start += size
        if call_seconds is not None:
            sizes.observe(size, call_seconds(size))
    return got


@pytest.mark.parametrize(("n", "first", "largest", "sizes"), [
    (0, 2, 8, []),
    (1, 2, 8, [1]),
    (30, 2, 8, [2, 4, 8, 8, 8]),
    (7, 250, 2000, [7]),
    (5, 4, 2, [2, 2, 1]),  # a first chunk larger than the cap is capped
])
def test_chunks_grow_from_the_first_to_the_largest(n, first, largest, sizes) -> None:
    assert _walk(n, ChunkSizes(first=first, largest=largest)) == sizes


def test_calls_with_a_small_fixed_cost_keep_the_doubling() -> None:
    # 0.6 ms per prediction and 50 ms per call: the fixed cost is small beside a chunk's write.
    got = _walk(40_000, ChunkSizes(first=250, largest=20_000), lambda n: 0.05 + 0.0006 * n)
    assert got[:6] == [250, 500, 1000, 2000, 4000, 8000]


def test_a_large_fixed_cost_per_call_makes_the_chunks_jump_to_the_largest() -> None:
    # Label Studio recounting a 100,000-task project after each call: ~60 s per call whatever its size.
    got = _walk(100_000, ChunkSizes(first=250, largest=20_000), lambda n: 60.0 + 0.00015 * n)
    assert got[:3] == [250, 500, 20_000]
    assert len(got) == 7  # against 11 for doubling alone


def test_the_fit_recovers_a_known_fixed_cost_and_per_item_cost() -> None:
    sizes = ChunkSizes(first=100, largest=10_000)
    for n in (100, 200, 400, 800):
        sizes.observe(n, 3.0 + 0.002 * n)
    fixed, per_item = sizes.fit()
    assert fixed == pytest.approx(3.0) and per_item == pytest.approx(0.002)
    # the size that keeps the fixed cost to FIXED_SHARE of a call
    share = fixed / (fixed + per_item * sizes.next())
    assert share == pytest.approx(FIXED_SHARE, abs=1e-3)


def test_one_size_alone_tells_nothing_of_a_fixed_cost() -> None:
    sizes = ChunkSizes(first=250, largest=20_000)
    sizes.observe(250, 60.0)
    assert sizes.fit() is None
    assert sizes.next() == 250 and sizes.next() == 500


@pytest.mark.parametrize(("n", "fixed", "single_wins"), [
    (250, 90.0, True),      # a 100,000-task project: 10 s one by one against 90 s for one call
    (4000, 90.0, False),    # 160 s one by one: the call is cheaper
    (3, 0.05, False),       # a small project's call costs next to nothing
])
def test_single_creates_win_only_where_the_call_s_fixed_cost_outweighs_them(n, fixed, single_wins) -> None:
    assert single_creates_cheaper(n, fixed=fixed, per_item=0.00015, single=0.04) is single_wins


def test_a_job_s_measured_costs_carry_to_later_writes_scaled_down_never_up(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    assert import_costs(store, None, 1000) is None  # nothing measured: the caller keeps the bulk import
    sizes = ChunkSizes(first=250, largest=20_000)
    for n in (250, 500):
        sizes.observe(n, 10.0 + 0.0002 * n)  # 10 s a call at 10,000 tasks
    remember_import_costs(store, sizes, 10_000, creates=[(200, 8.0)])
    fixed, per_item, single = import_costs(store, None, 10_000)
    assert fixed == pytest.approx(10.0) and per_item == pytest.approx(0.0002) and single == pytest.approx(0.04)
    assert import_costs(store, None, 5_000)[0] == pytest.approx(5.0)  # a smaller project: a smaller recount
    # A project that grew keeps the measured cost: scaled up, a small project's request overhead would send
    # a large write one by one.
    assert import_costs(store, None, 100_000)[0] == pytest.approx(10.0)
    assert not single_creates_cheaper(20_000, fixed=10.0, per_item=0.0002, single=0.04)
    # within a job, its own calls win over what earlier jobs measured
    now = ChunkSizes(first=250, largest=20_000)
    for n in (250, 500):
        now.observe(n, 2.0 + 0.0002 * n)
    assert import_costs(store, now, 50_000)[0] == pytest.approx(2.0)


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
