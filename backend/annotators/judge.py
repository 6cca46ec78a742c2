"""A weak LLM as a pairwise judge, with a confidence per pair (CW-PO).

Afzali, Jeon and Brbic, "When Weak LLMs Speak with Confidence, Preference Alignment Gets Stronger"
(CW-PO), ICLR 2026, arXiv:2603.04968: a small LLM's preference labels help alignment when each pair is
weighted by the LLM's confidence.

For each pair the LLM is asked which response is better twice, once in each order, so that a habit of
preferring the first (or the second) position cancels out. Each order gives a probability that the left
response is better:

* from token logprobs, when the server returns the top alternatives at the answer token: the
  probabilities of "1" and "2" there, renormalised over the two (source ``logprobs``);
* when it returns only the chosen token's probability ``q``: ``max(q, 1/2)`` for the chosen side, a lower
  bound of its share of the two options (source ``chosen_only``);
* without logprobs: 1 for the chosen side (source ``votes``).

``p_left`` is the mean over the orders that answered, and the confidence ``C = 2 |p_left - 1/2|``: 0 when
the orders disagree or the LLM is unsure, 1 when both orders are certain and agree. In the attentiveness
EM, ``p_left`` can be each item's prior (:class:`backend.annotators.attentiveness.PairwiseAttentiveness`, ``judge=``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.labelling.llm import LLMAnnotator, LLMAnswer, canonical

log = logging.getLogger(__name__)

OPTIONS = ("1", "2")
MAX_CHARS = 4000  # per text shown to the LLM; longer prompts and responses are cut
TOP_LOGPROBS = 5  # alternatives asked for at each token: enough to see both options at the answer token

SYSTEM = (
    "You compare two responses to the same prompt and decide which one is better: more helpful, more "
    "correct and clearer for the person who wrote the prompt. Judge the content only; the order in which "
    "the responses are shown and their length do not matter."
)
JSON_FORMAT = ('Reply with {"label": "1"} if Response 1 is better or {"label": "2"} if Response 2 is better, '
               "and nothing else.")
BARE_FORMAT = "Reply with 1 if Response 1 is better or 2 if Response 2 is better, and nothing else."


def pair_message(prompt: str, first: str, second: str) -> str:
    return (f"Prompt:\n{prompt[:MAX_CHARS]}\n\nResponse 1:\n{first[:MAX_CHARS]}\n\n"
            f"Response 2:\n{second[:MAX_CHARS]}\n\nWhich response is better, 1 or 2?")


@dataclass
class JudgeAnswer(LLMAnswer):
    """An answer with the probability of each option at the answer token, when the server gave them."""

    options: dict[str, float] | None = None


@dataclass
class JudgeVerdict:
    """The judge's view of one pair."""

    p_left: float | None  # P(left response is better); None when neither order answered
    confidence: float  # 2 |p_left - 1/2|, 0 without an answer
    selected: str | None  # "left", "right", or None when p_left is 1/2 or unknown
    p_left_by_order: tuple[float | None, float | None]  # (left shown first, right shown first)
    source: str  # "logprobs", "chosen_only", "votes" or "failed" (the weakest of the two orders)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"p_left": self.p_left, "confidence": self.confidence, "selected": self.selected,
                "p_left_first": self.p_left_by_order[0], "p_left_second": self.p_left_by_order[1],
                "source": self.source, "errors": list(self.errors)}


def option_probabilities(content: str, tokens: Sequence[tuple[str, float]],
                         top: Sequence[Sequence[tuple[str, float]]]) -> dict[str, float] | None:
    """Probabilities of "1" and "2" at the token that holds the answer, from its top alternatives.

    The answer token is the first one after the ``"label"`` key (JSON replies) or the first one (bare
    replies) whose text is an option. Returns None when that token or its alternatives are missing.
    """
    if not tokens or len(top) != len(tokens):
        return None
    key = content.find('"label"')
    start = key + len('"label"') if key >= 0 else 0
    position = 0
    for (token, _), alternatives in zip(tokens, top, strict=True):
        position += len(token)
        if position <= start or canonical(token) not in OPTIONS:
            continue
        found: dict[str, float] = {}
        for text, logprob in alternatives:
            name = canonical(text)
            if name in OPTIONS:
                found[name] = found.get(name, 0.0) + math.exp(logprob)
        if not found:
            return None
        if len(found) == 1:  # the other option is below the last alternative listed
            floor = min(math.exp(lp) for _, lp in alternatives)
            missing = OPTIONS[1 - OPTIONS.index(next(iter(found)))]
            found[missing] = floor
        return found
    return None


