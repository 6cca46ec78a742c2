"""Shared pytest fixtures. Each section is self-contained; append new ones in their own section."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------------
# Local LLM server (backend.models.local_llm): a real llama.cpp server on SmolLM2-135M, shared by the session
# --------------------------------------------------------------------------------------------------------
import importlib.util
from collections.abc import Iterator

import pytest

from backend.models.local_llm import free_port

LLM_TEST_MODEL = "smollm2-135m"  # ~94 MB: small enough for CI, only good for exercising the plumbing


@pytest.fixture
def unused_port() -> int:
    """A free loopback port, as a fixture so test modules need not import conftest."""
    return free_port()


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a llama.cpp server on SmolLM2, stopped after the session.

    The model is pulled into $HCC_CACHE_DIR (or the default cache), so only the first run downloads it.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'label-studio-hcc[llm]')")
    from backend.models import local_llm

    local_llm.pull(LLM_TEST_MODEL)
    port = free_port()
    # 2048 tokens is plenty for classification prompts and keeps the KV cache small.
    log_file = tmp_path_factory.mktemp("llm_server") / "server.log"  # kept by pytest for post-mortems
    proc = local_llm.serve(LLM_TEST_MODEL, port=port, n_ctx=2048, timeout=120.0, log_file=log_file, progress=False)
    try:
        yield local_llm.base_url_for("127.0.0.1", port)
    finally:
        local_llm.stop(proc)


# --------------------------------------------------------------------------------------------------------
# Label Studio 1.23.2 (installed in the project's environment) and the backend as real processes
# --------------------------------------------------------------------------------------------------------
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402

from backend.studio import launch  # noqa: E402

ROOT = launch.ROOT
LS_TOKEN = "hcc-test-token-0123456789"
wait_http = launch.wait_http


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real Label Studio on SQLite, on a free loopback port; yields ``{"url", "token", "log"}``."""
    try:
        service = launch.start_label_studio(data_dir=tmp_path_factory.mktemp("label_studio"),
                                            username="admin@example.com", password="hcc-test-pass", token=LS_TOKEN,
                                            timeout=240)
    except RuntimeError as exc:
        if "not installed" in str(exc):
            pytest.skip(str(exc))
        raise
    try:
        yield {"url": service.url, "token": LS_TOKEN, "log": service.log}
    finally:
        service.stop()


def BackendProcess(env: dict[str, str], log: Path, *, gunicorn_workers: int = 0) -> launch.Service:  # noqa: N802
    """The backend as a subprocess (``python _wsgi.py``, or gunicorn with that many workers)."""
    return launch.start_backend(env, log=log, gunicorn_workers=gunicorn_workers)


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def backend_status(world: dict) -> dict:
    """``/status`` of the project of an end-to-end ``world`` (keys ``backend`` and ``project``)."""
    return requests.get(f"{world['backend'].url}/status", params={"project": world["project"]}, timeout=5).json()


def settled_status(world: dict, *, timeout: float = 120) -> dict:
    """The status once no job runs or waits (webhooks queue their work in the background)."""
    def idle():
        status = backend_status(world)
        return status if status["pending_jobs"] == 0 and status["job"].get("state") in ("done", "failed") else None
    return wait_until(idle, timeout=timeout, what="background jobs to finish")


def project_tasks(world: dict) -> dict[int, dict]:
    """Every task of the world's project, with annotations and predictions, by id."""
    return {t.id: t.model_dump() for t in world["ls"].tasks.list(project=world["project"], fields="all")}
