"""The fault server's own counts: the in-flight tests read them as the truth about the client."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from tests.fault_server import FaultServer, label


def _ask(server: FaultServer) -> dict[str, Any]:
    body = {"model": "any", "messages": [{"role": "user", "content": "hi"}]}
    request = urllib.request.Request(f"{server.url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return {"status": response.status, **json.loads(response.read())}


def _slow_after_answering(server: FaultServer, seconds: float) -> None:
    """Hold every handler thread after its answer has left: a busy machine that resumes it late."""
    assert server._httpd is not None
    handler = server._httpd.RequestHandlerClass
    send = handler._send_raw  # type: ignore[attr-defined]

    def send_then_stall(self: Any, *args: Any) -> None:
        send(self, *args)
        time.sleep(seconds)

    handler._send_raw = send_then_stall  # type: ignore[attr-defined]


def test_a_request_answered_is_no_longer_in_flight_when_the_client_sends_its_next() -> None:
    # One request at a time from the client; each handler thread is held 0.3 s after its answer has left.
    # Counting a request as held until its thread wakes again reported 2 in flight and refused the second
    # request for a capacity of 1 the client never exceeded (the cap test failed this way in CI: 7 for a cap of 6).
    with FaultServer(default=label("a"), capacity=1) as server:
        _slow_after_answering(server, 0.3)
        statuses = [_ask(server)["status"] for _ in range(3)]

    assert statuses == [200, 200, 200] and server.refused == 0
    assert server.max_in_flight == 1
