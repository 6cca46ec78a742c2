"""Fault and load benchmark (issue 14): a pre-label of thousands of tasks under webhooks, /predict and faults.

    .venv/bin/python bench/faults.py --tasks 2000 --out bench/results/faults.json
    .venv/bin/python bench/faults.py --quick          # 200 tasks, shorter fault windows: a smoke run

What runs, all on 127.0.0.1:

    harness --SDK--> Label Studio --webhooks--> tap --> backend --LABEL_STUDIO_URL--> studio proxy --> Label Studio
    harness --/predict (direct)--> backend --HCC_LLM_BASE_URL--> fake LLM (its own process)

- Label Studio 1.23 (``launch.start_label_studio``, temp data dir) and the backend (``launch.start_backend``,
  ``MODEL_DIR`` in the temp dir, ``HCC_TRAIN=0``).
- The LLM is ``tests/fault_server.FaultServer`` in a child process (so it can be ``kill -9``-ed and started
  again on the same port). It answers after ``--llm-delay`` s with a valid label: the text's gold label when
  it is among the candidates asked about, else the first candidate (a good LLM, so the pool adopts it and
  the job asks it about every unsure task).
- The *studio proxy* sits between the backend and Label Studio and injects Label Studio's faults: a window
  of 502/503 answers, then a window where every request stalls past the backend's 30 s client timeout.
- The *tap* sits between Label Studio and the backend and records the status of every webhook Label Studio
  sends (Label Studio itself swallows webhook failures); it never injects faults.

Timeline: a project of Banking77 texts; 5% of the tasks are imported first with annotations (the anchors),
then the rest (this import's TASKS_CREATED starts the measured pre-label job). From that import on, a thread
creates / updates / deletes annotations through Label Studio's API at ``--webhook-rate`` per second (each
fires Label Studio's ML-backend webhook), and another calls /predict directly with batches of 10 tasks. The
faults are triggered by the job's step (``/status``): the LLM is killed once the job asks it, for
``--llm-down`` s; the backend is ``kill -9``-ed once the job writes predictions and restarted at once on the
same port (same env, same MODEL_DIR); a few seconds after that restart the studio proxy fails then stalls.
When the faults are over and the backend's /status shows no pending job, the counts are taken from Label
Studio's task listing and the backend's state file.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import machine  # noqa: E402

from backend.models.local_llm import free_port  # noqa: E402
from backend.studio import launch  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "banking77"
SAMPLES = ROOT / "backend" / "samples"
TOKEN = "bench-faults-token-0123456789"
FROM_NAME = "intent"
CLIENT_TIMEOUT = 30.0  # backend.studio.client.StudioClient's default: a stall must outlast it
WEBHOOK_TIMEOUT = 1.0  # Label Studio's WEBHOOK_TIMEOUT: a slower webhook is dropped by Label Studio


# -- data ------------------------------------------------------------------------------------------------
def load_rows() -> list[dict[str, str]]:
    """Banking77 (text, category): the full train split from ../shared/data, else the bundled sample."""
    sources = [SHARED / "train.csv", SHARED / "test.csv"] if (SHARED / "train.csv").exists() else \
        [SAMPLES / "banking77_anchors.csv", SAMPLES / "banking77_tasks.csv"]
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for path in sources:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                text = row["text"].strip()
                if text and text not in seen:  # a duplicate text would make the gold lookup ambiguous
                    seen.add(text)
                    rows.append({"text": text, "category": row["category"]})
    return rows


def label_config(labels: list[str]) -> str:
    return (f'<View><Text name="text" value="$text"/><Choices name="{FROM_NAME}" toName="text">'
            + "".join(f'<Choice value="{c}"/>' for c in labels) + "</Choices></View>")


def choice(label: str) -> list[dict[str, Any]]:
    return [{"from_name": FROM_NAME, "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


# -- the fake LLM, in its own process ----------------------------------------------------------------------
def serve_llm(port: int, delay: float, gold_path: Path) -> None:
    """Child mode: a FaultServer on ``port`` answering valid labels after ``delay`` s, until killed."""
    from tests import fault_server as fs

    gold: dict[str, str] = json.loads(gold_path.read_text())

    def respond(body: dict[str, Any]) -> fs.Action:
        try:
            enum = body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
        except (KeyError, TypeError):
            enum = []
        text = str(body["messages"][-1].get("content", "")).rsplit("Text: ", 1)[-1].strip()
        right = gold.get(text)
        return fs.label(right if right in enum else (enum[0] if enum else "unknown"), delay=delay)

    server = fs.FaultServer(default=respond)
    # FaultServer binds port 0; the restarted LLM must come back on the port the backend was given.
    server._httpd = ThreadingHTTPServer(("127.0.0.1", port), fs._make_handler(server))
    server._httpd.daemon_threads = True
    print(f"fake LLM on http://127.0.0.1:{port}/v1", flush=True)
    server._httpd.serve_forever(poll_interval=0.05)


class LLMProcess:
    """The fake LLM as a child process, so that it can be killed with SIGKILL and started on the same port."""

    def __init__(self, port: int, delay: float, gold_path: Path, log: Path) -> None:
        self.port, self.delay, self.gold_path, self.log = port, delay, gold_path, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-llm", str(self.port),
               "--llm-delay", str(self.delay), "--gold", str(self.gold_path)]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        launch.wait_http(f"{self.url}/models", timeout=30, proc=self.proc, log=self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# -- a reverse proxy that records and injects faults -------------------------------------------------------
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "host"}


@dataclass
class Relayed:
    """One request through a proxy: when (s since the run's start), what, the status it got, how long."""

    t: float
    method: str
    path: str
    status: int | None  # None: no answer (a stall, the client gone)
    seconds: float
    outcome: str  # forwarded | injected_error | stalled | upstream_down


class FaultProxy:
    """HTTP reverse proxy to ``upstream``; ``mode`` is ``pass``, ``error`` or ``stall``; every request recorded.

    ``error`` answers 502 and 503 in turn without forwarding (Label Studio never sees the request); ``stall``
    forwards the request (Label Studio does the work) and holds the answer ``stall_seconds``, past the
    client's timeout: a Label Studio too slow to answer in time, whose writes still happen.
    """

    def __init__(self, upstream: str, *, t0: float, port: int = 0, stall_seconds: float = CLIENT_TIMEOUT + 5) -> None:
        parts = urlsplit(upstream)
        self.host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.t0, self.stall_seconds = t0, stall_seconds
        self.mode = "pass"
        self.records: list[Relayed] = []
        self._lock = threading.Lock()
        self._errors = 0
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _record(self, record: Relayed) -> None:
        with self._lock:
            self.records.append(record)

    def _next_error(self) -> int:
        with self._lock:
            self._errors += 1
            return 502 if self._errors % 2 else 503

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes):
        conn = http.client.HTTPConnection(self.host, self.upstream_port, timeout=600)
        try:
            conn.request(method, path, body=body or None,
                         headers={**headers, "Host": f"{self.host}:{self.upstream_port}"})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 120  # an idle keep-alive connection does not hold a thread forever

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def _relay(self) -> None:
                start = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.mode  # as the request arrives
                if mode == "error":
                    status = proxy._next_error()
                    self._answer(status, [("Content-Type", "application/json")],
                                 json.dumps({"detail": f"fault injected: {status}"}).encode())
                    outcome = "injected_error"
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    try:
                        status, out_headers, data = proxy._forward(self.command, self.path, headers, body)
                        outcome = "forwarded"
                    except OSError as exc:  # upstream killed or not up yet
                        status, out_headers, outcome = 502, [("Content-Type", "application/json")], "upstream_down"
                        data = json.dumps({"detail": f"upstream down: {type(exc).__name__}"}).encode()
                    if mode == "stall" and outcome == "forwarded":
                        proxy._stopping.wait(proxy.stall_seconds)
                        outcome = "stalled"
                    self._answer(status, out_headers, data)
                proxy._record(Relayed(round(start - proxy.t0, 3), self.command, self.path.split("?")[0], status,
                                      round(time.time() - start, 4), outcome))

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers:
                        if name.lower() not in HOP_BY_HOP:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    self.close_connection = True  # the client gave up

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _relay  # noqa: N815 - http.server naming

        return Handler


