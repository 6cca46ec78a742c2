"""How many LLM requests to keep in flight: learned from the endpoint's own answers, never above a cap.

A served LLM (vLLM, a hosted API) answers more per second the more requests it holds, up to a point no
client knows in advance; a llama.cpp server with one slot answers one at a time and only queues the rest.
:class:`AdaptiveLimit` finds the point from what the endpoint does, and :func:`endpoint_limit` shares one
limit between every annotator of a process that talks to the same endpoint, so the cap is per process and
endpoint, not per project.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Literal

#: Requests in flight before anything is known about the endpoint: the old fixed default, which the
#: embedded single-slot server handles without a long queue.
DEFAULT_START = 4
#: Upper bound on requests in flight per process and endpoint unless the user sets another
#: (HCC_LLM_CONCURRENCY / --llm-concurrency). 64 keeps a vLLM GPU's batch full at 300 ms per answer
#: (~200 answers/s) while bounding the threads and sockets one process holds.
DEFAULT_CAP = 64
#: Multiplicative decrease on overload: TCP CUBIC's 0.7 (RFC 8312) rather than Reno's 0.5, since an
#: endpoint that refuses above N in flight is then used at 0.7N-N instead of 0.5N-N between refusals.
BACKOFF = 0.7
#: A request that was alone in flight from its start to its answer measures the endpoint's unloaded latency;
#: it moves the baseline this far towards it (so a slower kind of question, e.g. a longer prompt, raises it).
IDLE_WEIGHT = 0.5

Outcome = Literal["ok", "overload", "other"]
Token = tuple[float, int]  # (send time, requests sent before it, or -1 if others were in flight at its start)


@dataclass(frozen=True)
class LimitSnapshot:
    """What the limit did, for reports and benchmarks."""

    limit: int
    cap: int
    in_flight: int
    max_in_flight: int
    increases: int
    decreases: int
    base_latency: float | None  # seconds: the endpoint's unloaded latency as estimated


def vegas_thresholds(limit: int) -> tuple[float, float]:
    """Queued requests below which the limit grows (alpha) and above which it shrinks (beta).

    TCP Vegas (Brakmo & Peterson, 1995) uses fixed 2 and 4 packets; they are scaled with log10(limit) as in
    Netflix's concurrency-limits, because at 60 in flight a few per cent of client-side jitter already
    reads as several queued requests. The floors (1, 2) let a limit of 1 or 2 still grow.
    """
    scale = math.log10(max(limit, 1))
    return max(1.0, 3.0 * scale), max(2.0, 6.0 * scale)


class AdaptiveLimit:
    """A concurrency limit that grows while the endpoint keeps up and backs off when it does not.

    The rule is TCP's congestion control applied to requests instead of packets:

    * **Slow start.** The limit begins at ``start`` and doubles after every measurement window (as many
      successful answers as the limit, about one round trip) until the first sign of congestion.
    * **Latency test (Vegas).** With ``R`` the window's median latency and ``R0`` the endpoint's unloaded
      latency, ``q = limit * (1 - R0 / R)`` estimates how many of the requests are waiting in the server
      rather than being served (Little's law: at unchanged ``R`` throughput grows in proportion to the limit,
      so "latency holds" is "throughput grows"). ``q < alpha``: the limit grows (+1 per window after slow
      start); ``q > beta``: it shrinks by 1 and slow start ends. A llama.cpp server with one slot queues all
      but one request, so ``q = limit - 1`` and its limit never grows past where it started.
    * **Multiplicative decrease.** A 429, a 5xx or a timeout multiplies the limit by :data:`BACKOFF` (at least
      1) and ends slow start; only requests sent after the last decrease can cause another, so one burst of
      refusals counts once (TCP's one decrease per round trip).
    * The limit only grows when it was reached during the window (a batch of 3 items teaches nothing about
      64), and never exceeds ``cap``.

    ``R0`` is the smallest latency seen, except that a request that was alone in flight from start to answer
    pulls it halfway towards its own latency. Only such requests may raise it: under a steady load every
    request waits behind others, so a moving minimum would creep up to the loaded latency and the limit with
    it (a single-slot server would then be flooded after all).
    """

    def __init__(self, cap: int = DEFAULT_CAP, start: int = DEFAULT_START, *, clock=time.monotonic) -> None:
        if cap < 1 or start < 1:
            raise ValueError(f"cap and start must be >= 1, got cap={cap}, start={start}")
        self.cap = cap
        self._clock = clock
        self._cond = threading.Condition()
        self._limit = min(start, cap)
        self._in_flight = 0
        self._sent = 0  # requests sent so far (tells whether one was alone in flight)
        self._max_in_flight = 0
        self._slow_start = True
        self._base: float | None = None
        self._window: list[float] = []
        self._reached = False  # the limit was reached during the current window
        self._last_decrease = -math.inf
        self._increases = 0
        self._decreases = 0

    @property
    def limit(self) -> int:
        with self._cond:
            return self._limit

    def acquire(self) -> Token:
        """Wait for a free slot; the token goes back to :meth:`release`."""
        with self._cond:
            while self._in_flight >= self._limit:
                self._reached = True
                self._cond.wait()
            alone = self._sent if self._in_flight == 0 else -1
            self._sent += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if self._in_flight >= self._limit:
                self._reached = True
            return self._clock(), alone

    def release(self, token: Token, outcome: Outcome) -> None:
        """Free the slot taken at ``token`` and learn from how the request ended."""
        sent, alone = token
        now = self._clock()
        with self._cond:
            self._in_flight -= 1
            if outcome == "overload":
                self._overloaded(sent, now)
            elif outcome == "ok":
                # alone from start to answer: nothing was in flight when it left and nothing was sent since
                self._answered(now - sent, unloaded=alone >= 0 and self._sent == alone + 1)
            # wake as many waiting threads as there are free slots: notify_all would wake every one of up to
            # `cap` threads on each answer (measured: 8.4 ms CPU per call at cap 128, against 5 at cap 64)
            self._cond.notify(max(0, self._limit - self._in_flight))

    def snapshot(self) -> LimitSnapshot:
        with self._cond:
            return LimitSnapshot(self._limit, self.cap, self._in_flight, self._max_in_flight, self._increases,
                                 self._decreases, self._base)

    # -- the rule (called with the lock held) -----------------------------------------------------------
    def _overloaded(self, sent: float, now: float) -> None:
        if sent < self._last_decrease:
            return  # sent before the last decrease: the same overload, already answered
        self._set(max(1, int(self._limit * BACKOFF)))
        self._slow_start = False
        self._last_decrease = now

    def _answered(self, latency: float, *, unloaded: bool) -> None:
        if self._base is None or latency < self._base:
            self._base = latency
        elif unloaded:
            self._base += IDLE_WEIGHT * (latency - self._base)
        self._window.append(latency)
        if len(self._window) >= self._limit:
            self._judge_window()

    def _judge_window(self) -> None:
        latency = sorted(self._window)[len(self._window) // 2]
        queued = self._limit * (1.0 - self._base / latency) if latency > 0 else 0.0
        alpha, beta = vegas_thresholds(self._limit)
        if queued > beta:
            self._slow_start = False
            self._set(max(1, self._limit - 1))
        elif queued < alpha and self._reached:
            self._set(min(self.cap, self._limit * 2 if self._slow_start else self._limit + 1))
        elif queued >= alpha:
            self._slow_start = False  # latency started to rise: from here on, one step at a time
        self._window.clear()
        self._reached = False

    def _set(self, limit: int) -> None:
        if limit > self._limit:
            self._increases += 1
        elif limit < self._limit:
            self._decreases += 1
        self._limit = limit
        self._window.clear()
        self._reached = False


# Weak: a limit lives as long as an annotator uses it (a project dropped from memory does not pin it).
_SHARED: weakref.WeakValueDictionary[tuple[str, int], AdaptiveLimit] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def endpoint_limit(base_url: str, cap: int) -> AdaptiveLimit:
    """The process's limit for one endpoint and cap: every project's annotator (and the comparison judge)
    asking the same server shares it, so together they never hold more than ``cap`` requests."""
    key = (base_url.rstrip("/"), cap)
    with _SHARED_LOCK:
        limit = _SHARED.get(key)
        if limit is None:
            limit = AdaptiveLimit(cap)
            _SHARED[key] = limit
        return limit
