"""LLMAnnotator against a real llama.cpp server on SmolLM2-135M (the ``llm_server`` fixture).

A 135M model classifies poorly; these tests check the protocol and the flow (constrained output, logprobs,
token counts, caching), not the accuracy of its labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from backend.labelling.llm import LLMAnnotator, LLMAnswer

pytestmark = pytest.mark.llm

LABELS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up"]
TEXTS = [
    "I ordered a new card two weeks ago and it still has not arrived.",
    "Which exchange rate do you apply when I pay in dollars?",
    "Someone stole my wallet with my card in it.",
]
HINTS = ["card_arrival", "top_up", "lost_or_stolen_card"]
EXAMPLES = [
    [("My card is still not here", "card_arrival"), ("How do I add money?", "top_up")],
    [("What is the euro rate today?", "exchange_rate")],
    [("I lost my card", "lost_or_stolen_card"), ("My card never came", "card_arrival")],
]
CANDIDATES = [["card_arrival", "top_up"], ["exchange_rate", "top_up"], ["lost_or_stolen_card", "card_arrival"]]


def make(base_url: str, cache_dir: Path, **options: object) -> LLMAnnotator:
    settings = {"concurrency": 2, "timeout": 120.0, "max_tokens": 32, "max_retries": 1, "logprobs": True}
    return LLMAnnotator(LABELS, base_url=base_url, cache_dir=cache_dir, **{**settings, **options})


def assert_well_formed(answers: Sequence[LLMAnswer], allowed: Sequence[str] = LABELS) -> None:
    """Each answer is a label of the set, or an invalid answer that keeps what the model said."""
    assert len(answers) == len(TEXTS)
    for answer in answers:
        assert answer.error is None, answer.error
        if answer.valid:
            assert answer.label in allowed
        else:
            assert answer.label is None and answer.raw.strip()
        if answer.probability is not None:
            assert 0.0 < answer.probability <= 1.0


def run_views(annotator: LLMAnnotator) -> list[list[LLMAnswer]]:
    return [
        annotator.zero_shot(TEXTS),
        annotator.hinted(TEXTS, HINTS),
        annotator.few_shot(TEXTS, EXAMPLES, CANDIDATES),
    ]


def test_three_views_with_constrained_output_then_a_cached_rerun(llm_server: str, tmp_path: Path) -> None:
    annotator = make(llm_server, tmp_path)
    annotator.check()

    views = run_views(annotator)

    for answers in views:
        assert_well_formed(answers)
    # The schema enum is enforced by llama.cpp's grammar, so the model cannot leave the set here;
    # an all-invalid run would mean response_format was silently ignored or dropped.
    everything = [a for answers in views for a in answers]
    assert any(a.valid for a in everything)
    assert annotator.structured == "grammar"  # what "auto" settles on for a llama.cpp server
    # llama.cpp returns token logprobs (given top_logprobs), so every valid answer gets a probability.
    assert all(a.probability is not None and 0.0 < a.probability <= 1.0 for a in everything if a.valid)

    stats = annotator.stats
    assert stats.calls >= 9 and stats.failures == 0 and stats.cached == 0
    assert stats.prompt_tokens > 9 * 20  # the system prompt alone is longer than 20 tokens
    assert stats.completion_tokens >= 9
    assert stats.seconds > 0

    # A second annotator on the same cache directory sends nothing and gives the same answers.
    rerun = make(llm_server, tmp_path)
    replayed = [a for answers in run_views(rerun) for a in answers]
    assert rerun.stats.calls == 0 and rerun.stats.cached == 9
    assert all(a.cached for a in replayed)
    assert [(a.label, a.raw, a.probability) for a in replayed] == [
        (a.label, a.raw, a.probability) for a in everything
    ]


def test_plain_text_answers_are_parsed_strictly(llm_server: str, tmp_path: Path) -> None:
    annotator = make(llm_server, tmp_path, structured="none", logprobs=False)

    answers = annotator.zero_shot(TEXTS)

    assert_well_formed(answers)
    assert all(a.probability is None for a in answers)
    assert annotator.stats.invalid == sum(not a.valid for a in answers)
