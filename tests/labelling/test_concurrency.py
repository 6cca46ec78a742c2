"""The adaptive concurrency limit, driven by simulated endpoints on a simulated clock (known truth: each
endpoint's best number of requests in flight)."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from backend.labelling.concurrency import AdaptiveLimit, Token, endpoint_limit, vegas_thresholds


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Endpoint:
    """Answers a request sent at ``now`` with (finish time, outcome), given how many it is serving."""

    respond: Callable[[float, int], tuple[float, str]]
    serving: int = 0


def unlimited(latency: float) -> Endpoint:
    return Endpoint(lambda now, serving: (now + latency, "ok"))


def slots(count: int, service: float) -> Endpoint:
    """``count`` requests served at once, the others queued for the first free slot (llama-cpp-python's server
    is ``slots(1, ...)``; llama-server -np N, vLLM with --max-num-seqs N at a fixed step time)."""
    free_at = [0.0] * count

    def respond(now: float, serving: int) -> tuple[float, str]:
        finish = max(now, heapq.heappop(free_at)) + service
        heapq.heappush(free_at, finish)
        return finish, "ok"

    return Endpoint(respond)


def refusing_above(capacity: int, latency: float) -> Endpoint:
    """Serves ``capacity`` at once at a fixed latency; one more is refused at once (429)."""
    return Endpoint(lambda now, serving: (now + 0.001, "overload") if serving >= capacity else (now + latency, "ok"))


@dataclass
class Trace:
    limits: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    overloads: int = 0
    answered: int = 0


def drive(limit: AdaptiveLimit, clock: Clock, endpoint: Endpoint, requests: int) -> Trace:
    """A closed loop: every free slot sends the next request until ``requests`` have been answered (refused
    requests are sent again), as the annotator's threads do."""
    trace, pending, in_flight, seq = Trace(), [], 0, 0
    while trace.answered < requests:
        while in_flight < limit.limit and trace.answered + in_flight < requests:
            token = limit.acquire()
            finish, outcome = endpoint.respond(clock.now, endpoint.serving)
            endpoint.serving += outcome == "ok"
            in_flight += 1
            seq += 1
            heapq.heappush(pending, (finish, seq, token, outcome))
            trace.in_flight.append(in_flight)
        finish, _, token, outcome = heapq.heappop(pending)
        clock.now = finish
        in_flight -= 1
        endpoint.serving -= outcome == "ok"
        limit.release(token, outcome)
        trace.answered += outcome == "ok"
        trace.overloads += outcome == "overload"
        trace.limits.append(limit.limit)
    return trace


def test_grows_to_the_cap_on_an_endpoint_that_keeps_up() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=4, clock=clock)

    trace = drive(limit, clock, unlimited(0.3), 2000)

    assert limit.limit == 64 and max(trace.in_flight) == 64
    # slow start: 4 -> 8 -> 16 -> 32 -> 64 within a few windows, not one step per window
    assert trace.limits.index(64) < 4 + 8 + 16 + 32 + 10


def test_never_more_in_flight_than_the_cap() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=10, start=4, clock=clock)

    trace = drive(limit, clock, unlimited(0.1), 500)

    assert max(trace.in_flight) == 10 and limit.snapshot().max_in_flight == 10


@pytest.mark.parametrize("start", [1, 2, 4])
def test_a_single_slot_server_is_not_flooded(start: int) -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=start, clock=clock)

    trace = drive(limit, clock, slots(1, 0.5), 300)

    # every request beyond the first only queues: the limit never grows past where it started (or 2 from 1)
    assert max(trace.limits) <= max(start, 2)
    assert max(trace.in_flight) <= max(start, 2)


def test_a_single_slot_server_brings_a_high_limit_down() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=32, clock=clock)

    trace = drive(limit, clock, slots(1, 0.5), 1500)

    assert trace.limits[-1] <= 8 < 32  # the queue estimate q = limit - 1 stays above beta until the limit is small