class StudioFaults:
    """Label Studio's faults as the benchmark uses them: a window of 5xx, a window of stalls, off again.

    Uses the project's reusable proxy (``tests/studio/studio_proxy.py``) when the checkout has it, else this
    file's :class:`FaultProxy`. Either way 5xx are answered without forwarding, and a stalled request is
    forwarded and its answer held past the backend's client timeout.
    """

    METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")

    def __init__(self, upstream: str, *, t0: float, stall_seconds: float = CLIENT_TIMEOUT + 5) -> None:
        self.stall_seconds = stall_seconds
        self._armed: list = []
        try:
            from tests.studio.studio_proxy import StudioProxy
        except ImportError:
            StudioProxy = None  # noqa: N806 - a class, when present
        if StudioProxy is not None:
            self.impl, self._shared, self._own = "tests/studio/studio_proxy.py", StudioProxy(upstream), None
            self._hits = {"injected_error": 0, "stalled": 0}
        else:
            self.impl, self._shared = "bench/faults.py FaultProxy", None
            self._own = FaultProxy(upstream, t0=t0, stall_seconds=stall_seconds)
        self.url = (self._shared or self._own).url

    def set(self, mode: str) -> None:
        """``pass``, ``error`` or ``stall`` from now on."""
        if self._own is not None:
            self._own.mode = mode
            return
        for fault in self._armed:  # end the previous window; count what it did
            self._hits["injected_error" if fault.mode == "502_before" else "stalled"] += fault.hits
            fault.times = 0
        self._armed = []
        if mode != "pass":
            kind = "502_before" if mode == "error" else "slow_after"
            self._armed = [self._shared.fault(m, r"^/", kind, times=10**9, delay=self.stall_seconds)
                           for m in self.METHODS]

    def summary(self) -> dict[str, Any]:
        if self._own is not None:
            return {"impl": self.impl, **summarize_relayed(self._own.records)}
        return {"impl": self.impl, "requests": len(self._shared.seen), "by_outcome": dict(self._hits)}

    def stop(self) -> None:
        (self._shared or self._own).stop()


