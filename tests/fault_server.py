"""A tiny OpenAI-compatible chat server for fault injection in tests (standard library only).

Each test scripts what the server does: a queue of actions is consumed one per chat request, then a
default action answers the rest. An action is either an :class:`Action` or a callable that receives the
request body and returns one, so a test can model a server that reacts to the request (for example one
that rejects ``logprobs`` whenever they are asked for).

Usage::

    with FaultServer(default=label("card_arrival")) as server:
        server.script(rate_limited(retry_after=0.1), server_error(500))
        annotator = LLMAnnotator(labels, base_url=server.url, ...)

or through the ``fault_server`` pytest fixture (import ``fault_server_fixture`` into the test module).

Load models: ``capacity=N`` refuses with 429 any request that arrives while N are being served (a rate-limited
endpoint); ``slots=N`` serves at most N at once and queues the rest, each taking its action's ``delay`` once
served (a llama.cpp server with N slots). ``keep_alive=True`` speaks HTTP/1.1 with persistent connections,
as serving engines do (the default, HTTP/1.0, closes every connection so nothing lingers at shutdown).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MODEL_ID = "fault-model"
DEFAULT_LOGPROB = -0.05  # per token when a test does not give its own; keeps probabilities below 1


@dataclass(frozen=True)
class Action:
    """What the server does with one chat request."""

    status: int = 200
    content: str | None = None  # the assistant message (status 200 only)
    tokens: tuple[tuple[str, float], ...] | None = None  # (token, logprob) spelling ``content``
    # per token, the (token, logprob) alternatives a server lists as ``top_logprobs`` (cut to the request's n)
    alternatives: tuple[tuple[tuple[str, float], ...], ...] | None = None
    body: str | None = None  # raw response body; overrides everything else (malformed answers)
    message: str = ""  # error message for non-200 statuses
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds to wait before replying (interrupted when the server stops)
    prompt_tokens: int = 7
    finish_reason: str = "stop"


Responder = Action | Callable[[dict[str, Any]], Action]


# -- action constructors -----------------------------------------------------------------------------
def answer(
    content: str,
    tokens: list[tuple[str, float]] | None = None,
    *,
    delay: float = 0.0,
    prompt_tokens: int = 7,
) -> Action:
    """A normal completion; ``tokens`` must spell ``content`` when given."""
    if tokens is not None and "".join(t for t, _ in tokens) != content:
        raise ValueError("the tokens do not spell the content")
    return Action(
        content=content,
        tokens=tuple(tokens) if tokens is not None else None,
        delay=delay,
        prompt_tokens=prompt_tokens,
    )


def ranked(content: str, tokens: list[tuple[str, float]],
           alternatives: list[list[tuple[str, float]]]) -> Action:
    """A completion whose tokens come with their listed alternatives (``top_logprobs``), one list per token."""
    if len(alternatives) != len(tokens):
        raise ValueError("one list of alternatives per token")
    base = answer(content, tokens)
    return replace(base, alternatives=tuple(tuple(a) for a in alternatives))


def label(name: str, *, delay: float = 0.0) -> Action:
    """A completion holding ``{"label": name}``, as a schema-constrained server would send it."""
    return answer(json.dumps({"label": name}), delay=delay)


def rate_limited(retry_after: str | float | None = None) -> Action:
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return Action(status=429, message="Rate limit reached, slow down", headers=headers)


def server_error(status: int = 500) -> Action:
    return Action(status=status, message="The server had an error while processing your request")


def stall(seconds: float, then: Action | None = None) -> Action:
    """Hold the request for ``seconds`` (longer than the client timeout), then reply as ``then``."""
    base = then or label("never-seen")
    return replace(base, delay=seconds)


def malformed(body: str = '{"id": "x", "choices": [ {"message": ', content_type_json: bool = True) -> Action:
    """Status 200 with a body that is not a chat completion."""
    headers = (("Content-Type", "application/json" if content_type_json else "text/plain"),)
    return Action(body=body, headers=headers)


def unauthorized() -> Action:
    return Action(status=401, message="Incorrect API key provided")


def not_found() -> Action:
    return Action(status=404, message=f"The model '{MODEL_ID}-x' does not exist")


def bad_request(message: str) -> Action:
    return Action(status=400, message=message)


# -- the server --------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"\s*\w+|\s*[^\w\s]+|\s+")


def _split_tokens(content: str) -> list[tuple[str, float]]:
    return [(m.group(0), DEFAULT_LOGPROB) for m in _TOKEN_RE.finditer(content)]


def _error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_exceeded"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": None,
                      "code": None}}


def _protocol_problem(body: dict[str, Any]) -> str | None:
    """The request-validation rules of the real API that a client could break."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "'messages' must be a non-empty array"
    if "top_logprobs" in body and not body.get("logprobs"):
        return "top_logprobs requires logprobs to be set to true"
    top = body.get("top_logprobs", 0)
    if not isinstance(top, int) or not 0 <= top <= 20:
        return "top_logprobs must be an integer between 0 and 20"
    return None


