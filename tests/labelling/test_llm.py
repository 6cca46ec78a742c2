"""LLMAnnotator against a real HTTP server that speaks the OpenAI chat API and misbehaves on request."""

from __future__ import annotations

import math
import socket
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backend.labelling import llm as llm_module
from backend.labelling import prompts
from backend.labelling.llm import LabelMatcher, LLMAnnotator, LLMError, canonical, label_probability
from backend.labelling.llm_cache import ResponseCache
from tests.fault_server import (  # noqa: F401 - fault_server_fixture registers the `fault_server` fixture
    Action,
    FaultServer,
    answer,
    bad_request,
    fault_server_fixture,
    label,
    malformed,
    not_found,
    rate_limited,
    server_error,
    stall,
    unauthorized,
)

LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card"]
TEXTS = ["Where is my new card?", "How do I link my card?", "What rate do you use for euros?"]


def make(server: FaultServer, **options: Any) -> LLMAnnotator:
    """An annotator on ``server`` with tiny backoff, so retry tests cost milliseconds."""
    labels = options.pop("labels", LABELS)
    # logprobs on: most tests here exercise their handling (the annotator's default is off)
    settings: dict[str, Any] = {"concurrency": 1, "max_retries": 2, "backoff": 0.001, "timeout": 5.0, "logprobs": True}
    return LLMAnnotator(labels, base_url=server.url, **{**settings, **options})