def test_backs_off_on_refusals_and_settles_near_the_capacity() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=4, clock=clock)

    trace = drive(limit, clock, refusing_above(12, 0.3), 3000)

    assert trace.answered == 3000
    tail = trace.limits[len(trace.limits) // 2:]
    assert max(tail) <= 13  # one above the capacity at most, before the refusal that brings it down
    assert sum(tail) / len(tail) >= 0.7 * 12  # backs off to 0.7x, not to 1
    assert trace.overloads < 0.05 * trace.answered


def test_one_burst_of_refusals_is_one_decrease() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=20, clock=clock)
    tokens = [limit.acquire() for _ in range(20)]
    clock.now = 0.01
    for token in tokens:  # all twenty sent before the first refusal came back
        limit.release(token, "overload")

    assert limit.limit == 14  # 20 * 0.7 once, not 20 * 0.7 ** 20
    later = limit.acquire()
    clock.now = 0.02
    limit.release(later, "overload")
    assert limit.limit == 9  # a request sent after the decrease can cause the next one


def test_other_failures_teach_nothing() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=8, clock=clock)
    for _ in range(50):
        token = limit.acquire()
        clock.now += 0.1
        limit.release(token, "other")  # e.g. a malformed body: says nothing about load

    assert limit.limit == 8 and limit.snapshot().decreases == 0


def test_a_small_batch_does_not_grow_the_limit() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=4, clock=clock)
    for _ in range(40):  # 2 at a time, never the 4 allowed
        tokens = [limit.acquire(), limit.acquire()]
        clock.now += 0.3
        for token in tokens:
            limit.release(token, "ok")

    assert limit.limit == 4


def test_waiting_threads_get_a_slot_when_one_is_released() -> None:
    limit = AdaptiveLimit(cap=2, start=1)
    first = limit.acquire()
    got: list[Token] = []
    waiter = threading.Thread(target=lambda: got.append(limit.acquire()))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # the limit is 1 and the slot is taken

    limit.release(first, "other")
    waiter.join(timeout=5)
    assert len(got) == 1 and limit.snapshot().in_flight == 1


def test_vegas_thresholds_grow_with_the_limit() -> None:
    assert vegas_thresholds(1) == (1.0, 2.0)
    low, high = vegas_thresholds(64)
    assert 5 < low < high < 11


def test_one_limit_per_endpoint_and_cap() -> None:
    shared = endpoint_limit("http://llm.test/v1", 16)

    assert endpoint_limit("http://llm.test/v1/", 16) is shared
    assert endpoint_limit("http://llm.test/v1", 8) is not shared
    assert endpoint_limit("http://other.test/v1", 16) is not shared


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimit(cap=0)
    with pytest.raises(ValueError):
        AdaptiveLimit(cap=4, start=0)


def test_only_requests_alone_in_flight_raise_the_baseline() -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=4, clock=clock)
    for _ in range(3):  # one at a time: the endpoint's unloaded latency is 0.3 s
        token = limit.acquire()
        clock.now += 0.3
        limit.release(token, "ok")
    assert limit.snapshot().base_latency == pytest.approx(0.3)

    first, second = limit.acquire(), limit.acquire()  # two together, slower: queueing, not a new baseline
    clock.now += 0.9
    limit.release(first, "ok")
    limit.release(second, "ok")
    assert limit.snapshot().base_latency == pytest.approx(0.3)

    token = limit.acquire()  # alone and slower (e.g. longer prompts now): the baseline moves halfway
    clock.now += 0.9
    limit.release(token, "ok")
    assert limit.snapshot().base_latency == pytest.approx(0.6)


def test_many_threads_all_get_through_and_never_exceed_the_limit() -> None:
    limit = AdaptiveLimit(cap=6, start=2)
    peak, lock, done = [0], threading.Lock(), []

    def work() -> None:
        for _ in range(20):
            token = limit.acquire()
            with lock:
                peak[0] = max(peak[0], limit.snapshot().in_flight)
            threading.Event().wait(0.001)
            limit.release(token, "ok")
        done.append(1)

    threads = [threading.Thread(target=work) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(done) == 40  # no thread left waiting for a wake-up that never came
    assert peak[0] <= 6 and limit.snapshot().in_flight == 0


@pytest.mark.parametrize("count", [4, 16])
def test_a_server_with_several_slots_is_kept_busy_with_a_short_queue(count: int) -> None:
    clock = Clock()
    limit = AdaptiveLimit(cap=64, start=4, clock=clock)

    trace = drive(limit, clock, slots(count, 0.5), 3000)

    assert trace.answered / clock.now >= 0.95 * count / 0.5  # every slot busy: the server's full rate
    assert max(trace.limits[len(trace.limits) // 2:]) <= 2 * count  # at most as many waiting as served
