"""How a pre-label job walks a large project: chunks that grow, what the run adds up, and its progress.

A project of 100,000 tasks cannot wait for all of them to be labelled before the first prediction is written:
the job labels and writes a chunk at a time: the first small (its predictions appear seconds after labelling
begins), the next ones doubling up to ``HCC_PRELABEL_CHUNK`` (fewer round trips to Label Studio per task).
``/status`` shows the tasks done, the rate and the time left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backend.studio.store import ProjectStore

#: Tasks of the first chunk: small, so that its predictions are written seconds after labelling begins.
FIRST_CHUNK = 250
#: Tasks the centroids' refinement is fitted on at most, before the first chunk: the size of the
#: evaluation splits it was measured on (docs/benchmarks.md, 3,000-4,500 items); more costs encoding and
#: fitting time before the first prediction for a refinement that is already well determined.
REFINE_SAMPLE = 5000
ERRORS_KEPT = 20  # task errors a run's summary lists (it counts them all)

T = TypeVar("T")


def chunks(items: Sequence[T], *, first: int, largest: int) -> Iterator[list[T]]:
    """``items`` in consecutive chunks of ``first``, twice that, ... up to ``largest`` each."""
    size, start = max(1, min(first, largest)), 0
    while start < len(items):
        yield list(items[start:start + size])
        start += size
        size = min(size * 2, largest)


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
