"""Where the backend sends a Label Studio key: only ever to the URL it was configured with (issue 14, item 1).

A real loopback HTTP server stands in for a stranger's host and records every Authorization header it gets.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.studio.client import StudioError
from backend.studio.service import HCCService
from backend.studio.settings import Settings

CONFIG = ("<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='yes'/>"
          "<Choice value='no'/></Choices></View>")
SECRET = "configured-secret-token-0123456789"


@pytest.fixture
def stranger():
    """A host that records the Authorization header of every request (and answers 401)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            seen.append(self.headers.get("Authorization") or "")
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_setup_cannot_redirect_the_configured_key(tmp_path, stranger):
    url, seen = stranger
    service = HCCService(Settings(model_dir=tmp_path, label_studio_api_key=SECRET))
    service.setup({"project": 1, "schema": CONFIG, "hostname": url, "access_token": "the-callers-token"})
    health = service.check_label_studio_now()
    assert not any(SECRET in header for header in seen)  # the configured key never went to the caller's host
    assert health["label_studio"]["ok"] is False and "LABEL_STUDIO_URL is not set" in health["label_studio"]["error"]


def test_setup_credentials_are_used_as_a_pair_when_nothing_is_configured(tmp_path, stranger):
    url, seen = stranger
    service = HCCService(Settings(model_dir=tmp_path))
    service.setup({"project": 1, "schema": CONFIG, "hostname": url, "access_token": "the-callers-token"})
    service.check_label_studio_now()
    assert seen and all("the-callers-token" in header for header in seen)


def test_a_configured_url_is_never_paired_with_the_setup_token(tmp_path, stranger):
    url, seen = stranger
    service = HCCService(Settings(model_dir=tmp_path, label_studio_url=url))
    service.setup({"project": 1, "schema": CONFIG, "hostname": "http://127.0.0.1:9", "access_token": "tok-123456"})
    with pytest.raises(StudioError, match="LABEL_STUDIO_API_KEY is not set"):
        service.client()
    assert seen == []