# -- load: annotation changes through Label Studio, and /predict -------------------------------------------
@dataclass
class Call:
    t: float  # seconds since the run's start
    kind: str
    status: int | None  # HTTP status, None when no answer came
    seconds: float
    detail: str = ""
    task: int | None = None
    annotation: int | None = None


class AnnotationLoad:
    """Creates, updates and deletes annotations through Label Studio's API at ``rate`` per second.

    Each change fires Label Studio's ML-backend webhook (sent synchronously by Label Studio, 1 s timeout,
    failures swallowed), so this is the webhook load. Tasks are the anchors' tasks and a review pool of
    unlabelled tasks (those then count as labelled at the end, unless their annotation was deleted again).
    """

    def __init__(self, ls, *, tasks: list[int], annotations: dict[int, int], labels: list[str], gold: dict[int, str],
                 rate: float, rng: random.Random, t0: float, threads: int = 2) -> None:
        self.ls, self.tasks, self.labels, self.gold = ls, tasks, labels, gold
        self.rate, self.rng, self.t0 = rate, rng, t0
        self.imported = dict(annotations)  # annotation id -> task id: the anchors' own annotations
        self.created: dict[int, int] = {}  # annotations this load created and did not delete
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"annotations-{i}")
                         for i in range(threads)]
        self._next = time.time()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _slot(self) -> None:
        """One shared schedule for all threads: ``rate`` operations per second in total."""
        with self._lock:
            wait = self._next - time.time()
            self._next = max(self._next, time.time()) + 1.0 / self.rate
        if wait > 0:
            self._stop.wait(wait)

    def _pick(self) -> tuple[str, int | None, int | None]:
        with self._lock:
            roll = self.rng.random()
            if roll < 0.45 or not self.created:
                return "create", self.rng.choice(self.tasks), None
            if roll < 0.85:
                pool = list(self.created.items()) + list(self.imported.items())
                annotation, task = self.rng.choice(pool)
                return "update", task, annotation
            annotation = self.rng.choice(list(self.created))
            return "delete", self.created.pop(annotation), annotation  # no other thread may update it meanwhile

    def _label(self, task: int) -> str:
        with self._lock:  # mostly right, as a reviewer would be
            return self.gold[task] if self.rng.random() < 0.8 else self.rng.choice(self.labels)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._slot()
            if self._stop.is_set():
                return
            kind, task, annotation = self._pick()
            start = time.time()
            status, detail = 200, ""
            try:
                if kind == "create":
                    annotation = self.ls.annotations.create(id=task, result=choice(self._label(task))).id
                    with self._lock:
                        self.created[annotation] = task
                elif kind == "update":
                    self.ls.annotations.update(id=annotation, result=choice(self._label(task)))
                else:
                    self.ls.annotations.delete(id=annotation)
            except Exception as exc:  # recorded: Label Studio refusing the reviewer's change is a finding
                status, detail = getattr(exc, "status_code", None), f"{type(exc).__name__}: {str(exc)[:200]}"
                if kind == "delete" and status != 404:
                    with self._lock:
                        self.created[annotation] = task  # it may still exist
            with self._lock:
                self.calls.append(Call(round(start - self.t0, 3), kind, status, round(time.time() - start, 4), detail,
                                       task, annotation))


class PredictLoad:
    """Calls the backend's /predict with batches of 10 tasks in the body Label Studio sends, back to back."""

    def __init__(self, url: str, *, tasks: list[dict], project: str, config: str, rng: random.Random, t0: float,
                 batch: int = 10, pause: float = 0.2) -> None:
        self.url, self.tasks, self.project, self.config, self.rng, self.t0 = url, tasks, project, config, rng, t0
        self.batch, self.pause = batch, pause
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="predict")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=200)

    def _body(self) -> dict[str, Any]:
        tasks = [{"id": t["id"], "data": t["data"], "meta": {}, "annotations": [], "predictions": [],
                  "drafts": [], "project": int(self.project.split(".")[0])}
                 for t in self.rng.sample(self.tasks, self.batch)]
        return {"tasks": tasks, "model_version": None, "project": self.project, "label_config": self.config,
                "params": {"login": None, "password": None, "context": None}}

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            body = self._body()
            start = time.time()
            try:
                r = session.post(f"{self.url}/predict", json=body, timeout=150)
                status, detail = r.status_code, "" if r.ok else r.text[:200]
                if r.ok:
                    results = r.json().get("results") or []
                    errors = sum(1 for p in results if p.get("error"))
                    detail = f"{len(results)} results" + (f", {errors} with error" if errors else "")
            except requests.RequestException as exc:  # the backend killed: no answer
                status, detail = None, type(exc).__name__
            self.calls.append(Call(round(start - self.t0, 3), "predict", status, round(time.time() - start, 4), detail))
            self._stop.wait(self.pause if status is not None else 0.5)