def closed_port_url() -> str:
    """A base URL where nothing listens: bind a port, then release it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def user_text(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"]


def answer_by_text(mapping: dict[str, str], delay: float = 0.0):
    """A responder that labels each text from ``mapping`` (matched on the end of the user message)."""

    def respond(body: dict[str, Any]) -> Action:
        for text, name in mapping.items():
            if user_text(body).endswith(text):
                return label(name, delay=delay)
        return label("unknown-text", delay=delay)

    return respond


# -- strict parsing of answers ---------------------------------------------------------------------------
def test_valid_json_answer_gives_the_label(fault_server: FaultServer) -> None:
    fault_server.script(label("exchange_rate"))
    annotator = make(fault_server)

    [result] = annotator.zero_shot([TEXTS[2]])

    assert (result.label, result.valid, result.error, result.cached) == ("exchange_rate", True, None, False)
    assert result.raw == '{"label": "exchange_rate"}'
    assert annotator.stats.calls == 1 and annotator.stats.invalid == 0
    assert fault_server.request_count == 1


@pytest.mark.parametrize(
    "content",
    [
        '{"label": "refund_request"}',  # not in the set at all
        '{"label": "card_arival"}',  # one letter off: must not be mapped to card_arrival
        '{"label": "card"}',  # a prefix of several labels
        '{"label": 3}',
        '{"answer": "card_arrival"}',  # the right label under the wrong key
        "I think it is card_arrival",  # prose around a label
    ],
)
def test_answer_outside_the_label_set_is_invalid(fault_server: FaultServer, content: str) -> None:
    fault_server.script(answer(content))
    annotator = make(fault_server)

    [result] = annotator.zero_shot([TEXTS[0]])

    assert result.label is None and result.valid is False
    assert result.raw == content
    assert result.error is None  # the server answered; the answer is just unusable
    assert result.probability is None
    assert annotator.stats.invalid == 1


@pytest.mark.parametrize(
    ("content", "structured"),
    [
        ('{"label": "Card Arrival"}', "auto"),
        ('{"label": "card-arrival"}', "auto"),
        ("```json\n{\"label\": \"CARD_ARRIVAL\"}\n```", "auto"),
        ('"Card Arrival."', "none"),
        ("card arrival", "none"),
    ],
)
def test_canonical_form_matches_a_unique_label(fault_server: FaultServer, content: str, structured: str) -> None:
    fault_server.script(answer(content))
    annotator = make(fault_server, structured=structured)

    [result] = annotator.zero_shot([TEXTS[0]])

    assert result.label == "card_arrival" and result.valid


def test_labels_sharing_a_canonical_form_only_match_exactly(fault_server: FaultServer) -> None:
    labels = ["Card Arrival", "card_arrival", "exchange_rate"]
    fault_server.script(label("card arrival"), label("Card Arrival"), label("card_arrival"), label("Exchange Rate"))
    annotator = make(fault_server, labels=labels)

    results = annotator.zero_shot(["t1", "t2", "t3", "t4"])

    assert [r.label for r in results] == [None, "Card Arrival", "card_arrival", "exchange_rate"]
    assert annotator.stats.invalid == 1


def test_label_matcher_units() -> None:
    matcher = LabelMatcher(["Card Arrival", "card_arrival", "Top up"])
    assert canonical("  'Top-Up.' ") == "top up"
    assert matcher.match("TOP_UP") == "Top up"
    assert matcher.match("card arrival") is None  # ambiguous between two labels
    assert matcher.parse('{"label": "Card Arrival"}') == ("Card Arrival", "Card Arrival")
    assert matcher.parse('{"label": ["Top up"]}') == (None, '["Top up"]')
    assert matcher.parse("{not json") == (None, "{not json")


# -- retries -----------------------------------------------------------------------------------------
def test_rate_limit_then_success_is_retried(fault_server: FaultServer) -> None:
    fault_server.script(rate_limited(), rate_limited(), label("card_linking"))
    annotator = make(fault_server)

    [result] = annotator.zero_shot([TEXTS[1]])

    assert result.label == "card_linking" and result.error is None
    assert fault_server.request_count == 3
    assert annotator.stats.calls == 3 and annotator.stats.failures == 0


def test_retry_after_header_is_honoured(fault_server: FaultServer) -> None:
    fault_server.script(rate_limited(retry_after=0.4), label("card_linking"))
    annotator = make(fault_server, backoff=0.001)  # without the header the wait would be ~1 ms

    started = time.perf_counter()
    [result] = annotator.zero_shot([TEXTS[1]])
    elapsed = time.perf_counter() - started

    assert result.label == "card_linking"
    assert 0.4 <= elapsed < 0.4 * 1.25 + 1.0


def test_retry_after_is_kept_within_bounds(fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Record the waits instead of sleeping them: an hour-long Retry-After must be capped, and values that
    # time.sleep would reject (negative, nan) must not turn a retryable 429 into a failed item.
    waits: list[float] = []
    monkeypatch.setattr(llm_module, "time", SimpleNamespace(perf_counter=time.perf_counter, sleep=waits.append))
    fault_server.script(
        rate_limited(retry_after=3600), rate_limited(retry_after=-5), rate_limited(retry_after="nan"),
        label("exchange_rate"),
    )
    annotator = make(fault_server, max_retries=3, backoff=0.001)

    [result] = annotator.zero_shot([TEXTS[2]])

    assert result.label == "exchange_rate" and result.error is None
    assert len(waits) == 3
    assert 30.0 <= waits[0] <= 30.0 * 1.25
    assert all(math.isfinite(w) and 0.0 <= w <= 0.01 for w in waits[1:])


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_fail_the_item_and_the_run_goes_on(
    fault_server: FaultServer, tmp_path: Path, status: int
) -> None:
    max_retries = 2
    fault_server.script(*[server_error(status)] * (max_retries + 1))
    fault_server.default = label("card_linking")
    annotator = make(fault_server, max_retries=max_retries, cache_dir=tmp_path)

    first, second = annotator.zero_shot(["broken", "fine"])

    assert first.label is None and first.valid is False
    assert first.error is not None and "InternalServerError" in first.error
    assert second.label == "card_linking" and second.error is None
    assert annotator.stats.failures == 1 and annotator.stats.invalid == 0
    assert fault_server.request_count == max_retries + 2

    # A failure is not cached: the next run asks again.
    again = make(fault_server, cache_dir=tmp_path)
    assert again.zero_shot(["broken"])[0].label == "card_linking"
    assert fault_server.request_count == max_retries + 3


def test_timeouts_are_retried_then_fail_the_item(fault_server: FaultServer) -> None:
    fault_server.script(stall(5.0), stall(5.0))  # both attempts of the first item
    fault_server.default = label("card_arrival")
    annotator = make(fault_server, timeout=0.5, max_retries=1)

    started = time.perf_counter()
    slow, fast = annotator.zero_shot(["slow", "fast"])
    elapsed = time.perf_counter() - started

    assert slow.label is None and slow.error is not None and "Timeout" in slow.error
    assert fast.label == "card_arrival" and fast.error is None
    assert fault_server.request_count == 3
    assert elapsed < 3.0  # the client gave up; it did not wait for the stalled replies


def test_a_timeout_then_success_is_retried(fault_server: FaultServer) -> None:
    fault_server.script(stall(5.0), label("card_arrival"))
    annotator = make(fault_server, timeout=0.5, max_retries=1)

    [result] = annotator.zero_shot(["slow once"])

    assert result.label == "card_arrival" and result.error is None
    assert fault_server.request_count == 2


@pytest.mark.parametrize(
    "bad",
    [
        malformed(),  # truncated JSON, served as application/json
        malformed("<html>Bad Gateway</html>", content_type_json=False),
        malformed('{"choices": null}'),
        malformed("{}"),
        malformed('{"choices": []}'),
        malformed('{"choices": [{"message": null}]}'),
    ],
)
def test_malformed_bodies_are_retried(fault_server: FaultServer, bad: Action) -> None:
    fault_server.script(bad)
    fault_server.default = label("exchange_rate")
    annotator = make(fault_server)

    [result] = annotator.zero_shot([TEXTS[2]])

    assert result.label == "exchange_rate" and result.error is None
    assert fault_server.request_count == 2


def test_malformed_bodies_on_every_attempt_fail_the_item(fault_server: FaultServer) -> None:
    fault_server.default = malformed('{"choices": null}')
    annotator = make(fault_server, max_retries=1)

    [result] = annotator.zero_shot([TEXTS[0]])

    assert result.label is None and result.error is not None and "Malformed" in result.error
    assert fault_server.request_count == 2


def test_refused_credentials_raise(fault_server: FaultServer) -> None:
    fault_server.default = unauthorized()
    annotator = make(fault_server)

    with pytest.raises(LLMError, match="refused"):
        annotator.zero_shot(TEXTS)
    assert fault_server.request_count == 1  # a wrong key is not retried


def test_unknown_model_raises(fault_server: FaultServer) -> None:
    fault_server.default = not_found()
    annotator = make(fault_server, model="no-such-model")

    with pytest.raises(LLMError, match="no-such-model"):
        annotator.zero_shot(TEXTS[:1])


@pytest.mark.parametrize("concurrency", [1, 4])
def test_unreachable_server_raises(concurrency: int) -> None:
    annotator = LLMAnnotator(LABELS, base_url=closed_port_url(), concurrency=concurrency, max_retries=1,
                             backoff=0.001, timeout=2.0)

    with pytest.raises(LLMError, match="cannot reach"):
        annotator.zero_shot(TEXTS)


# -- servers without some features ----------------------------------------------------------------------
def rejects(feature: str, then: Action, *, delay: float = 0.0):
    """A server that answers 400 whenever the request carries ``feature``."""

    def respond(body: dict[str, Any]) -> Action:
        if feature in body:
            return Action(status=400, message=f"{feature} is not supported by this server", delay=delay)
        return then

    return respond


def test_a_server_rejecting_logprobs_is_used_without_them(fault_server: FaultServer) -> None:
    fault_server.default = rejects("logprobs", label("card_arrival"))
    annotator = make(fault_server, max_retries=0)  # dropping the feature must not use up a retry

    results = annotator.zero_shot(TEXTS)

    assert [r.label for r in results] == ["card_arrival"] * 3
    assert all(r.error is None and r.probability is None for r in results)
    assert annotator.logprobs is False
    assert ["logprobs" in body for body in fault_server.requests] == [True, False, False, False]
    assert ["top_logprobs" in body for body in fault_server.requests] == [True, False, False, False]
    assert fault_server.protocol_errors == 0


def test_a_server_rejecting_response_format_falls_back_to_plain_text(fault_server: FaultServer) -> None:
    fault_server.default = rejects("response_format", answer("card_linking"))
    annotator = make(fault_server, max_retries=0, structured="auto")

    results = annotator.zero_shot(TEXTS)

    assert [r.label for r in results] == ["card_linking"] * 3
    assert annotator.structured == "none"
    assert ["response_format" in body for body in fault_server.requests] == [True, False, False, False]


def test_a_server_rejecting_both_features_still_answers(fault_server: FaultServer) -> None:
    def respond(body: dict[str, Any]) -> Action:
        if "logprobs" in body:
            return bad_request("'logprobs' is not supported")
        if "response_format" in body:
            return bad_request("unknown field response_format")
        return answer("exchange_rate")

    fault_server.default = respond
    annotator = make(fault_server, max_retries=0)

    [result] = annotator.zero_shot([TEXTS[2]])

    assert result.label == "exchange_rate" and result.error is None
    assert fault_server.request_count == 3


def test_concurrent_requests_all_survive_the_response_format_fallback(fault_server: FaultServer) -> None:
    # The replies are held so that four requests with response_format are in flight when the first 400
    # arrives; the three that come back after the switch to plain text must be resent, not failed.
    fault_server.default = rejects("response_format", answer("card_linking"), delay=0.3)
    annotator = make(fault_server, concurrency=4, max_retries=0)

    results = annotator.zero_shot([f"text {i}" for i in range(8)])

    assert [r.error for r in results] == [None] * 8
    assert [r.label for r in results] == ["card_linking"] * 8


def test_explicit_structured_mode_is_not_dropped(fault_server: FaultServer) -> None:
    fault_server.default = rejects("response_format", answer("card_linking"))
    annotator = make(fault_server, structured="json_object")

    results = annotator.zero_shot(TEXTS[:2])

    assert all(r.label is None and r.error and "BadRequest" in r.error for r in results)
    assert annotator.structured == "json_object"
    assert all("response_format" in body for body in fault_server.requests)


def test_an_unrelated_bad_request_keeps_constrained_output(fault_server: FaultServer) -> None:
    fault_server.script(bad_request("This model's maximum context length is 2048 tokens"))
    fault_server.default = label("card_arrival")
    annotator = make(fault_server)

    too_long, fine = annotator.zero_shot(["a very long text", "short"])

    assert too_long.error is not None and too_long.label is None
    assert fine.label == "card_arrival"
    assert annotator.structured == "json_object"  # what auto settled on, kept
    assert "response_format" in fault_server.requests[-1]


# -- cache -------------------------------------------------------------------------------------------
def test_a_rerun_is_served_from_the_cache(fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = answer_by_text(dict(zip(TEXTS, LABELS, strict=False)))
    first = make(fault_server, cache_dir=tmp_path).zero_shot(TEXTS)
    assert fault_server.request_count == 3

    rerun = make(fault_server, cache_dir=tmp_path)
    again = rerun.zero_shot(TEXTS)

    assert fault_server.request_count == 3  # not one request more
    assert [a.label for a in again] == [a.label for a in first] == LABELS[:3]
    assert [a.probability for a in again] == [a.probability for a in first]
    assert all(a.cached for a in again)
    assert rerun.stats.cached == 3 and rerun.stats.calls == 0
    assert (tmp_path / "llm_responses.sqlite").is_file()


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},
        {"model": "another-model"},
        {"max_tokens": 16},
        {"seed": 1},
        {"logprobs": False},
        {"structured": "json_schema"},
        {"labels": LABELS[:3]},  # a different label set changes the system prompt
    ],
)
def test_different_parameters_miss_the_cache(
    fault_server: FaultServer, tmp_path: Path, change: dict[str, Any]
) -> None:
    make(fault_server, cache_dir=tmp_path).zero_shot(TEXTS)
    assert fault_server.request_count == 3

    changed = make(fault_server, cache_dir=tmp_path, **change)
    results = changed.zero_shot(TEXTS)

    assert fault_server.request_count == 6
    assert not any(r.cached for r in results)


def test_views_of_the_same_text_are_cached_separately(fault_server: FaultServer) -> None:
    annotator = make(fault_server)  # in-memory cache
    annotator.zero_shot(TEXTS[:1])
    annotator.zero_shot(TEXTS[:1])
    assert fault_server.request_count == 1

    annotator.hinted(TEXTS[:1], ["card_arrival"])
    assert fault_server.request_count == 2


# -- label probability from logprobs -------------------------------------------------------------------
JSON_TOKENS = [('{"', -0.0625), ("label", -1.0), ('":', -0.03125), (' "', -2.0), ("card", -0.5),
               ("_arr", -0.25), ("ival", -0.125), ('"}', -4.0)]


def test_label_probability_is_the_product_of_the_label_tokens() -> None:
    content = "".join(t for t, _ in JSON_TOKENS)
    assert label_probability(content, "card_arrival", JSON_TOKENS) == math.exp(-0.875)
    assert label_probability(content, "missing", JSON_TOKENS) is None
    assert label_probability(content, "card_arrival", []) is None


def test_label_probability_arrives_through_the_api(fault_server: FaultServer) -> None:
    fault_server.script(answer("".join(t for t, _ in JSON_TOKENS), JSON_TOKENS))
    annotator = make(fault_server)

    [result] = annotator.zero_shot(TEXTS[:1])

    assert result.label == "card_arrival"
    assert result.probability == math.exp(-0.5 + -0.25 + -0.125)
    # llama-cpp-python sends chat logprobs only when top_logprobs is set as well
    assert fault_server.requests[0]["logprobs"] is True and fault_server.requests[0]["top_logprobs"] == 1


def test_a_short_label_is_not_found_inside_the_json_key(fault_server: FaultServer) -> None:
    # "a" and "b" also occur in "label"; the probability must come from the value's token.
    tokens = [('{"', -1.0), ("label", -2.0), ('":', -0.5), (' "', -0.25), ("b", -0.125), ('"}', -0.0625)]
    fault_server.script(answer('{"label": "b"}', tokens))
    annotator = make(fault_server, labels=["a", "b", "c", "d"])

    [result] = annotator.zero_shot(["which option?"])

    assert result.label == "b" and result.probability == math.exp(-0.125)


def test_plain_text_answer_probability(fault_server: FaultServer) -> None:
    tokens = [("Card", -0.5), (" Ar", -0.25), ("rival", -0.125)]
    fault_server.script(answer("Card Arrival", tokens))
    annotator = make(fault_server, structured="none")

    [result] = annotator.zero_shot(TEXTS[:1])

    assert result.label == "card_arrival" and result.probability == math.exp(-0.875)


def test_no_probability_without_logprobs(fault_server: FaultServer) -> None:
    fault_server.script(label("card_arrival"))
    annotator = make(fault_server, logprobs=False)

    [result] = annotator.zero_shot(TEXTS[:1])

    assert result.label == "card_arrival" and result.probability is None
    assert "logprobs" not in fault_server.requests[0] and "top_logprobs" not in fault_server.requests[0]


# -- prompts and request shape ---------------------------------------------------------------------------
EXAMPLES = [[("My card has not come yet", "card_arrival"), ("Link card to app", "card_linking")]] * 2


def test_fixed_system_message_and_text_last(fault_server: FaultServer) -> None:
    annotator = make(fault_server, descriptions={"exchange_rate": "questions about currency rates"})
    texts = TEXTS[:2]

    annotator.zero_shot(texts)
    annotator.hinted(texts, ["card_arrival", "exchange_rate"])
    annotator.few_shot(texts, EXAMPLES, [["card_arrival", "card_linking"]] * 2)

    bodies = fault_server.requests
    assert len(bodies) == 6
    systems = {body["messages"][0]["content"] for body in bodies}
    assert systems == {prompts.system_prompt(LABELS, {"exchange_rate": "questions about currency rates"})}
    [system] = systems
    assert all(name in system for name in LABELS) and "questions about currency rates" in system
    assert not any(text in system for text in texts)
    for body, text in zip(bodies, texts * 3, strict=True):
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert user_text(body).endswith(f"Text: {text}")


def test_hinted_prompt_carries_the_hint(fault_server: FaultServer) -> None:
    annotator = make(fault_server)

    annotator.hinted(TEXTS[:1], ["lost_or_stolen_card"])
    annotator.zero_shot(TEXTS[:1])

    hinted, zero = (user_text(body) for body in fault_server.requests)
    assert '"lost_or_stolen_card"' in hinted
    assert "lost_or_stolen_card" not in zero


def test_few_shot_prompt_has_examples_and_candidates_restrict_the_schema(fault_server: FaultServer) -> None:
    annotator = make(fault_server, structured="json_schema")
    candidates = ["card_arrival", "card_linking"]

    annotator.few_shot(TEXTS[:1], EXAMPLES[:1], [candidates])
    annotator.few_shot(TEXTS[:1], EXAMPLES[:1])

    with_candidates, without = fault_server.requests
    message = user_text(with_candidates)
    for example_text, example_label in EXAMPLES[0]:
        assert f"Text: {example_text}\nLabel: {example_label}" in message
        assert message.index(example_text) < message.index(TEXTS[0])
    assert "card_arrival, card_linking" in message

    def enum(body: dict[str, Any]) -> list[str]:
        assert body["response_format"]["type"] == "json_schema"
        return body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]

    assert enum(with_candidates) == candidates
    assert enum(without) == LABELS


@pytest.mark.parametrize(
    ("structured", "expected_type"),
    [("auto", "json_object"), ("json_object", "json_object"), ("json_schema", "json_schema"), ("none", None)],
)
def test_response_format_per_mode(fault_server: FaultServer, structured: str, expected_type: str | None) -> None:
    annotator = make(fault_server, structured=structured)

    annotator.zero_shot(TEXTS[:1])

    body = fault_server.requests[0]
    assert body.get("response_format", {}).get("type") == expected_type
    if expected_type == "json_object":
        assert body["response_format"]["schema"]["properties"]["label"]["enum"] == LABELS
    assert (body["model"], body["temperature"], body["max_tokens"], body["seed"]) == ("local", 0.0, 64, 0)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        LLMAnnotator([], base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="structured"):
        LLMAnnotator(LABELS, base_url="http://127.0.0.1:9/v1", structured="xml")


# -- concurrency and stats ----------------------------------------------------------------------------
def test_requests_run_concurrently_and_keep_their_order(fault_server: FaultServer) -> None:
    texts = [f"item {i}" for i in range(8)]
    expected = [LABELS[i % 4] for i in range(8)]
    fault_server.default = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.3)
    annotator = make(fault_server, concurrency=4)
    ticks: list[int] = []

    started = time.perf_counter()
    results = annotator.zero_shot(texts, progress=lambda: ticks.append(1))
    elapsed = time.perf_counter() - started

    assert [r.label for r in results] == expected
    assert elapsed < 1.6  # one at a time would take 8 * 0.3 = 2.4 s
    assert 2 <= fault_server.max_in_flight <= 4
    assert len(ticks) == 8


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_same_question_twice_in_a_batch_is_asked_once(fault_server: FaultServer, concurrency: int) -> None:
    texts = ["item 0", "item 1", "item 0", "item 2", "item 1", "item 0"]  # duplicate tasks in one import
    fault_server.default = answer_by_text({"item 0": LABELS[0], "item 1": LABELS[1], "item 2": LABELS[2]})
    annotator = make(fault_server, concurrency=concurrency)
    ticks: list[int] = []

    results = annotator.zero_shot(texts, progress=lambda: ticks.append(1))

    assert [r.label for r in results] == [LABELS[i] for i in (0, 1, 0, 2, 1, 0)]
    assert fault_server.request_count == 3 and annotator.stats.calls == 3
    assert len(ticks) == len(texts)  # progress still counts every item
    assert results[0] is not results[2] and results[0] == results[2]  # equal answers, not one shared object


def labelled_texts(count: int) -> tuple[list[str], list[str]]:
    texts = [f"item {i}" for i in range(count)]
    return texts, [LABELS[i % len(LABELS)] for i in range(count)]


def test_never_more_in_flight_than_the_cap(fault_server: FaultServer) -> None:
    texts, expected = labelled_texts(80)
    # 200 ms per answer: CPU jitter on a busy machine (tens of ms) must not look like queueing in the server,
    # or the limit never grows to the cap and this test could not tell the cap from the start of 4.
    fault_server.default = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.2)
    annotator = make(fault_server, concurrency=6)

    results = annotator.zero_shot(texts)

    assert [r.label for r in results] == expected  # input order, whatever order the answers came in
    assert fault_server.max_in_flight == 6  # reached (it starts at 4 and the server keeps up), never passed
    assert annotator.limiter.snapshot().max_in_flight == 6


def test_in_flight_grows_past_its_start_when_the_server_keeps_up(fault_server: FaultServer) -> None:
    texts, expected = labelled_texts(300)
    fault_server.default = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.1)
    annotator = make(fault_server, concurrency=32)
    assert annotator.limiter.limit == 4

    results = annotator.zero_shot(texts)

    assert [r.label for r in results] == expected
    assert fault_server.max_in_flight >= 8  # at least one doubling; 32 on an idle machine
    assert annotator.limiter.snapshot().increases >= 1 and fault_server.max_in_flight <= 32


def test_backs_off_when_the_server_refuses_above_its_capacity() -> None:
    texts, expected = labelled_texts(200)
    responder = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.05)
    with FaultServer(default=responder, capacity=5) as server:
        annotator = make(server, concurrency=32, max_retries=8)

        results = annotator.zero_shot(texts)

    assert [r.label for r in results] == expected and all(r.error is None for r in results)
    snapshot = annotator.limiter.snapshot()
    assert server.refused >= 1 and snapshot.decreases >= 1  # it probed above 5 and was told
    # 32 fixed threads would be refused on 27 of every 32 requests; the limit keeps refusals rare
    assert server.refused < 0.25 * len(texts)


def test_a_single_slot_server_is_not_flooded() -> None:
    texts, expected = labelled_texts(60)
    responder = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.05)
    with FaultServer(default=responder, slots=1) as server:  # llama.cpp with one slot: the rest only queue
        annotator = make(server, concurrency=64)

        results = annotator.zero_shot(texts)

    assert [r.label for r in results] == expected
    assert server.max_in_flight <= 5  # latency grows with every request in flight, throughput does not
    assert annotator.limiter.snapshot().increases == 0


def test_annotators_on_one_endpoint_share_the_cap(fault_server: FaultServer) -> None:
    texts, expected = labelled_texts(60)
    fault_server.default = answer_by_text(dict(zip(texts, expected, strict=True)), delay=0.05)
    first, second = make(fault_server, concurrency=3), make(fault_server, concurrency=3)  # two projects
    results: dict[str, list] = {}
    threads = [threading.Thread(target=lambda n=name, a=ann: results.update({n: a.zero_shot(texts)}))
               for name, ann in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert first.limiter is second.limiter
    assert [r.label for r in results["first"]] == [r.label for r in results["second"]] == expected
    assert fault_server.max_in_flight <= 3


def test_a_busy_cache_costs_the_cached_answer_not_the_answer(fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = label("exchange_rate")
    annotator = make(fault_server, cache_dir=tmp_path)
    annotator.cache = ResponseCache(annotator.cache.path, timeout=0.1)  # fail fast instead of after 30 s
    other_process = sqlite3.connect(annotator.cache.path, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")  # another worker holds the write lock

    [result] = annotator.zero_shot([TEXTS[2]])
    other_process.execute("ROLLBACK")

    assert (result.label, result.error) == ("exchange_rate", None)  # answered, only not stored
    annotator.zero_shot([TEXTS[2]])
    assert fault_server.request_count == 2  # not stored, so asked again; stored this time
    assert annotator.zero_shot([TEXTS[2]])[0].cached and fault_server.request_count == 2


def test_stats_count_calls_tokens_and_time(fault_server: FaultServer) -> None:
    fault_server.script(
        rate_limited(),
        answer("".join(t for t, _ in JSON_TOKENS), JSON_TOKENS),
        answer("nonsense", [("non", -1.0), ("sense", -1.0)]),
    )
    annotator = make(fault_server)

    annotator.zero_shot(TEXTS[:2])

    stats = annotator.stats.as_dict()
    assert stats["calls"] == 3 and stats["invalid"] == 1 and stats["failures"] == 0
    # usage as the server reported it: 7 prompt tokens per reply, one completion token per listed token
    assert stats["prompt_tokens"] == 2 * 7
    assert stats["completion_tokens"] == len(JSON_TOKENS) + 2
    assert stats["seconds"] > 0
    assert "_lock" not in stats


# -- check() -----------------------------------------------------------------------------------------
def test_check_passes_on_a_working_server(fault_server: FaultServer) -> None:
    make(fault_server).check()
    assert ("GET", "/v1/models") in fault_server.paths


def test_check_raises_on_a_closed_port() -> None:
    annotator = LLMAnnotator(LABELS, base_url=closed_port_url())
    with pytest.raises(LLMError, match="cannot reach"):
        annotator.check()


def test_check_raises_on_refused_credentials(fault_server: FaultServer) -> None:
    fault_server.models_action = unauthorized()
    with pytest.raises(LLMError, match="API key"):
        make(fault_server).check()


def test_check_tolerates_a_server_without_models_endpoint(fault_server: FaultServer) -> None:
    fault_server.models_action = not_found()
    make(fault_server).check()
    assert fault_server.paths == [("GET", "/v1/models")]


@pytest.mark.parametrize("structured", ["grammar", "choice"])
def test_label_only_modes_send_the_label_set_and_parse_a_bare_label(
    fault_server: FaultServer, structured: str
) -> None:
    fault_server.script(answer("exchange_rate"))
    annotator = make(fault_server, structured=structured)

    [result] = annotator.few_shot(TEXTS[2:], [[("a text", "card_arrival")]], [["exchange_rate", "card_linking"]])

    assert (result.label, result.valid) == ("exchange_rate", True)
    body = fault_server.requests[0]
    assert "response_format" not in body
    assert prompts.LABEL_ONLY_FORMAT in body["messages"][0]["content"]
    assert "JSON" not in body["messages"][0]["content"]
    if structured == "grammar":
        assert body["grammar"] == 'root ::= "exchange_rate" | "card_linking"'
    else:
        assert body["guided_choice"] == ["exchange_rate", "card_linking"]


def test_gbnf_choice_escapes_quotes_backslashes_and_newlines() -> None:
    grammar = llm_module.gbnf_choice(['say "hi"', "back\\slash", "two\nlines"])
    assert grammar == 'root ::= "say \\"hi\\"" | "back\\\\slash" | "two\\nlines"'


# -- the choice view and the fast defaults --------------------------------------------------------------
from tests.fault_server import ranked  # noqa: E402


def test_auto_mode_uses_a_grammar_on_llama_cpp_servers(fault_server: FaultServer) -> None:
    fault_server.owned_by = "me"  # llama-cpp-python's model list
    fault_server.default = answer("card_arrival")
    annotator = LLMAnnotator(LABELS, base_url=fault_server.url)  # every default
    assert annotator.zero_shot(TEXTS[:1])[0].label == "card_arrival"
    body = fault_server.requests[0]
    assert "grammar" in body and "response_format" not in body
    assert prompts.LABEL_ONLY_FORMAT in body["messages"][0]["content"]
    assert "logprobs" not in body  # the label views do not ask for logprobs by default


def test_auto_mode_keeps_json_elsewhere(fault_server: FaultServer) -> None:
    fault_server.default = label("card_arrival")
    annotator = make(fault_server, structured="auto")
    annotator.zero_shot(TEXTS[:1])
    assert fault_server.requests[0]["response_format"]["type"] == "json_object"


def test_choice_view_scores_every_candidate_from_the_alternatives(fault_server: FaultServer) -> None:
    # "card_linking" is chosen; at the first token "card" is shared by two candidates, at the second token
    # "_arrival" is the alternative to "_linking"; "exchange_rate" leaves at the first token.
    fault_server.default = ranked(
        "card_linking", [("card", math.log(0.8)), ("_linking", math.log(0.75))],
        [[("card", math.log(0.8)), ("exchange", math.log(0.2))],
         [("_linking", math.log(0.75)), ("_arrival", math.log(0.25))]])
    annotator = make(fault_server, structured="grammar")
    [got] = annotator.choose(["How do I link my card?"], [["card_arrival", "card_linking", "exchange_rate"]])
    body = fault_server.requests[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert "card_arrival" in user_text(body) and "lost_or_stolen_card" not in user_text(body)
    assert got.label == "card_linking"
    assert got.distribution == pytest.approx({"card_linking": 0.6, "card_arrival": 0.2, "exchange_rate": 0.2})
    assert got.probability == pytest.approx(0.6)


def test_choice_view_without_logprobs_knows_the_chosen_label_only(fault_server: FaultServer) -> None:
    fault_server.default = label("exchange_rate")
    annotator = make(fault_server, structured="json_object")
    annotator.logprobs_rejected = True
    [got] = annotator.choose(["rate?"], [["card_arrival", "exchange_rate"]])
    assert got.label == "exchange_rate" and got.distribution is None
    assert "logprobs" not in fault_server.requests[0]
    assert fault_server.requests[0]["response_format"]["schema"]["properties"]["label"]["enum"] == [
        "card_arrival", "exchange_rate"]


def test_choice_answer_outside_the_candidates_is_invalid(fault_server: FaultServer) -> None:
    fault_server.default = answer("lost_or_stolen_card")
    annotator = make(fault_server, structured="none")
    [got] = annotator.choose(["lost it"], [["card_arrival", "exchange_rate"]])
    assert got.label is None and not got.valid and got.raw == "lost_or_stolen_card"


def test_choice_view_skips_logprobs_on_llama_cpp(fault_server: FaultServer) -> None:
    # llama.cpp computes logits for every prompt token once logprobs are asked: twice the time per call
    fault_server.owned_by = "llamacpp"
    fault_server.default = answer("card_linking")
    annotator = LLMAnnotator(LABELS, base_url=fault_server.url)
    [got] = annotator.choose(["link?"], [["card_arrival", "card_linking"]])
    assert got.label == "card_linking" and got.distribution is None
    assert "logprobs" not in fault_server.requests[0] and "grammar" in fault_server.requests[0]
    forced = LLMAnnotator(LABELS, base_url=fault_server.url, choice_logprobs=True)
    forced.choose(["link?"], [["card_arrival", "card_linking"]])
    assert fault_server.requests[-1]["top_logprobs"] == 20
