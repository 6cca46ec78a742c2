"""How a pre-label job walks a large project: chunks that grow, what the run adds up, and its progress.

A project of 100,000 tasks cannot wait for all of them to be labelled before the first prediction is written:
the job labels and writes a chunk at a time: the first small (its predictions appear seconds after labelling
begins), the next ones doubling up to ``HCC_PRELABEL_CHUNK`` (fewer round trips to Label Studio per task), or
growing at once where Label Studio charges each write call a fixed cost.
``/status`` shows the tasks done, the rate and the time left.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.studio.store import ProjectStore

#: Tasks of the first chunk: small, so that its predictions are written seconds after labelling begins.
FIRST_CHUNK = 250
#: Tasks the centroids' refinement is fitted on at most, before the first chunk: the size of the
#: evaluation splits it was measured on (docs/benchmarks.md, 3,000-4,500 items); more costs encoding and
#: fitting time before the first prediction for a refinement that is already well determined.
REFINE_SAMPLE = 5000
ERRORS_KEPT = 20  # task errors a run's summary lists (it counts them all)

#: The share of a write call that Label Studio's fixed cost per call may take: past it, chunks grow at once to
#: the size that brings the fixed cost down to this share (a design bound, not a fitted value).
FIXED_SHARE = 0.2


class ChunkSizes:
    """The size of each chunk of a pre-label: the first ``first``, each next twice the last, up to ``largest``;
    and, once the import calls show that Label Studio charges each call a fixed cost, at once as large as keeps
    that cost to ``FIXED_SHARE`` of a call.

    Label Studio 1.23.2's bulk prediction import recounts the annotations and predictions of *every* task of the
    project after each call (unless its memory-efficient import flag is on): 16 s at 25,000 tasks and 40 s at
    50,000 whatever the call's size (docs/benchmarks.md, ``bench/studio_writes.py``). Chunks of a few thousand
    then pay that cost 20 times over at 100,000 tasks. The calls' times are fitted as
    ``seconds = fixed + per_item * n`` (least squares over the calls so far, which differ in size as the chunks
    double); a call of ``n >= fixed * (1 - s) / (s * per_item)`` spends at most the share ``s`` on the fixed
    part.
    """

    def __init__(self, *, first: int, largest: int, calls: list[tuple[int, float]] | None = None) -> None:
        self.largest = max(1, largest)
        self.last: int | None = None
        self.first = max(1, min(first, self.largest))
        # (predictions, seconds) of each import call: the client's own list (``StudioClient.import_calls``),
        # which it appends to as calls end, so the fit always sees every call so far.
        self.calls = calls if calls is not None else []

    def observe(self, n: int, seconds: float) -> None:
        """An import call of ``n`` predictions took ``seconds``."""
        if n > 0:
            self.calls.append((n, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per call, seconds per prediction) from the calls so far, or None while they cannot
        tell the two apart (fewer than two sizes)."""
        if len({n for n, _ in self.calls}) < 2:
            return None
        per_item, fixed = np.polyfit([n for n, _ in self.calls], [t for _, t in self.calls], 1)
        return max(float(fixed), 0.0), max(float(per_item), 1e-9)

    def next(self) -> int:
        size = self.first if self.last is None else min(2 * self.last, self.largest)
        fitted = self.fit()
        if fitted is not None and fitted[0] > 0:
            fixed, per_item = fitted
            size = max(size, min(self.largest, math.ceil(fixed * (1 - FIXED_SHARE) / (FIXED_SHARE * per_item))))
        self.last = size
        return size


#: Seconds one prediction costs through Label Studio's single create (``POST /api/predictions``, 4 at a time):
#: 200 took 7.0-8.4 s on Label Studio 1.23.2 with SQLite, at every project size (bench/studio_writes.py). The
#: guess until a job measures its own single creates; the store keeps what was measured.
SINGLE_CREATE_S = 0.04


def single_creates_cheaper(n: int, *, fixed: float, per_item: float, single: float) -> bool:
    """Whether ``n`` predictions cost less as single creates (``single`` seconds each, no fixed cost) than as one
    bulk import call (``fixed + per_item * n``: Label Studio's recount of the project, then its own share)."""
    return n * single < fixed + per_item * n