# -- watching the backend --------------------------------------------------------------------------------
class Timeline:
    """What happened when (seconds since the run's start), printed as it happens."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.events: list[dict[str, Any]] = []

    def note(self, event: str, **detail: Any) -> None:
        entry = {"t": round(time.time() - self.t0, 2), "event": event, **detail}
        self.events.append(entry)
        print(json.dumps(entry), flush=True)


def backend_status(url: str, project: int) -> dict[str, Any] | None:
    try:
        return requests.get(f"{url}/status", params={"project": project}, timeout=5).json()
    except (requests.RequestException, ValueError):
        return None  # down (killed, restarting)


def job_of(status: dict[str, Any] | None) -> dict[str, Any]:
    return (status or {}).get("job") or {}


def prelabel_at(*steps: str):
    """A test of /status's job: the pre-label runs and its step starts with one of ``steps``."""
    return lambda job: job.get("kind") == "prelabel" and job.get("state") == "running" and \
        str(job.get("step", "")).startswith(steps)


def wait_for_step(backend: dict, project: int, accept, *, timeout: float, since: float,
                  unless: threading.Event | None = None) -> dict[str, Any]:
    """Poll /status until ``accept(job)`` holds, the pre-label has finished after ``since`` or ``unless`` is
    set (the fault is then injected where the job is: /status says where, and the timeline records it)."""
    deadline = time.time() + timeout
    job: dict[str, Any] = {}
    while time.time() < deadline and not (unless is not None and unless.is_set()):
        job = job_of(backend_status(backend["service"].url, project))
        finished = job.get("kind") == "prelabel" and job.get("state") in ("done", "failed") and \
            (job.get("finished") or 0) > since
        if job and (accept(job) or finished):
            return job
        time.sleep(0.25)
    return job


def settled(url: str, project: int, *, timeout: float, quiet: float = 5.0) -> tuple[dict[str, Any] | None, bool]:
    """The status once no job runs, waits or is queued and nothing changed for ``quiet`` s (webhooks queue
    re-votes); (last status, False) on timeout, e.g. a job that died with its process and was never resumed."""
    deadline, stable_since, last_key = time.time() + timeout, None, None
    status = None
    while time.time() < deadline:
        status = backend_status(url, project)
        job = job_of(status)
        idle = status is not None and status.get("pending_jobs") == 0 and job.get("state") in ("done", "failed")
        key = (job.get("state"), job.get("finished"), (status or {}).get("anchors"))
        if idle and key == last_key:
            if stable_since is not None and time.time() - stable_since >= quiet:
                return status, True
        else:
            stable_since = time.time() if idle else None
        last_key = key
        time.sleep(0.5)
    return status, False


def wait_prelabel_over(backend: dict, project: int, *, timeout: float) -> dict[str, Any]:
    """Until two polls in a row show no pre-label running, waiting or queued (at most ``timeout`` s)."""
    deadline, quiet = time.time() + timeout, 0
    job: dict[str, Any] = {}
    while time.time() < deadline and quiet < 2:
        job = job_of(backend_status(backend["service"].url, project))
        over = job and (job.get("kind") != "prelabel" or job.get("state") in ("done", "failed"))
        quiet = quiet + 1 if over else 0
        time.sleep(1.0)
    return job


# -- the faults ------------------------------------------------------------------------------------------
@dataclass
class Windows:
    llm_down: float
    llm_kill_after: float  # s into the job's LLM step
    backend_kill_after: float  # s into the job's "writing predictions" step
    studio_errors: float
    studio_stall: float
    studio_after_restart: float  # s after the restarted backend answers


def llm_fault(llm: LLMProcess, backend: dict, project: int, w: Windows, timeline: Timeline, since: float) -> None:
    # Once the job asks the LLM; when it never does (too few anchors to weigh the LLM), once it writes.
    job = wait_for_step(backend, project, prelabel_at("LLM", "writing"), timeout=900, since=since,
                        unless=backend["restarted"])
    time.sleep(w.llm_kill_after)
    job = job_of(backend_status(backend["service"].url, project)) or job
    llm.kill()
    timeline.note("llm killed", job_state=job.get("state"), job_step=job.get("step"), done=job.get("done"),
                  total=job.get("total"))
    time.sleep(w.llm_down)
    llm.start()
    timeline.note("llm restarted")


