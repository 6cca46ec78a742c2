"""LLM annotator over any OpenAI-compatible chat API (OpenAI, vLLM, Ollama, llama.cpp).

Four views of an item: ``zero_shot`` (label list only), ``hinted`` (the encoder's label offered as a
suggestion, as in HCC), ``few_shot`` (retrieved labelled examples and optional candidate labels, without
saying which one the encoder prefers) and ``choice`` (a choice among a few candidate labels, answered as
one letter and scored by the probability of every letter: an easier question than picking one of 150
labels, and a distribution over the candidates rather than one label). Answers are constrained to the label
set where the server allows it; an answer outside the set is recorded as invalid, never mapped to a near
label.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion

from backend.labelling import prompts
from backend.labelling.concurrency import DEFAULT_CAP, AdaptiveLimit, Outcome, Token, endpoint_limit
from backend.labelling.llm_cache import ResponseCache, request_key

log = logging.getLogger(__name__)

#: How answers are held to the label set. ``json_schema``: OpenAI / vLLM structured outputs; ``json_object``:
#: llama-cpp-python's JSON mode with a schema; ``grammar``: a llama.cpp GBNF grammar that only admits the
#: labels themselves (a third of the generated tokens of JSON: the fastest on the embedded server);
#: ``choice``: vLLM's ``guided_choice``; ``none``: free text, matched strictly. ``auto`` = json_object,
#: falling back to ``none`` when the server rejects it.
STRUCTURED_MODES = ("auto", "json_schema", "json_object", "grammar", "choice", "none")
#: ``owned_by`` of the models a llama.cpp server lists (llama.cpp's own server, llama-cpp-python's): ``auto``
#: uses a grammar there, its fastest exact constraint.
_LLAMA_CPP_OWNERS = ("llamacpp", "me")
_MAX_CHOICES = 20  # candidates the choice view shows at most
_TOP_LOGPROBS = 20  # alternatives per token the choice view asks for (OpenAI's maximum)
_LABEL_ONLY_MODES = ("grammar", "choice")
_RETRYABLE = (
    openai.APIConnectionError,  # includes timeouts
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APIResponseValidationError,
)
# What says the endpoint has more than it can take: the concurrency limit backs off (429, 5xx, timeouts).
_OVERLOAD = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError)
# Words in a 400 error that show the server rejects ``response_format`` itself (vLLM, TGI, LM Studio, ...).
_FORMAT_WORDS = ("response_format", "json", "schema", "grammar")
_MAX_DELAY = 30.0  # seconds; upper bound on one backoff or Retry-After wait (before jitter)


class LLMError(RuntimeError):
    """The LLM server cannot be used (unreachable, wrong model, refused credentials)."""


class MalformedResponseError(ValueError):
    """The server answered 200 with something that is not a chat completion."""


@dataclass
class LLMAnswer:
    """One view's answer for one item."""

    label: str | None  # a member of the label set, or None
    valid: bool  # the raw answer named a label of the set
    raw: str = ""
    probability: float | None = None  # P(label) from token logprobs when the server returns them
    error: str | None = None  # request failed after retries
    cached: bool = False
    distribution: dict[str, float] | None = None  # choice view: probability of every candidate label


@dataclass
class LLMStats:
    calls: int = 0  # requests sent (retries included)
    cached: int = 0  # answers served from the on-disk cache
    failures: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time spent waiting on the server
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items() if k[0] != "_"}


def canonical(label: str) -> str:
    """Case, spacing, ``_``/``-`` and surrounding quotes/punctuation do not distinguish labels."""
    return re.sub(r"[\s_\-]+", " ", label.strip().strip("\"'`.,;:!").strip()).lower()


