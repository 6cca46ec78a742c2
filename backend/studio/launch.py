"""Start Label Studio and the backend as local processes (the demo, the end-to-end tests, the benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from backend.models.local_llm import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_http(url: str, *, timeout: float, proc: subprocess.Popen | None = None, headers: dict | None = None,
              log: Path | None = None, auth: tuple[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail at once, with the log's tail, when the process died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-25:]) if log and log.exists() else ""
            raise RuntimeError(f"the process serving {url} exited with code {proc.returncode}:\n{tail}")
        try:
            if requests.get(url, headers=headers, auth=auth, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s" + (f" (see {log})" if log else ""))


def label_studio_env(*, username: str, password: str, token: str, data_dir: Path) -> dict[str, str]:
    """Non-interactive Label Studio on SQLite that may call a backend on a loopback address."""
    return {"LABEL_STUDIO_USERNAME": username, "LABEL_STUDIO_PASSWORD": password, "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}


class Service:
    """A child process with its URL and log; ``stop()`` terminates it (then kills it after 20 s)."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path, url: str,
                 new_session: bool = False) -> None:
        self.name, self.url, self.log = name, url, log
        with open(log, "a") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=cwd, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_label_studio(*, data_dir: Path, username: str, password: str, token: str, port: int = 0,
                       timeout: float = 300, new_session: bool = False,
                       extra_env: dict[str, str] | None = None) -> Service:
    exe = Path(sys.executable).with_name("label-studio")
    if not exe.exists():
        raise RuntimeError("label-studio is not installed in this environment (pip install 'label-studio-hcc[studio]')")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {**label_studio_env(username=username, password=password, token=token, data_dir=data_dir),
           **(extra_env or {})}
    log = data_dir / "label-studio.log"
    service = Service("Label Studio", [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                       str(port)], env=env, log=log, cwd=data_dir, url=f"http://127.0.0.1:{port}",
                      new_session=new_session)
    try:
        wait_http(f"{service.url}/api/projects", timeout=timeout, proc=service.proc, log=log,
                  headers={"Authorization": f"Token {token}"})
    except BaseException:
        service.stop()
        raise
    return service


def start_backend(env: dict[str, str], *, log: Path, port: int = 0, gunicorn_workers: int = 0,
                  timeout: float = 120, new_session: bool = False) -> Service:
    """``python _wsgi.py`` (or gunicorn with ``gunicorn_workers``) from the checkout, with ``env`` added."""
    port = port or free_port()
    if gunicorn_workers:
        cmd = [str(Path(sys.executable).with_name("gunicorn")), "--bind", f"127.0.0.1:{port}", "--workers",
               str(gunicorn_workers), "--threads", "4", "--timeout", "300", "_wsgi:app"]
    else:
        cmd = [sys.executable, str(ROOT / "_wsgi.py"), "--host", "127.0.0.1", "--port", str(port)]
    service = Service("the backend", cmd, env=env, log=log, cwd=ROOT, url=f"http://127.0.0.1:{port}",
                      new_session=new_session)
    auth = (env["BASIC_AUTH_USER"], env.get("BASIC_AUTH_PASS", "")) if env.get("BASIC_AUTH_USER") else None
    try:
        wait_http(f"{service.url}/health", timeout=timeout, proc=service.proc, log=log, auth=auth)
    except BaseException:
        service.stop()
        raise
    return service