def backend_fault(backend: dict, project: int, env: dict[str, str], log: Path, w: Windows, timeline: Timeline,
                  since: float) -> None:
    try:
        kill_and_restart(backend, project, env, log, w, timeline, since)
    finally:
        backend["restarted"].set()


def kill_and_restart(backend: dict, project: int, env: dict[str, str], log: Path, w: Windows, timeline: Timeline,
                     since: float) -> None:
    service = backend["service"]
    job = wait_for_step(backend, project, prelabel_at("writing predictions"), timeout=1800, since=since)
    time.sleep(w.backend_kill_after)
    job = job_of(backend_status(service.url, project)) or job
    os.kill(service.pid, signal.SIGKILL)  # no clean-up of any kind, as when the OOM killer or a node dies
    service.proc.wait()
    timeline.note("backend killed (SIGKILL)", pid=service.pid, job_state=job.get("state"), job_step=job.get("step"),
                  done=job.get("done"), total=job.get("total"))
    port = urlsplit(service.url).port
    backend["service"] = launch.start_backend(env, log=log, port=port)
    status = backend_status(backend["service"].url, project)
    timeline.note("backend restarted", pid=backend["service"].pid, job_state=job_of(status).get("state"),
                  job_step=job_of(status).get("step"), pending_jobs=(status or {}).get("pending_jobs"))


def studio_fault(proxy: StudioFaults, backend: dict, project: int, w: Windows, timeline: Timeline) -> None:
    backend["restarted"].wait()
    time.sleep(w.studio_after_restart)
    job = job_of(backend_status(backend["service"].url, project))
    proxy.set("error")
    timeline.note("label studio faults: 502/503", seconds=w.studio_errors, job_state=job.get("state"),
                  job_step=job.get("step"))
    time.sleep(w.studio_errors)
    job = job_of(backend_status(backend["service"].url, project))
    proxy.set("stall")
    timeline.note("label studio faults: stall", seconds=w.studio_stall, stall_each=proxy.stall_seconds,
                  job_state=job.get("state"), job_step=job.get("step"))
    time.sleep(w.studio_stall)
    proxy.set("pass")
    timeline.note("label studio faults over")


# -- counting --------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def annotation_label(annotation: dict[str, Any]) -> str | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            return choices[0] if choices else None
    return None


def studio_listing(ls, project: int) -> list[dict[str, Any]]:
    return [t.model_dump() for t in ls.tasks.list(project=project, fields="all", page_size=500)]


def stored_anchors(model_dir: Path, project: int) -> dict[int, tuple[int, str]]:
    """annotation id -> (task id, label), read from the backend's own state file."""
    path = model_dir / "projects" / str(project) / "state.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        return {int(a): (int(t), lab) for a, t, lab in db.execute("SELECT annotation_id, task_id, label FROM anchors")}


def ops_on(calls: list[Call], annotation: int) -> list[dict[str, Any]]:
    return [asdict(c) for c in calls if c.annotation == annotation]


def count_anchors(tasks: list[dict], stored: dict[int, tuple[int, str]], calls: list[Call]) -> dict[str, Any]:
    in_studio = {int(a["id"]): (int(t["id"]), annotation_label(a)) for t in tasks for a in t.get("annotations") or []
                 if not a.get("was_cancelled") and annotation_label(a) is not None}
    missing = sorted(set(in_studio) - set(stored))
    extra = sorted(set(stored) - set(in_studio))
    wrong = sorted(a for a in set(in_studio) & set(stored) if in_studio[a][1] != stored[a][1])
    return {"label_studio_annotations": len(in_studio), "backend_anchors": len(stored),
            "equal": not (missing or extra or wrong), "missing_in_backend": len(missing),
            "extra_in_backend": len(extra), "wrong_label": len(wrong),
            "examples": {"missing": [{"annotation": a, "task": in_studio[a][0], "ops": ops_on(calls, a)}
                                     for a in missing[:10]],
                         "extra": [{"annotation": a, "task": stored[a][0], "ops": ops_on(calls, a)}
                                   for a in extra[:10]],
                         "wrong_label": [{"annotation": a, "studio": in_studio[a][1], "backend": stored[a][1],
                                          "ops": ops_on(calls, a)} for a in wrong[:10]]}}