class LabelMatcher:
    """Strict matching of a raw answer to the label set (exact up to :func:`canonical`)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        forms: dict[str, list[str]] = {}
        for label in self.labels:
            forms.setdefault(canonical(label), []).append(label)
        # A canonical form shared by two labels is ambiguous and only matches exactly.
        self._by_form = {form: names[0] for form, names in forms.items() if len(names) == 1}
        self._exact = set(self.labels)

    def match(self, answer: str) -> str | None:
        answer = answer.strip()
        if answer in self._exact:
            return answer
        return self._by_form.get(canonical(answer))

    def parse(self, content: str) -> tuple[str | None, str]:
        """Return (label or None, the label text the model gave) from a JSON or plain-text reply."""
        text = content.strip()
        value: Any = text
        if text.startswith("{") or text.startswith("```"):
            body = text.strip("`").removeprefix("json").strip()
            try:
                obj = json.loads(body)
                value = obj.get("label", "") if isinstance(obj, dict) else obj
            except json.JSONDecodeError:
                value = text
        if not isinstance(value, str):
            return None, json.dumps(value)
        return self.match(value), value


def label_probability(content: str, value: str, token_logprobs: list[tuple[str, float]]) -> float | None:
    """Probability of the tokens that spell ``value`` inside ``content`` (their logprobs summed)."""
    if not token_logprobs or not value:
        return None
    # In a JSON reply the value follows the "label" key; searching from the start would find short labels
    # ("a", "b", "el", ...) inside the key itself and score the wrong tokens.
    key = content.find('"label"')
    start = content.find(value, key + len('"label"') if key >= 0 else 0)
    if start < 0:
        return None
    end = start + len(value)
    pos, total, used = 0, 0.0, False
    for token, logprob in token_logprobs:
        t_start, pos = pos, pos + len(token)
        if pos > start and t_start < end:
            total += logprob
            used = True
    return math.exp(total) if used else None


def _sampling(temperature: float | None, seed: int | None) -> dict[str, Any]:
    """Per-call overrides of the request; empty for the defaults, so their cache keys do not change."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    params: dict[str, Any] = {}
    if temperature is not None:
        params["temperature"] = float(temperature)
    if seed is not None:
        params["seed"] = int(seed)
    return params