class _JudgeClient(LLMAnnotator):
    """The LLM annotator's transport (cache, retries, constrained output) with the judge's prompt and
    the top alternatives of each token kept in the response."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("logprobs", True)  # the judge's confidence is read from the two options' logprobs
        super().__init__(list(OPTIONS), **options)

    def _system_prompt(self, *, json_answer: bool) -> str:
        return f"{SYSTEM}\n{JSON_FORMAT if json_answer else BARE_FORMAT}"

    def ask(self, user_messages: Sequence[str], *, progress=None) -> list[JudgeAnswer]:
        return self._run(list(user_messages), [None] * len(user_messages), progress)

    def _request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        request = super()._request(*args, **kwargs)
        if "top_logprobs" in request:
            request["top_logprobs"] = TOP_LOGPROBS
        return request

    def _parse_completion(self, completion: Any) -> dict[str, Any]:
        parsed = super()._parse_completion(completion)
        try:
            content = completion.choices[0].logprobs.content or []
            parsed["top"] = [[(alt.token, float(alt.logprob)) for alt in (t.top_logprobs or [])] for t in content]
        except (AttributeError, LookupError, TypeError, ValueError):
            parsed["top"] = []
        return parsed

    def _interpret(self, response: dict[str, Any], *, cached: bool, choice: Any = None) -> JudgeAnswer:
        answer = super()._interpret(response, cached=cached)
        tokens = [tuple(t) for t in response.get("logprobs") or []]
        top = [[tuple(a) for a in alts] for alts in response.get("top") or []]
        options = option_probabilities(answer.raw, tokens, top) if answer.valid and any(top) else None
        return JudgeAnswer(**vars(answer), options=options)


class PairwiseJudge:
    """Which of two responses is better, asked of an LLM in both orders (module docstring: the method).

    Options are those of :class:`backend.labelling.llm.LLMAnnotator` (``base_url``, ``model``, ``api_key``,
    ``cache_dir``, ``concurrency``, ``timeout``, ``max_retries``, ``structured``, ``logprobs``, ...).
    Answers are cached on disk like the annotator's, so a re-run costs no calls.
    """

    def __init__(self, *, base_url: str, max_tokens: int = 16, **options: Any) -> None:
        self.client = _JudgeClient(base_url=base_url, max_tokens=max_tokens, **options)

    @property
    def stats(self):
        return self.client.stats

    def check(self) -> None:
        """Fail fast (:class:`backend.labelling.llm.LLMError`) when the server cannot be reached."""
        self.client.check()

    def judge(self, prompts: Sequence[str], lefts: Sequence[str], rights: Sequence[str], *,
              progress=None) -> list[JudgeVerdict]:
        """One verdict per pair; a pair with an empty response gets no verdict (p_left None)."""
        if not len(prompts) == len(lefts) == len(rights):
            raise ValueError(f"prompts, lefts and rights differ in length: {len(prompts)}, {len(lefts)}, "
                             f"{len(rights)}")
        texts = [(str(p or ""), str(a or ""), str(b or "")) for p, a, b in zip(prompts, lefts, rights, strict=True)]
        usable = [i for i, (_, a, b) in enumerate(texts) if a.strip() and b.strip()]
        messages = []
        for i in usable:
            prompt, left, right = texts[i]
            messages += [pair_message(prompt, left, right), pair_message(prompt, right, left)]
        answers = self.client.ask(messages, progress=progress)
        verdicts = [_no_verdict("empty response") for _ in texts]
        for n, i in enumerate(usable):
            verdicts[i] = combine_orders(answers[2 * n], answers[2 * n + 1])
        return verdicts


_SOURCE_RANK = ("logprobs", "chosen_only", "votes", "failed")


def order_probability(answer: LLMAnswer, first_is_left: bool) -> tuple[float | None, str]:
    """P(left better) from one order's answer, and how it was obtained."""
    if answer.error or not answer.valid:
        return None, "failed"
    options = getattr(answer, "options", None)
    if options:
        p_first = options.get("1", 0.0) / (options.get("1", 0.0) + options.get("2", 0.0))
        source = "logprobs"
    elif answer.probability is not None:
        share = max(answer.probability, 0.5)
        p_first = share if answer.label == "1" else 1 - share
        source = "chosen_only"
    else:
        p_first = 1.0 if answer.label == "1" else 0.0
        source = "votes"
    return (p_first if first_is_left else 1 - p_first), source


def combine_orders(left_first: LLMAnswer, right_first: LLMAnswer) -> JudgeVerdict:
    """Average the two orders' P(left better); one failed order leaves the other alone."""
    p1, s1 = order_probability(left_first, first_is_left=True)
    p2, s2 = order_probability(right_first, first_is_left=False)
    errors = [a.error or f"answer outside 1/2: {a.raw[:80]!r}" for a in (left_first, right_first)
              if a.error or not a.valid]
    answered = [p for p in (p1, p2) if p is not None]
    if not answered:
        return JudgeVerdict(None, 0.0, None, (p1, p2), "failed", errors)
    p_left = sum(answered) / len(answered)
    source = max((s for s, p in ((s1, p1), (s2, p2)) if p is not None), key=_SOURCE_RANK.index)
    selected = None if p_left == 0.5 else ("left" if p_left > 0.5 else "right")
    return JudgeVerdict(p_left, 2 * abs(p_left - 0.5), selected, (p1, p2), source, errors)


def _no_verdict(reason: str) -> JudgeVerdict:
    return JudgeVerdict(None, 0.0, None, (None, None), "failed", [reason])