def count_predictions(tasks: list[dict], version: str, measured: set[int], t_import: float) -> dict[str, Any]:
    """Per task of the measured import: predictions of the project's model version (unlabelled: exactly 1)."""
    per_task: dict[int, int] = {}
    latest = 0.0
    versions: Counter = Counter()
    labelled_counts: Counter = Counter()
    dupes: list[dict[str, Any]] = []
    for task in tasks:
        preds = task.get("predictions") or []
        versions.update(str(p.get("model_version")) for p in preds)
        if int(task["id"]) not in measured:
            continue
        ours = [p for p in preds if p.get("model_version") == version]
        labelled = any(not a.get("was_cancelled") for a in task.get("annotations") or [])
        if labelled:
            labelled_counts[min(len(ours), 2)] += 1
        else:
            per_task[int(task["id"])] = len(ours)
            for p in ours:
                latest = max(latest, datetime.fromisoformat(str(p["created_at"]).replace("Z", "+00:00")).timestamp())
        if len(ours) > 1:
            dupes.append({"task": task["id"], "labelled": labelled,
                          "predictions": [{"id": p["id"], "created_at": str(p["created_at"]), "score": p.get("score")}
                                          for p in ours]})
    hist = Counter(min(n, 2) for n in per_task.values())
    return {"model_version": version, "unlabelled_tasks": len(per_task), "exactly_one": hist[1], "none": hist[0],
            "two_or_more": hist[2], "tasks_without": sorted(t for t, n in per_task.items() if n == 0)[:30],
            "duplicates": dupes[:20], "labelled_tasks": {str(k): v for k, v in sorted(labelled_counts.items())},
            "predictions_by_version": dict(versions),
            "import_to_last_prediction_s": round(latest - t_import, 1) if latest else None}


def summarize_calls(calls: list[Call], *, start: float, end: float) -> dict[str, Any]:
    """Statuses of every call; latency percentiles of the answered ones between ``start`` and ``end`` (the
    import and the moment the backend settled), the calls that hit a killed backend left out."""
    ok = [c.seconds for c in calls if c.status is not None and c.status < 400 and start <= c.t <= end]
    failed = [c for c in calls if c.status is not None and c.status >= 500]
    return {"requests": len(calls), "by_status": dict(Counter(str(c.status) for c in calls)),
            "5xx": len(failed), "no_answer": sum(1 for c in calls if c.status is None),
            "p50_ms_during_job": percentile(ok, 0.5), "p99_ms_during_job": percentile(ok, 0.99),
            "max_ms_during_job": percentile(ok, 1.0), "answered_during_job": len(ok),
            "examples_5xx": [asdict(c) for c in failed[:10]]}


def summarize_relayed(records: list[Relayed], path_suffix: str | None = None) -> dict[str, Any]:
    rows = [r for r in records if path_suffix is None or r.path.endswith(path_suffix)]
    return {"requests": len(rows), "by_outcome": dict(Counter(r.outcome for r in rows)),
            "by_status": dict(Counter(str(r.status) for r in rows)),
            "backend_5xx": sum(1 for r in rows if r.outcome == "forwarded" and (r.status or 0) >= 500),
            "over_1s": sum(1 for r in rows if r.outcome == "forwarded" and r.seconds > WEBHOOK_TIMEOUT),
            "examples_5xx": [asdict(r) for r in rows if r.outcome == "forwarded" and (r.status or 0) >= 500][:10]}


def log_problems(log: Path) -> dict[str, Any]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [ln for ln in lines if "[ERROR]" in ln or "[CRITICAL]" in ln]
    return {"lines": len(lines), "tracebacks": sum(1 for ln in lines if ln.startswith("Traceback")),
            "error_lines": len(errors), "first_errors": [ln[:300] for ln in errors[:15]]}