def gbnf_choice(options: Sequence[str]) -> str:
    """A llama.cpp GBNF grammar whose only sentences are the given strings."""
    def literal(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'

    return "root ::= " + " | ".join(literal(o) for o in options)


class LLMAnnotator:
    """Label texts with an LLM behind an OpenAI-compatible endpoint.

    Requests run on a thread pool of at most ``concurrency`` threads, and no more than the endpoint's
    :class:`~backend.labelling.concurrency.AdaptiveLimit` allows are in flight: it starts at 4, grows while
    the endpoint keeps up and backs off on 429/5xx/timeouts; ``concurrency`` is its cap, shared by every
    annotator of the process on the same endpoint. Failures are retried with exponential backoff and jitter
    on connection errors, timeouts, 429 and 5xx (the wait holds no slot). Every response is cached on disk
    under a key made of the model, the messages and the parameters, so a re-run costs no calls. Results come
    back in input order.
    """

    def __init__(
        self,
        labels: Sequence[str],
        *,
        base_url: str,
        model: str = "local",
        api_key: str | None = None,
        descriptions: Mapping[str, str] | None = None,
        cache_dir: str | Path | None = None,
        concurrency: int = DEFAULT_CAP,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        temperature: float = 0.0,
        max_tokens: int = 64,
        logprobs: bool = False,
        structured: str = "auto",
        seed: int = 0,
        choice_logprobs: bool | None = None,
    ) -> None:
        if not labels:
            raise ValueError("the label set is empty")
        if structured not in STRUCTURED_MODES:
            raise ValueError(f"structured must be one of {STRUCTURED_MODES}, got {structured!r}")
        self.labels = list(labels)
        self.matcher = LabelMatcher(self.labels)
        self.model = model
        self.base_url = base_url
        self.descriptions = dict(descriptions or {})
        self.concurrency = max(1, concurrency)  # the cap on requests in flight
        self.limiter: AdaptiveLimit = endpoint_limit(base_url, self.concurrency)
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.logprobs = logprobs  # on the label views; the choice view always asks (it scores the letters)
        self.logprobs_rejected = False  # the server refused logprobs once: never ask again
        # The choice view's logprobs: None = ask except on llama.cpp servers, where any logprobs make the server
        # compute logits for every prompt token (measured: 0.88 vs 1.67 calls/s) while a plain choice weighs
        # as well in the pool (docs/benchmarks.md).
        self.choice_logprobs = choice_logprobs
        self._llama_cpp: bool | None = None
        self.structured = structured
        self._auto_structured = structured == "auto"
        self.seed = seed
        self.stats = LLMStats()
        self.cache = ResponseCache(Path(cache_dir) / "llm_responses.sqlite" if cache_dir else None)
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0
        )
        self._mode_lock = threading.Lock()

    # -- public views ------------------------------------------------------------------------------
    def zero_shot(
        self, texts: Sequence[str], *, progress=None, temperature: float | None = None, seed: int | None = None
    ) -> list[LLMAnswer]:
        """``temperature`` / ``seed`` override the annotator's for these calls (sampled answers for
        self-consistency); each (temperature, seed) pair is cached on its own."""
        messages = [prompts.zero_shot_message(t) for t in texts]
        return self._run(messages, [None] * len(texts), progress, _sampling(temperature, seed))

    def hinted(
        self,
        texts: Sequence[str],
        hints: Sequence[str],
        *,
        progress=None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[LLMAnswer]:
        messages = [prompts.hinted_message(t, h) for t, h in zip(texts, hints, strict=True)]
        return self._run(messages, [None] * len(texts), progress, _sampling(temperature, seed))

    def few_shot(
        self,
        texts: Sequence[str],
        examples: Sequence[Sequence[tuple[str, str]]],
        candidates: Sequence[Sequence[str]] | None = None,
        *,
        progress=None,
    ) -> list[LLMAnswer]:
        cands = candidates or [None] * len(texts)
        messages = [
            prompts.few_shot_message(t, ex, c) for t, ex, c in zip(texts, examples, cands, strict=True)
        ]
        return self._run(messages, list(cands), progress)

    def choose(self, texts: Sequence[str], candidates: Sequence[Sequence[str]], *,
               examples: Sequence[Mapping[str, str] | None] | None = None, progress=None) -> list[LLMAnswer]:
        """Each text's choice among its candidate labels (at most 20), answered with the label's name. With
        token logprobs (asked for unless the server refuses them) every candidate gets a probability
        (``distribution``, see :func:`candidate_distribution`); without them the chosen one alone is known.
        ``examples[i]`` (label -> text) shows text ``i``'s candidates by a labelled example each."""
        cands = [list(c)[:_MAX_CHOICES] for c in candidates]
        shown = list(examples) if examples is not None else [None] * len(cands)
        if len(shown) != len(cands):
            raise ValueError(f"{len(cands)} texts but {len(shown)} example sets")
        messages = [prompts.choice_message(t, c, self.descriptions, e)
                    for t, c, e in zip(texts, cands, shown, strict=True)]
        return self._run(messages, cands, progress, choices=cands)

    @property
    def system(self) -> str:
        """The system prompt of the label views in the structured mode in use."""
        return self._system_prompt(json_answer=self._mode() not in _LABEL_ONLY_MODES)

    def _system_prompt(self, *, json_answer: bool) -> str:
        return prompts.system_prompt(self.labels, self.descriptions, json_answer=json_answer)

    def check(self) -> None:
        """Fail fast with a clear message when the server cannot be reached or refuses us."""
        try:
            self._client.with_options(timeout=10).models.list()
        except openai.AuthenticationError as exc:
            raise LLMError(f"the LLM server at {self.base_url} refused the API key: {exc}") from exc
        except openai.NotFoundError:
            return  # some compatible servers do not implement /models; the first call will tell
        except openai.APIError as exc:
            raise LLMError(f"cannot reach the LLM server at {self.base_url}: {exc}") from exc

    # -- machinery ---------------------------------------------------------------------------------
    def _mode(self) -> str:
        """The structured mode in use; ``auto`` is settled once, on first use, from the server's model list:
        a grammar on llama.cpp servers, else JSON with a schema (dropped if the server rejects it)."""
        if self.structured != "auto":
            return self.structured
        with self._mode_lock:
            if self.structured == "auto":
                self.structured = "grammar" if self.serves_llama_cpp() else "json_object"
                log.info("structured output: %s (auto)", self.structured)
        return self.structured

    def serves_llama_cpp(self) -> bool:
        """Whether the server lists its models as a llama.cpp server does (asked once)."""
        if self._llama_cpp is None:
            try:
                models = self._client.with_options(timeout=10).models.list()
                self._llama_cpp = any(getattr(m, "owned_by", None) in _LLAMA_CPP_OWNERS for m in models.data)
            except Exception:  # noqa: BLE001 - no model list is no evidence of llama.cpp; the requests will tell
                self._llama_cpp = False
        return self._llama_cpp

    def _choice_logprobs(self) -> bool:
        return self.choice_logprobs if self.choice_logprobs is not None else not self.serves_llama_cpp()

    def _run(
        self, user_messages: list[str], enums: list[Sequence[str] | None], progress, params: dict | None = None,
        choices: list[list[str]] | None = None,
    ) -> list[LLMAnswer]:
        # The same question twice in a batch (duplicate tasks, a pair imported in both orders) is asked once:
        # one call instead of two, and one answer for both (a server batching other requests beside it can
        # answer the same prompt with slightly different logprobs).
        first: dict[tuple, int] = {}
        source = [first.setdefault((user_messages[i], _key(enums[i]), _key(choices[i] if choices else None)), i)
                  for i in range(len(user_messages))]
        unique = list(first.values())
        copies = Counter(source)

        def one(i: int) -> LLMAnswer:
            answer = self._answer(user_messages[i], enums[i], params, choices[i] if choices else None)
            for _ in range(copies[i] if progress is not None else 0):
                progress()
            return answer

        if self.concurrency == 1 or len(unique) <= 1:
            answers = dict(zip(unique, map(one, unique), strict=True))
        else:
            # As many threads as the cap allows; the limiter decides how many of them have a request out.
            with ThreadPoolExecutor(min(self.concurrency, len(unique))) as pool:
                answers = dict(zip(unique, pool.map(one, unique), strict=True))
        return [answers[i] if i == j else copy.copy(answers[j]) for i, j in enumerate(source)]

    def _schema(self, enum: Sequence[str] | None) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": list(enum or self.labels)}},
            "required": ["label"],
        }

    def _request(
        self, user_message: str, enum: Sequence[str] | None, mode: str, params: dict | None = None,
        choice: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        json_answer = mode not in _LABEL_ONLY_MODES
        system = (prompts.choice_system_prompt(json_answer=json_answer) if choice is not None
                  else self._system_prompt(json_answer=json_answer))
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user_message},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            **(params or {}),
        }
        wanted = self._choice_logprobs() if choice is not None else self.logprobs
        if wanted and not self.logprobs_rejected:
            request["logprobs"] = True
            # llama-cpp-python only returns chat logprobs when top_logprobs is set (it passes top_logprobs
            # on as the number to return); 1 is accepted everywhere, 0 reads as "off" to some servers. The
            # choice view reads the alternatives of its one letter.
            request["top_logprobs"] = _TOP_LOGPROBS if choice is not None else 1
        if mode == "json_schema":
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "label", "schema": self._schema(enum), "strict": True},
            }
        elif mode == "json_object":
            request["response_format"] = {"type": "json_object", "schema": self._schema(enum)}
        elif mode == "grammar":
            request["extra_body"] = {"grammar": gbnf_choice(enum or self.labels)}
        elif mode == "choice":
            request["extra_body"] = {"guided_choice": list(enum or self.labels)}
        return request

    def _answer(self, user_message: str, enum: Sequence[str] | None, params: dict | None = None,
                choice: Sequence[str] | None = None) -> LLMAnswer:
        request = self._request(user_message, enum, self._mode(), params, choice)
        key = request_key(request)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.add(cached=1)
            return self._interpret(hit, cached=True, choice=choice)
        try:
            response = self._send(request)
        except LLMError:
            raise
        except Exception as exc:  # retries exhausted: this item fails, the run goes on
            self.stats.add(failures=1)
            log.warning("LLM request failed after %d retries: %s", self.max_retries, exc)
            return LLMAnswer(label=None, valid=False, error=f"{type(exc).__name__}: {exc}")
        self.cache.put(key, response)
        return self._interpret(response, cached=False, choice=choice)

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        attempt = 0
        while True:
            slot: Token | None = self.limiter.acquire()
            started, outcome = time.perf_counter(), "other"
            try:
                self.stats.add(calls=1)
                completion = self._create(request)
                outcome = "ok"
                return self._parse_completion(completion)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise LLMError(f"the LLM server at {self.base_url} refused the request: {exc}") from exc
            except openai.NotFoundError as exc:
                raise LLMError(f"model {self.model!r} not found at {self.base_url}: {exc}") from exc
            except openai.BadRequestError as exc:
                # Dropping a rejected feature is not a failure, so it does not use up a retry.
                if not self._downgrade(request, exc):
                    raise
            except (*_RETRYABLE, ValueError) as exc:
                outcome = _outcome(exc)
                self.limiter.release(slot, outcome)
                slot = None  # the backoff below waits without holding a slot
                if attempt == self.max_retries:
                    if isinstance(exc, openai.APIConnectionError) and not isinstance(
                        exc, openai.APITimeoutError
                    ):
                        raise LLMError(f"cannot reach the LLM server at {self.base_url}: {exc}") from exc
                    raise
                time.sleep(self._delay(attempt, exc))
                attempt += 1
            finally:
                if slot is not None:
                    self.limiter.release(slot, outcome)
                self.stats.add(seconds=time.perf_counter() - started)

    def _create(self, request: dict[str, Any]) -> ChatCompletion:
        """``chat.completions.create(**request)`` without the SDK's walk of every parameter through its type
        hints, about a third of the client's CPU per call (bench/llm_concurrency.py); our parameters are
        plain JSON, which that walk leaves as they are. Errors, timeouts and parsing are the SDK's own."""
        body = {key: value for key, value in request.items() if key != "extra_body"}
        body.update(request.get("extra_body") or {})  # as the SDK merges extra_body: at the top level
        return self._client.post("/chat/completions", body=body, cast_to=ChatCompletion)

    def _parse_completion(self, completion: Any) -> dict[str, Any]:
        """Content, token logprobs and usage of a completion; a body of the wrong shape is malformed."""
        try:
            choice = completion.choices[0]
            content = choice.message.content or ""
            tokens, alternatives = [], []
            if choice.logprobs is not None and choice.logprobs.content:
                tokens = [(t.token, float(t.logprob)) for t in choice.logprobs.content]
                alternatives = [[(a.token, float(a.logprob)) for a in (t.top_logprobs or [])]
                                for t in choice.logprobs.content]
        except (AttributeError, LookupError, TypeError, ValueError) as exc:
            # e.g. {"choices": null} or a text body: retried like a broken connection
            raise MalformedResponseError(f"not a chat completion: {completion!r:.200}") from exc
        usage = getattr(completion, "usage", None)
        self.stats.add(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )
        response: dict[str, Any] = {"content": content, "logprobs": tokens}
        if any(len(a) > 1 for a in alternatives):  # only the choice view asks for more than the chosen token
            response["top_logprobs"] = alternatives
        return response

    def _downgrade(self, request: dict[str, Any], exc: Exception) -> bool:
        """A server that rejects a feature gets asked again without it, once and for the whole run."""
        message = str(exc).lower()
        with self._mode_lock:
            if "logprobs" in request and "logprob" in message:
                log.warning("the LLM server rejects logprobs; continuing without label probabilities")
                self.logprobs = False
                self.logprobs_rejected = True
                del request["logprobs"]
                request.pop("top_logprobs", None)  # not allowed without logprobs
                return True
            # Tested against the mode chosen at start: another thread may already have switched to "none"
            # while this request, built before that, was in flight. Other 400s (context length, ...) are
            # not a reason to give up constrained output for the whole run.
            if (
                "response_format" in request
                and self._auto_structured
                and any(word in message for word in _FORMAT_WORDS)
            ):
                if self.structured != "none":
                    log.warning("the LLM server rejects schema-constrained output; using strict matching")
                self.structured = "none"
                del request["response_format"]
                return True
        return False

    def _delay(self, attempt: int, exc: Exception) -> float:
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = None
        if retry_after is not None and not math.isfinite(retry_after):
            retry_after = None  # "nan"/"inf" parse as floats but are no delay; time.sleep rejects them
        base = retry_after if retry_after is not None else self.backoff * (2**attempt)
        # Clamped both ways: a negative Retry-After would make time.sleep raise, a huge one would stall.
        return min(max(base, 0.0), _MAX_DELAY) * (1 + 0.25 * random.random())

    def _interpret(self, response: dict[str, Any], *, cached: bool, choice: Sequence[str] | None = None
                   ) -> LLMAnswer:
        if choice is not None:
            return self._interpret_choice(response, list(choice), cached=cached)
        content = response.get("content", "")
        label, given = self.matcher.parse(content)
        probability = None
        if label is not None:
            tokens = [tuple(t) for t in response.get("logprobs") or []]
            probability = label_probability(content, given, tokens)
        else:
            self.stats.add(invalid=1)
        return LLMAnswer(label=label, valid=label is not None, raw=content, probability=probability,
                         cached=cached)

    def _interpret_choice(self, response: dict[str, Any], choice: list[str], *, cached: bool) -> LLMAnswer:
        content = response.get("content", "")
        label, given = LabelMatcher(choice).parse(content)
        if label is None:
            self.stats.add(invalid=1)
            return LLMAnswer(label=None, valid=False, raw=content, cached=cached)
        distribution = candidate_distribution(content, given, choice, response)
        return LLMAnswer(label=label, valid=True, raw=content, cached=cached, distribution=distribution,
                         probability=distribution.get(label) if distribution else None)