def completion_body(action: Action, request: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat.completion object for a 200 action."""
    content = action.content or ""
    tokens = list(action.tokens) if action.tokens is not None else _split_tokens(content)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": action.finish_reason,
        "logprobs": None,
    }
    if request.get("logprobs"):
        listed = int(request.get("top_logprobs") or 0)
        alternatives = action.alternatives or tuple(() for _ in tokens)
        choice["logprobs"] = {
            "content": [
                {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                 "top_logprobs": [{"token": a, "logprob": a_lp, "bytes": list(a.encode("utf-8"))}
                                  for a, a_lp in alts[:listed]]}
                for (tok, lp), alts in zip(tokens, alternatives, strict=True)
            ]
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", MODEL_ID),
        "choices": [choice],
        "usage": {
            "prompt_tokens": action.prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": action.prompt_tokens + len(tokens),
        },
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when dozens arrive at once; serving engines
    # (uvicorn, vLLM) listen with 2048
    request_queue_size = 512


@dataclass
class FaultServer:
    """OpenAI-style ``GET /v1/models`` and ``POST /v1/chat/completions`` on 127.0.0.1, port chosen by the OS."""

    default: Responder = field(default_factory=lambda: label("unset"))
    models_action: Action | None = None  # what ``GET /v1/models`` does; None lists one model
    owned_by: str = "tests"  # of the listed model ("me" is what llama-cpp-python's server says)
    requests: list[dict[str, Any]] = field(default_factory=list)  # chat request bodies, in arrival order
    paths: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    max_in_flight: int = 0  # most chat requests held at the same time
    protocol_errors: int = 0  # requests refused because they break the API's own rules
    capacity: int | None = None  # requests served at once above which a new one gets 429; None: any number
    slots: int | None = None  # requests served at once; the others wait for a slot (llama.cpp's n_parallel)
    keep_alive: bool = False
    port: int = 0  # 0: the OS chooses
    refused: int = 0  # requests answered 429 because ``capacity`` was reached

    def __post_init__(self) -> None:
        self._queue: deque[Responder] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._in_flight = 0
        self._serving = 0  # requests past the capacity check, not yet answered
        self._slots = threading.Semaphore(self.slots) if self.slots else None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------------------
    def script(self, *actions: Responder) -> None:
        """Queue actions for the next chat requests, in order."""
        with self._lock:
            self._queue.extend(actions)

    @property
    def request_count(self) -> int:
        """Chat-completion requests received so far."""
        with self._lock:
            return len(self.requests)

    def counters(self) -> dict[str, int]:
        """Requests received, most held at once, refused for capacity, refused for the API's rules."""
        with self._lock:
            return {"requests": len(self.requests), "max_in_flight": self.max_in_flight, "refused": self.refused,
                    "protocol_errors": self.protocol_errors}

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.paths.clear()
            self._queue.clear()
            self.max_in_flight = 0
            self.protocol_errors = 0
            self.refused = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultServer:
        self._httpd = _HTTPServer(("127.0.0.1", self.port), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers so shutdown does not wait for them
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------
    def _next_action(self, body: dict[str, Any]) -> tuple[Action, bool]:
        """The action for this request and whether it counts against ``capacity`` (False when refused)."""
        with self._lock:
            self.requests.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            if self.capacity is not None and self._serving >= self.capacity:
                self.refused += 1
                return rate_limited(), False
            self._serving += 1
            responder = self._queue.popleft() if self._queue else self.default
        return (responder(body) if callable(responder) else responder), True

    def _reject(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)
            self.protocol_errors += 1

    def _done(self, served: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            self._serving -= served

    def _record_path(self, method: str, path: str) -> None:
        with self._lock:
            self.paths.append((method, path))

    def _wait(self, seconds: float) -> None:
        if self._slots is None:
            self._stopping.wait(seconds)
            return
        with self._slots:  # queued behind the requests being served, then served for ``seconds``
            self._stopping.wait(seconds)


def _make_handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so nothing lingers at shutdown (unless keep_alive is asked for)
        protocol_version = "HTTP/1.1" if server.keep_alive else "HTTP/1.0"
        _held: bool | None = None  # a chat request counted in flight: whether it also counts as served
        # headers and body leave in two writes: with Nagle's algorithm the body waits ~40 ms for the client's
        # delayed ACK on a kept-alive connection, a latency no serving engine has
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            server._record_path("GET", self.path)
            if self.path.rstrip("/") == "/stats":  # for a benchmark that runs the server in another process
                self._send_json(200, server.counters())
                return
            if self.path.rstrip("/") != "/v1/models":
                self._send_json(404, _error_body(404, f"no route {self.path}"))
                return
            action = server.models_action
            if action is not None and action.status != 200:
                self._send_json(action.status, _error_body(action.status, action.message))
                return
            models = {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                                  "owned_by": server.owned_by}]}
            self._send_json(200, models)

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            server._record_path("POST", self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send_json(404, _error_body(404, f"no route {self.path}"))
                return
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._send_json(400, _error_body(400, "request body is not JSON"))
                return
            problem = _protocol_problem(body)
            if problem:  # what api.openai.com itself refuses; checked before the script is consulted
                server._reject(body)
                self._send_json(400, _error_body(400, problem))
                return
            action, served = server._next_action(body)
            self._held = served
            try:
                self._perform(action, body)
            finally:
                self._release()  # nothing left to do once the answer has started to leave

        def _perform(self, action: Action, body: dict[str, Any]) -> None:
            if action.delay or server.slots:
                server._wait(action.delay)
            headers = dict(action.headers)
            if action.body is not None:
                self._send_raw(action.status, action.body.encode("utf-8"), headers)
            elif action.status != 200:
                self._send_json(action.status, _error_body(action.status, action.message), headers)
            else:
                self._send_json(200, completion_body(action, body), headers)

        def _release(self) -> None:
            """Stop counting this chat request as held, once; a no-op for other requests."""
            if self._held is not None:
                server._done(self._held)
                self._held = None

        def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            self._send_raw(status, json.dumps(payload).encode("utf-8"),
                           {"Content-Type": "application/json", **(headers or {})})

        def _send_raw(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            # Released before the first byte leaves: a client that has its answer may send its next request at
            # once, and counting this one as held until its thread wakes again would show one more in flight
            # than the client ever had (and could refuse the next request for a capacity it never exceeded).
            self._release()
            try:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout test); nothing to tell it any more

    return Handler


@pytest.fixture(name="fault_server")
def fault_server_fixture() -> Iterator[FaultServer]:
    """A running :class:`FaultServer`; script it with ``fault_server.script(...)``."""
    with FaultServer() as server:
        yield server