# -- the report ------------------------------------------------------------------------------------------
def table(r: dict[str, Any]) -> str:
    a, p, pr, wh, ops = r["anchors"], r["predictions"], r["predict"], r["webhooks"], r["annotation_ops"]
    proxy = r["studio_proxy"]["by_outcome"]
    rows = [
        ("tasks (of them imported with annotations)", f"{r['tasks']} ({r['anchor_tasks']})"),
        ("annotation changes through Label Studio (create / update / delete)",
         f"{ops['requests']} ({ops['by_kind']}), {ops['failed']} failed"),
        ("anchors in the backend = Label Studio's annotations",
         f"{'yes' if a['equal'] else 'NO'}: {a['backend_anchors']} / {a['label_studio_annotations']} (missing "
         f"{a['missing_in_backend']}, extra {a['extra_in_backend']}, wrong label {a['wrong_label']})"),
        ("unlabelled tasks with exactly 1 prediction of the model version",
         f"{p['exactly_one']} of {p['unlabelled_tasks']} (0: {p['none']}, 2+: {p['two_or_more']})"),
        ("/predict requests: 5xx / no answer (backend down)", f"{pr['5xx']} / {pr['no_answer']} of {pr['requests']}"),
        ("/predict p50 / p99 during the job (ms)", f"{pr['p50_ms_during_job']} / {pr['p99_ms_during_job']}"),
        ("webhooks: backend 5xx / backend down / slower than 1 s",
         f"{wh['backend_5xx']} / {wh['by_outcome'].get('upstream_down', 0)} / {wh['over_1s']} of {wh['requests']}"),
        ("Label Studio requests the proxy failed / stalled",
         f"{proxy.get('injected_error', 0)} / {proxy.get('stalled', 0)}"
         f" of {r['studio_proxy']['requests']}"),
        ("import -> last prediction written (s)", str(p["import_to_last_prediction_s"])),
        ("import -> settled (s)", str(r["import_to_settled_s"])),
        ("job at the end", f"{r['final_job'].get('state')} ({r['final_job'].get('kind')}), settled: {r['settled']}"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


# -- the run ---------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2000, help="tasks in the project, 5%% of them with annotations")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="200 tasks and short fault windows: a smoke run")
    ap.add_argument("--webhook-rate", type=float, default=8.0, help="annotation changes per second")
    ap.add_argument("--llm-delay", type=float, default=0.05, help="seconds the fake LLM takes per answer")
    ap.add_argument("--llm-down", type=float, default=20.0)
    ap.add_argument("--studio-errors", type=float, default=12.0, help="seconds of 502/503 from Label Studio")
    ap.add_argument("--studio-stall", type=float, default=15.0, help="seconds of stalled Label Studio requests")
    ap.add_argument("--settle-timeout", type=float, default=600.0)
    ap.add_argument("--load-tail", type=float, default=120.0,
                    help="after the faults, the annotation load goes on until no pre-label runs, at most this long")
    ap.add_argument("--serve-llm", type=int, default=0, help=argparse.SUPPRESS)  # child mode: the fake LLM
    ap.add_argument("--gold", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.tasks = min(args.tasks, 200)
        args.llm_down, args.studio_errors, args.studio_stall = 8.0, 6.0, 6.0
        args.settle_timeout, args.load_tail = min(args.settle_timeout, 300.0), min(args.load_tail, 60.0)
    return args


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def measured_code() -> dict[str, str]:
    """The checkout measured, and the newest main commit it contains (the backend code is main's)."""
    base = git("merge-base", "HEAD", "main")
    return {"head": git("log", "-1", "--format=%h %s"), "main_in_head": git("log", "-1", "--format=%h %s", base),
            "dirty": git("status", "--porcelain", "--untracked-files=no") != ""}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from label_studio_sdk import LabelStudio

    rng = random.Random(args.seed)
    rows = rng.sample(load_rows(), args.tasks)
    n_anchors = max(1, round(0.05 * args.tasks))
    anchor_rows, task_rows = rows[:n_anchors], rows[n_anchors:]
    labels = sorted({r["category"] for r in load_rows()})
    config = label_config(labels)
    gold_path = work / "gold.json"
    gold_path.write_text(json.dumps({r["text"]: r["category"] for r in rows}))
    t0 = time.time()
    timeline = Timeline(t0)
    windows = Windows(llm_down=args.llm_down, llm_kill_after=2.0, backend_kill_after=1.0,
                      studio_errors=args.studio_errors, studio_stall=args.studio_stall, studio_after_restart=3.0)

    services: list = []
    proxies: list[FaultProxy | StudioFaults] = []
    llm = LLMProcess(free_port(), args.llm_delay, gold_path, work / "llm.log")
    backend: dict[str, Any] = {"restarted": threading.Event()}
    try:
        studio = launch.start_label_studio(data_dir=work / "label-studio", username="bench@example.com",
                                           password="bench-faults-pass", token=TOKEN)
        services.append(studio)
        timeline.note("label studio up", url=studio.url)
        llm.start()
        studio_proxy = StudioFaults(studio.url, t0=t0)
        proxies.append(studio_proxy)
        env = {"LABEL_STUDIO_URL": studio_proxy.url, "LABEL_STUDIO_API_KEY": TOKEN,
               "MODEL_DIR": str(work / "model_dir"), "HCC_CACHE_DIR": str(work / "model_dir" / "cache"),
               "HCC_TRAIN": "0", "HCC_LLM_BASE_URL": llm.url, "HCC_LLM_MODEL": "fault-model",
               "HCC_LLM_STRUCTURED": "json_schema", "HCC_LLM_LOGPROBS": "0", "LOG_LEVEL": "INFO"}
        backend_log = work / "backend.log"
        backend["service"] = launch.start_backend(env, log=backend_log)
        tap = FaultProxy(backend["service"].url, t0=t0)  # Label Studio -> backend; only records
        proxies.append(tap)
        timeline.note("backend up", url=backend["service"].url, pid=backend["service"].pid, tap=tap.url,
                      studio_proxy=studio_proxy.url, llm=llm.url)

        ls = LabelStudio(base_url=studio.url, api_key=TOKEN, timeout=120)
        project = ls.projects.create(title="faults and load", label_config=config)
        ls.ml.create(url=tap.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=[
            {"data": {"text": r["text"], "gold": r["category"]}, "annotations": [{"result": choice(r["category"])}]}
            for r in anchor_rows])
        first, ok = settled(backend["service"].url, project.id, timeout=600)
        timeline.note("anchors imported", anchors=(first or {}).get("anchors"), settled=ok)
        anchor_tasks = studio_listing(ls, project.id)
        before = {int(t["id"]) for t in anchor_tasks}

        t_import = time.time()
        timeline.note("import starts", tasks=len(task_rows))
        ls.projects.import_tasks(id=project.id, request=[{"data": {"text": r["text"], "gold": r["category"]}}
                                                         for r in task_rows])
        listing = studio_listing(ls, project.id)
        new_tasks = [t for t in listing if int(t["id"]) not in before]
        timeline.note("import returned", tasks=len(new_tasks))
        gold = {int(t["id"]): t["data"]["gold"] for t in listing}
        review_pool = [int(t["id"]) for t in rng.sample(new_tasks, max(1, len(new_tasks) // 20))]
        annotations = {int(a["id"]): int(t["id"]) for t in anchor_tasks for a in t["annotations"]}
        load = AnnotationLoad(ls, tasks=[int(t["id"]) for t in anchor_tasks] + review_pool, annotations=annotations,
                              labels=labels, gold=gold, rate=args.webhook_rate, rng=random.Random(args.seed + 1), t0=t0)
        created = project.created_at.timestamp() if project.created_at else time.time()
        predict = PredictLoad(backend["service"].url, tasks=new_tasks, project=f"{project.id}.{created:.0f}",
                              config=config, rng=random.Random(args.seed + 2), t0=t0)
        load.start()
        predict.start()

        faults = [threading.Thread(target=llm_fault, args=(llm, backend, project.id, windows, timeline, t_import)),
                  threading.Thread(target=backend_fault, args=(backend, project.id, env, backend_log, windows, timeline,
                                                               t_import)),
                  threading.Thread(target=studio_fault, args=(studio_proxy, backend, project.id, windows, timeline))]
        for thread in faults:
            thread.start()
        for thread in faults:
            thread.join()
        timeline.note("faults over")
        # Webhooks go on while the pre-label runs; then they stop so that the re-votes they queue end and the
        # backend can settle. A job that died with its process and was never resumed stays "running" in the
        # store: the tail bounds that wait.
        quiet_job = wait_prelabel_over(backend, project.id, timeout=args.load_tail)
        load.stop()
        timeline.note("annotation load stopped", ops=len(load.calls), job=quiet_job)
        final, ok = settled(backend["service"].url, project.id, timeout=args.settle_timeout)
        t_settled = time.time()
        predict.stop()
        timeline.note("settled" if ok else "did not settle", job=job_of(final),
                      pending=(final or {}).get("pending_jobs"), predict_calls=len(predict.calls))

        listing = studio_listing(ls, project.id)
        version = ls.projects.get(id=project.id).model_version or ""
        stored = stored_anchors(Path(env["MODEL_DIR"]), project.id)
        ops = load.calls
        return {
            "machine": machine() + " (shared with other work)",
            "code": measured_code(), "seed": args.seed, "quick": args.quick,
            "tasks": args.tasks, "anchor_tasks": n_anchors, "review_pool": len(review_pool),
            "llm_delay_s": args.llm_delay, "webhook_rate_per_s": args.webhook_rate, "windows": asdict(windows),
            "studio_proxy_stall_each_s": studio_proxy.stall_seconds,
            "anchors": {**count_anchors(listing, stored, ops), "status_anchors": (final or {}).get("anchors")},
            "predictions": count_predictions(listing, version, {int(t["id"]) for t in new_tasks}, t_import),
            "predict": summarize_calls(predict.calls, start=t_import - t0, end=t_settled - t0),
            "webhooks": summarize_relayed(tap.records, "/webhook"),
            "tap_all": summarize_relayed(tap.records),
            "studio_proxy": studio_proxy.summary(),
            "annotation_ops": {"requests": len(ops), "by_kind": dict(Counter(c.kind for c in ops)),
                               "failed": sum(1 for c in ops if c.status != 200),
                               "failures": [asdict(c) for c in ops if c.status != 200][:10],
                               "p50_ms": percentile([c.seconds for c in ops], 0.5),
                               "p99_ms": percentile([c.seconds for c in ops], 0.99),
                               "rate_per_s": round(len(ops) / max(1e-6, ops[-1].t - ops[0].t), 2) if ops else 0.0},
            "import_to_settled_s": round(t_settled - t_import, 1),
            "settled": ok, "final_job": job_of(final), "last_run": (final or {}).get("last_run"),
            "llm": (final or {}).get("llm"), "timeline": timeline.events,
            "backend_log": log_problems(backend_log), "work_dir": str(work),
        }
    finally:
        for proxy in proxies:
            proxy.stop()
        if backend.get("service") is not None:
            backend["service"].stop()
        llm.kill()
        for service in reversed(services):
            service.stop()


def main() -> int:
    args = parse_args()
    if args.serve_llm:
        serve_llm(args.serve_llm, args.llm_delay, args.gold)
        return 0
    work = Path(tempfile.mkdtemp(prefix="hcc-bench-faults-"))
    print(f"work dir {work}", flush=True)
    result = run(args, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"\nresults in {args.out}; logs in {work}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