def _key(options: Sequence[str] | None) -> tuple[str, ...] | None:
    """A hashable form of a request's label subset or candidates (None: the whole label set)."""
    return None if options is None else tuple(options)


def _outcome(exc: Exception) -> Outcome:
    return "overload" if isinstance(exc, _OVERLOAD) else "other"


def candidate_distribution(content: str, given: str, candidates: Sequence[str], response: dict[str, Any]
                           ) -> dict[str, float] | None:
    """Probability of every candidate label from the logprobs of the reply that spelled ``given``.

    The chosen label's probability is the product of its tokens'. A candidate that leaves the chosen one's
    spelling at token ``j`` gets the probability of the shared tokens before ``j`` times that of the
    alternatives at ``j`` that continue its own spelling (shared equally by the candidates an alternative
    continues). A candidate no listed alternative continues gets nothing here (the combination lifts it
    to a floor). Normalised over the candidates; None without alternatives from the server.
    """
    tokens = [(str(t), float(lp)) for t, lp in response.get("logprobs") or []]
    alternatives = response.get("top_logprobs") or []
    if not tokens or len(alternatives) != len(tokens):
        return None
    key = content.find('"label"')
    start = content.find(given, key + len('"label"') if key >= 0 else 0)
    if start < 0:
        return None
    mass = dict.fromkeys(candidates, 0.0)
    pos, prefix_logprob, spelled = 0, 0.0, ""
    for (token, logprob), alts in zip(tokens, alternatives, strict=True):
        t_start, pos = pos, pos + len(token)
        if pos <= start:
            continue  # tokens before the label (JSON punctuation)
        head = content[start:t_start] if t_start > start else ""
        spelled = head
        rivals = [c for c in candidates if canonical(c) != canonical(given)]
        for alt_token, alt_logprob in alts:
            continuing = [c for c in rivals if _continues(c, spelled, alt_token)
                          and not _continues(given, spelled, alt_token)]
            for c in continuing:
                mass[c] += math.exp(prefix_logprob + float(alt_logprob)) / len(continuing)
        prefix_logprob += logprob
        if pos >= start + len(given):
            break
    chosen = next((c for c in candidates if canonical(c) == canonical(given)), given)
    mass[chosen] = mass.get(chosen, 0.0) + math.exp(prefix_logprob)
    total = sum(mass.values())
    return {c: p / total for c, p in mass.items()} if total > 0 else None


def _continues(label: str, spelled: str, token: str) -> bool:
    """Does ``token`` continue ``label`` after the text ``spelled`` so far (case and a leading space aside)?"""
    rest = label[len(spelled):] if label.lower().startswith(spelled.lower()) else None
    if rest is None or not token:
        return False
    piece = token if spelled else token.lstrip()
    return bool(piece) and rest.lower().startswith(piece.lower())