def import_costs(store: ProjectStore, sizes: ChunkSizes | None, n_tasks: int) -> tuple[float, float, float] | None:
    """(fixed seconds of a bulk import call, seconds per prediction in it, seconds per single create) for a
    project of ``n_tasks`` tasks: from this job's import calls when they tell, else from what an earlier job
    measured; None when nothing was measured yet.

    An earlier job's fixed cost is scaled down to a project that has fewer tasks now, never up: Label Studio's
    recount grows with the tasks, but a fixed cost measured on a small project is mostly the request's own
    overhead, and scaling that up would send a large write one by one (unbounded time) where one bulk call
    costs a bounded recount. So a project that grew gets single creates only once a job measured it."""
    saved = store.get("write_costs") or {}
    fitted = sizes.fit() if sizes is not None else None
    if fitted is not None:
        fixed, per_item = fitted
    elif "fixed" in saved:
        scale = min(1.0, n_tasks / saved["tasks"]) if saved.get("tasks") else 1.0
        fixed, per_item = saved["fixed"] * scale, saved["per_item"]
    else:
        return None
    return fixed, per_item, saved.get("single", SINGLE_CREATE_S)


def remember_import_costs(store: ProjectStore, sizes: ChunkSizes, n_tasks: int,
                          creates: list[tuple[int, float]]) -> None:
    """Keep what this job measured for the writes of later jobs (a re-vote, a late /predict, the next import)."""
    saved = dict(store.get("write_costs") or {})
    fitted = sizes.fit()
    if fitted is not None:
        saved.update(fixed=fitted[0], per_item=fitted[1], tasks=n_tasks)
    if creates:
        saved["single"] = sum(t for _, t in creates) / sum(n for n, _ in creates)
    if saved:
        store.set("write_costs", saved)


@dataclass
class PrelabelRun:
    """What the chunks of one pre-label added up to (counts only: the records themselves are in the store)."""

    labelled: int = 0
    written: int = 0
    needs_review: int = 0
    chunks: int = 0
    n_errors: int = 0
    errors: list[str] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # every chunk's, for the flag threshold of the next
    last_write: dict[str, Any] = field(default_factory=dict)

    def add(self, records: dict[int, dict[str, Any]], errors: dict[int, str], written: dict[str, Any]) -> None:
        self.chunks += 1
        self.labelled += len(records)
        self.n_errors += len(errors)
        self.errors += list(errors.values())[:max(0, ERRORS_KEPT - len(self.errors))]
        for record in records.values():
            self.stages[record["stage"]] = self.stages.get(record["stage"], 0) + 1
        self.written += written["written"]
        self.needs_review += written["needs_review"]
        self.scores += written["values"]
        self.last_write = written


@dataclass
class PendingMeta:
    """Task meta to write (task -> meta) and, once written, what to mark in the store (task -> the
    prediction id and written state)."""

    metas: dict[int, dict[str, Any]] = field(default_factory=dict)
    marks: dict[int, tuple[int | None, dict[str, Any]]] = field(default_factory=dict)

    def add(self, other: PendingMeta) -> None:
        self.metas.update(other.metas)
        self.marks.update(other.marks)


class ChunkProgress:
    """The job's progress in the store, for ``/status``: tasks done of the total, tasks per second, the
    seconds left at that rate, and the predictions written so far."""

    def __init__(self, store: ProjectStore, *, total: int) -> None:
        self.store, self.total, self.done = store, total, 0
        self.started = time.time()
        store.update("job", done=0, total=total, rate=None, eta_s=None, predicted=0)

    def step(self, what: str) -> None:
        self.store.update("job", step=f"{what} ({self.done} of {self.total} done)")

    def predicted(self, n: int) -> None:
        """``n`` predictions of this run are in Label Studio (written before the chunk's task meta)."""
        self.store.update("job", predicted=n)

    def advance(self, n: int, *, predicted: int) -> None:
        self.done += n
        elapsed = max(time.time() - self.started, 1e-6)
        rate = self.done / elapsed
        left = self.total - self.done
        self.store.update("job", done=self.done, total=self.total, rate=round(rate, 2),
                          eta_s=round(left / rate, 1) if rate > 0 else None, predicted=predicted)
