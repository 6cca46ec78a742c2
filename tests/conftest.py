"""Shared pytest fixtures. Each section is self-contained; append new ones in their own section."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------------
# Local LLM server (backend.local_llm): a real llama.cpp server on SmolLM2-135M, shared by the session
# --------------------------------------------------------------------------------------------------------
import importlib.util
from collections.abc import Iterator

import pytest

from backend.local_llm import free_port

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
    from backend import local_llm

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
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LS_TOKEN = "hcc-test-token-0123456789"


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None, headers=None, log: Path | None = None):
    """Poll ``url`` until it answers 200; fail early with the log tail when the process died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real Label Studio on SQLite, on a free loopback port; yields ``{"url", "token"}``."""
    exe = Path(sys.executable).with_name("label-studio")
    if not exe.exists():
        pytest.skip("label-studio is not installed (pip install 'label-studio-hcc[studio]')")
    data_dir = tmp_path_factory.mktemp("label_studio")
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": "hcc-test-pass",
           "LABEL_STUDIO_USER_TOKEN": LS_TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false",
           "COLLECT_ANALYTICS": "false", "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}
    log = data_dir / "label_studio.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/projects", timeout=180, proc=proc, headers={"Authorization": f"Token {LS_TOKEN}"},
                  log=log)
        yield {"url": url, "token": LS_TOKEN, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class BackendProcess:
    """The ML backend (``python _wsgi.py`` or gunicorn) as a subprocess with its own env and log."""

    def __init__(self, env: dict[str, str], log: Path, *, gunicorn_workers: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        if gunicorn_workers:
            cmd = [str(Path(sys.executable).with_name("gunicorn")), "--bind", f"127.0.0.1:{self.port}",
                   "--workers", str(gunicorn_workers), "--threads", "4", "--timeout", "300", "_wsgi:app"]
        else:
            cmd = [sys.executable, "_wsgi.py", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/health", timeout=120, proc=self.proc, log=log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
