"""A fault-injecting HTTP reverse proxy in front of a real Label Studio (standard library only, real HTTP).

Point a client at ``proxy.url`` instead of Label Studio's URL: every request is forwarded unchanged (headers,
body, answer). A test arms faults for requests matching a method and a path pattern, each for a number of
matching requests, to reproduce what a load balancer or a flaky network does to a write:

- ``"502_after"``: forward the request (Label Studio commits it), then answer 502 instead of its answer;
- ``"drop_after"``: forward the request, then close the connection without any answer;
- ``"slow_after"``: forward the request, then hold its answer for ``delay`` seconds (a client timeout);
- ``"502_before"``: answer 502 without forwarding (nothing reaches Label Studio).

A hook (``proxy.on(method, pattern, fn)``) runs ``fn(method, path)`` before a matching request is forwarded, e.g. to
change a task through Label Studio's API between a client's read and its write. A rewrite
(``proxy.rewrite(method, pattern, fn)``) passes each matching answer's body through ``fn`` (bytes to bytes), to
serve what another Label Studio version might answer. A body cap (``proxy.cap_body(method, pattern, n)``)
answers 413 without forwarding a matching request whose body exceeds ``n`` bytes, as nginx's
``client_max_body_size`` does (``proxy.refused`` counts them). ``proxy.seen`` logs every
request as ``(method, path)``; ``proxy.count(...)`` counts them. Headers are never logged (they carry the key).

Usage::

    with StudioProxy(label_studio_url) as proxy:
        proxy.fault("POST", r"/api/projects/\\d+/import/predictions", "502_after", times=1)
        client = StudioClient(proxy.url, token)
        client.import_predictions(project_id, predictions)
        assert proxy.count("POST", r"/import/predictions") == 2

Reusable for fault benchmarks: arm ``times`` large and measure what the backend makes of it.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODES = ("502_after", "drop_after", "slow_after", "502_before")
# Not forwarded either way: they describe one hop, and the proxy re-frames every body with Content-Length.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "content-length"}


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    mode: str
    times: int  # matching requests still to fault
    delay: float = 0.0
    hits: int = 0  # requests faulted so far


Hook = Callable[[str, str], None]
Rewrite = Callable[[bytes], bytes]


class StudioProxy:
    """A reverse proxy to ``upstream`` on a free loopback port, serving in a thread until :meth:`stop`."""

    def __init__(self, upstream: str, *, timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"StudioProxy forwards to an http:// URL, got {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.seen: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._hooks: list[tuple[str, re.Pattern[str], Hook]] = []
        self._rewrites: list[tuple[str, re.Pattern[str], Rewrite]] = []
        self._caps: list[tuple[str, re.Pattern[str], int]] = []
        self.refused = 0  # requests answered 413 by a body cap
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="studio-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what a test arms ----------------------------------------------------------------------------------
    def fault(self, method: str, pattern: str, mode: str, *, times: int = 1, delay: float = 0.0) -> Fault:
        """Fault the next ``times`` requests whose method is ``method`` and whose path matches ``pattern``."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {MODES}")
        fault = Fault(method.upper(), re.compile(pattern), mode, times, delay)
        with self._lock:
            self._faults.append(fault)
        return fault

    def on(self, method: str, pattern: str, hook: Hook) -> None:
        """Run ``hook(method, path)`` before forwarding each matching request (until :meth:`clear`)."""
        with self._lock:
            self._hooks.append((method.upper(), re.compile(pattern), hook))

    def rewrite(self, method: str, pattern: str, fn: Rewrite) -> None:
        """Pass the body of each matching answer through ``fn`` before the client gets it (until :meth:`clear`)."""
        with self._lock:
            self._rewrites.append((method.upper(), re.compile(pattern), fn))

    def cap_body(self, method: str, pattern: str, max_bytes: int) -> None:
        """Answer 413, without forwarding, each matching request whose body exceeds ``max_bytes``."""
        with self._lock:
            self._caps.append((method.upper(), re.compile(pattern), max_bytes))

    def too_large(self, method: str, path: str, body: bytes | None) -> bool:
        with self._lock:
            refused = any(m == method and rx.search(path) and len(body or b"") > n for m, rx, n in self._caps)
            self.refused += refused
            return refused

    def clear(self) -> None:
        """Disarm every fault, hook, rewrite and body cap; forget the request log."""
        with self._lock:
            self._faults.clear()
            self._hooks.clear()
            self._rewrites.clear()
            self._caps.clear()
            self.seen.clear()
            self.refused = 0

    def count(self, method: str, pattern: str) -> int:
        """Requests seen so far with this method and a path matching ``pattern``."""
        rx = re.compile(pattern)
        with self._lock:
            return sum(m == method.upper() and bool(rx.search(p)) for m, p in self.seen)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StudioProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the handler asks -----------------------------------------------------------------------------
    def _rewrites_for(self, method: str, path: str) -> list[Rewrite]:
        with self._lock:
            return [fn for m, rx, fn in self._rewrites if m == method and rx.search(path)]

    def _arrived(self, method: str, path: str) -> tuple[Fault | None, list[Hook]]:
        """Log the request; the fault it consumes (if any) and the hooks to run."""
        with self._lock:
            self.seen.append((method, path))
            hooks = [h for m, rx, h in self._hooks if m == method and rx.search(path)]
            for fault in self._faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    fault.hits += 1
                    return fault, hooks
        return None, hooks

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None):
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()


def _handler_class(proxy: StudioProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Label Studio's own server speaks to the SDK

        def _serve(self) -> None:
            method, path = self.command, self.path
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault, hooks = proxy._arrived(method, path)
            for hook in hooks:
                hook(method, path)
            if proxy.too_large(method, path, body):
                return self._reply(413, [("Content-Type", "text/plain")], b"request entity too large (injected)")
            if fault is not None and fault.mode == "502_before":
                return self._reply(502, [("Content-Type", "text/plain")], b"bad gateway (injected, not forwarded)")
            rewrites = proxy._rewrites_for(method, path)
            # An answer to rewrite is asked for uncompressed, so that ``fn`` sees the plain body.
            dropped = HOP_HEADERS | ({"accept-encoding"} if rewrites else set())
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in dropped]
            headers.append(("Connection", "close"))
            status, answer_headers, answer = proxy._forward(method, path, headers, body)
            for fn in rewrites:
                answer = fn(answer)
            if fault is None:
                return self._reply(status, answer_headers, answer)
            if fault.mode == "502_after":
                return self._reply(502, [("Content-Type", "text/plain")], b"bad gateway (injected after forwarding)")
            if fault.mode == "drop_after":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            time.sleep(fault.delay)  # slow_after: the client has given up by now, or gets the answer late
            return self._reply(status, answer_headers, answer)

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            try:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): nothing to say
                self.close_connection = True

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _serve  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass  # quiet: the test log is for the test; proxy.seen keeps the requests (never their headers)

    return Handler
