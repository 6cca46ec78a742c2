"""The pairwise LLM judge (backend.annotators.judge): a fault server for scripted answers and failures, and the real
llama.cpp server (SmolLM2) for the protocol with token logprobs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from backend.annotators.judge import PairwiseJudge, option_probabilities
from tests.fault_server import (  # noqa: F401 - fault_server_fixture registers the `fault_server` fixture
    Action,
    FaultServer,
    answer,
    fault_server_fixture,
    label,
    server_error,
)

PROMPTS = ["What is the capital of France?", "Say hello politely."]
GOOD = ["Paris is the capital of France.", "Hello, nice to meet you!"]
BAD = ["The capital of France is Berlin.", "Go away."]
CHOSEN = math.exp(-0.05)  # the fault server's probability of a one-token answer


def make(server: FaultServer, **options: Any) -> PairwiseJudge:
    settings: dict[str, Any] = {"concurrency": 1, "max_retries": 0, "backoff": 0.001, "timeout": 5.0}
    return PairwiseJudge(base_url=server.url, **{**settings, **options})


def first_response(body: dict[str, Any]) -> str:
    text = body["messages"][-1]["content"]
    return text.split("Response 1:\n", 1)[1].split("\n\nResponse 2:", 1)[0]


def prefers_good(body: dict[str, Any]) -> Action:
    """A judge that reads the responses: it names whichever one is in GOOD."""
    return label("1" if first_response(body) in GOOD else "2")


def test_both_orders_are_asked_and_a_consistent_judge_is_confident(fault_server: FaultServer) -> None:
    fault_server.default = prefers_good
    verdicts = make(fault_server).judge(PROMPTS, [GOOD[0], BAD[1]], [BAD[0], GOOD[1]])
    assert [v.selected for v in verdicts] == ["left", "right"]
    assert verdicts[0].p_left == pytest.approx(CHOSEN)
    assert verdicts[1].p_left == pytest.approx(1 - CHOSEN)
    assert all(v.confidence == pytest.approx(2 * CHOSEN - 1) and v.source == "chosen_only" for v in verdicts)
    shown_first = [first_response(body) for body in fault_server.requests]
    assert shown_first == [GOOD[0], BAD[0], BAD[1], GOOD[1]]  # each pair in both orders
    assert all(body["top_logprobs"] == 5 for body in fault_server.requests)


def test_a_judge_that_always_names_the_first_response_has_no_confidence(fault_server: FaultServer) -> None:
    fault_server.default = label("1")
    (verdict,) = make(fault_server).judge(PROMPTS[:1], GOOD[:1], BAD[:1])
    assert verdict.p_left == pytest.approx(0.5)
    assert verdict.confidence == pytest.approx(0.0, abs=1e-12)
    assert verdict.selected is None
    assert verdict.p_left_by_order == pytest.approx((CHOSEN, 1 - CHOSEN))


def test_without_logprobs_the_orders_vote(fault_server: FaultServer) -> None:
    def no_logprobs(body: dict[str, Any]) -> Action:
        if "logprobs" in body:
            return Action(status=400, message="logprobs is not supported by this server")
        return prefers_good(body)

    fault_server.default = no_logprobs
    verdicts = make(fault_server).judge(PROMPTS, [GOOD[0], BAD[1]], [BAD[0], GOOD[1]])
    assert [(v.p_left, v.confidence, v.source) for v in verdicts] == [(1.0, 1.0, "votes"), (0.0, 1.0, "votes")]


def test_a_failed_order_leaves_the_other_and_two_failures_leave_no_verdict(fault_server: FaultServer) -> None:
    fault_server.script(server_error(500))  # the first request (left shown first) fails for good
    fault_server.default = prefers_good
    (one,) = make(fault_server).judge(PROMPTS[:1], GOOD[:1], BAD[:1])
    assert one.p_left_by_order[0] is None and one.p_left == pytest.approx(CHOSEN)
    assert one.errors and "InternalServerError" in one.errors[0]

    fault_server.default = server_error(503)
    (none,) = make(fault_server).judge(PROMPTS[1:], GOOD[1:], BAD[1:])
    assert none.p_left is None and none.confidence == 0.0 and none.source == "failed" and len(none.errors) == 2


def test_an_answer_outside_the_options_counts_as_a_failed_order(fault_server: FaultServer) -> None:
    fault_server.default = answer('{"label": "both"}')
    (verdict,) = make(fault_server, structured="json_object").judge(PROMPTS[:1], GOOD[:1], BAD[:1])
    assert verdict.p_left is None and all("outside 1/2" in e for e in verdict.errors)


def test_empty_responses_get_no_verdict_and_cost_no_call(fault_server: FaultServer) -> None:
    (verdict,) = make(fault_server).judge(["prompt"], ["  "], ["an answer"])
    assert verdict.p_left is None and verdict.errors == ["empty response"]
    assert fault_server.request_count == 0
    with pytest.raises(ValueError, match="differ in length"):
        make(fault_server).judge(["a", "b"], ["x"], ["y"])


def test_a_rerun_is_served_from_the_cache(fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = prefers_good
    first = make(fault_server, cache_dir=tmp_path).judge(PROMPTS, GOOD, BAD)
    again = make(fault_server, cache_dir=tmp_path)
    second = again.judge(PROMPTS, GOOD, BAD)
    assert fault_server.request_count == 4
    assert again.stats.cached == 4 and [v.p_left for v in second] == [v.p_left for v in first]


def test_option_probabilities_renormalise_the_two_options_at_the_answer_token() -> None:
    content = '{"label": "1"}'
    tokens = [('{"', -0.1), ("label", -0.1), ('":', -0.1), (' "', -0.1), ("1", math.log(0.3)), ('"}', -0.1)]
    top = [[(t, lp)] for t, lp in tokens]
    top[4] = [("1", math.log(0.3)), ("2", math.log(0.2)), ("The", math.log(0.4))]
    assert option_probabilities(content, tokens, top) == pytest.approx({"1": 0.3, "2": 0.2})
    # "1" inside the key must not be taken for the answer, and a missing option is bounded by the last listed
    top[4] = [("1", math.log(0.3)), ("The", math.log(0.1))]
    assert option_probabilities(content, tokens, top) == pytest.approx({"1": 0.3, "2": 0.1})
    assert option_probabilities(content, tokens, [[]] * len(tokens)) is None
    assert option_probabilities("2", [("2", -0.5)], [[("2", -0.5), ("1", -1.5)]]) == pytest.approx(
        {"2": math.exp(-0.5), "1": math.exp(-1.5)})


@pytest.mark.llm
def test_real_llama_cpp_server_gives_probabilities_from_both_orders(llm_server: str, tmp_path: Path) -> None:
    judge = PairwiseJudge(base_url=llm_server, structured="grammar", concurrency=2, timeout=120.0, max_retries=1,
                          cache_dir=tmp_path)
    verdicts = judge.judge(PROMPTS[:1], GOOD[:1], BAD[:1])  # one pair, two calls: SmolLM2 on CPU is slow
    assert judge.stats.calls == 2 and judge.stats.failures == 0
    for verdict in verdicts:
        assert verdict.source == "logprobs", verdict  # llama.cpp returns the alternatives at the answer token
        assert 0.0 <= verdict.p_left <= 1.0
        assert verdict.confidence == pytest.approx(2 * abs(verdict.p_left - 0.5))
        assert all(p is not None and 0.0 < p < 1.0 for p in verdict.p_left_by_order)
    again = PairwiseJudge(base_url=llm_server, structured="grammar", cache_dir=tmp_path)
    assert [v.p_left for v in again.judge(PROMPTS[:1], GOOD[:1], BAD[:1])] == [v.p_left for v in verdicts]
    assert again.stats.calls == 0 and again.stats.cached == 2
