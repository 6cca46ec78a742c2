"""LLM calls/s that one backend process sustains against a served LLM, and how many requests it holds.

The endpoint stands in for a vLLM cluster or a hosted API: ``tests/fault_server.FaultServer`` in a child
process (real HTTP/1.1 with keep-alive, one thread per connection) answering every chat request after
``--delay`` s (300 ms), any number at once. Two more endpoints show the limit's other side: one that
refuses with 429 above 32 requests in flight (a rate-limited API), and one that serves one request at a time
and queues the rest (the embedded llama.cpp server with one slot).

The client is what the backend runs: one ``LLMAnnotator`` with its on-disk answer cache (a fresh one per
run, so every question is a call) asking the choice question (the pipeline's default view: which of 5
candidate labels fits the text) about Banking77 texts. Reported per run: calls/s over the middle 80% of the
answers (sustained, without the start and the tail), over the whole run, the most requests in flight seen
by the client's limit and by the server, and the client's CPU time per call. ``raw`` runs the OpenAI client
alone from as many threads as the cap (no annotator, no cache, no limit): the ceiling of the client itself.
``--embedded MODEL`` instead asks the embedded llama.cpp server (one request at a time) with caps 1, 4 and 64.
``--cache-writes`` measures the answer cache's writes/s from 10 threads with SQLite's synchronous=FULL (the
default, before) and NORMAL (what the cache uses).

    nice -n 10 .venv/bin/python bench/llm_concurrency.py --out bench/results/llm_concurrency.json
    nice -n 10 .venv/bin/python bench/llm_concurrency.py --embedded qwen2.5-coder-1.5b --items 40 \
        --out bench/results/llm_concurrency_embedded.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.labelling.concurrency import AdaptiveLimit  # noqa: E402
from backend.labelling.llm import LLMAnnotator  # noqa: E402
from backend.labelling.llm_cache import ResponseCache  # noqa: E402
from backend.models.local_llm import free_port  # noqa: E402
from backend.studio import launch  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "clusterllm_nlu" / "banking77"
CANDIDATES = 5


@dataclass(frozen=True)
class Scenario:
    name: str
    cap: int
    items: int
    capacity: int | None = None  # the server refuses (429) above this many in flight
    slots: int | None = None  # the server serves this many at once and queues the rest
    raw: bool = False  # the OpenAI client alone


SCENARIOS = {
    "cap4": Scenario("cap4", 4, 200),  # the old fixed default
    "cap16": Scenario("cap16", 16, 800),
    "cap64": Scenario("cap64", 64, 3000),  # the default cap
    "cap128": Scenario("cap128", 128, 3000),
    "raw64": Scenario("raw64", 64, 3000, raw=True),
    "refuse32": Scenario("refuse32", 64, 2000, capacity=32),
    "oneslot": Scenario("oneslot", 64, 40, slots=1),
}


# -- the endpoint, in its own process ----------------------------------------------------------------------
def serve(port: int, delay: float, capacity: int | None, slots: int | None) -> None:
    """Child mode: a keep-alive FaultServer answering each choice with its first candidate after ``delay``."""
    from tests import fault_server as fs

    def respond(body: dict[str, Any]) -> fs.Action:
        schema = (body.get("response_format") or {}).get("schema") or {}
        enum = schema.get("properties", {}).get("label", {}).get("enum") or ["unknown"]
        return fs.label(enum[0], delay=delay)

    server = fs.FaultServer(default=respond, keep_alive=True, port=port, capacity=capacity, slots=slots)
    server.start()
    print(f"test LLM on {server.url}", flush=True)
    threading.Event().wait()


class Endpoint:
    def __init__(self, delay: float, scenario: Scenario, log: Path) -> None:
        self.port = free_port()
        cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port),
               "--delay", str(delay)]
        if scenario.capacity:
            cmd += ["--capacity", str(scenario.capacity)]
        if scenario.slots:
            cmd += ["--slots", str(scenario.slots)]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        launch.wait_http(f"{self.url}/models", timeout=30, proc=self.proc, log=log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def counters(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as answer:
            return json.load(answer)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- the client ------------------------------------------------------------------------------------------
def questions(count: int, seed: int) -> tuple[list[str], list[list[str]], list[str]]:
    rows = [json.loads(line) for name in ("small.jsonl", "large.jsonl") for line in (DATA / name).open()]
    labels = sorted({r["label"] for r in rows})
    rng = random.Random(seed)
    picked = rng.sample(rows, count) if count <= len(rows) else [rng.choice(rows) for _ in range(count)]
    # a suffix makes each text unique: repeated texts would be answered by the cache, not the endpoint
    texts = [f"{r['input']} (#{i})" for i, r in enumerate(picked)]
    return texts, [rng.sample(labels, CANDIDATES) for _ in texts], labels


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sustained(finished: list[float], started: float) -> float:
    """Answers per second between the 10% and the 90% point of the run."""
    ordered = sorted(finished)
    lo, hi = ordered[len(ordered) // 10], ordered[(9 * len(ordered)) // 10]
    return (0.8 * len(ordered)) / (hi - lo) if hi > lo else float("nan")


def run_annotator(scenario: Scenario, url: str, seed: int, model: str = "test") -> dict[str, Any]:
    texts, candidates, labels = questions(scenario.items, seed)
    finished: list[float] = []
    with tempfile.TemporaryDirectory() as cache:
        llm = LLMAnnotator(labels, base_url=url, model=model, cache_dir=cache, concurrency=scenario.cap,
                           timeout=300, max_retries=6)
        llm.limiter = AdaptiveLimit(scenario.cap)  # a fresh limit per run, as in a new process
        llm.serves_llama_cpp()  # the model list is asked once, before the clock starts
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        answers = llm.choose(texts, candidates, progress=lambda: finished.append(time.perf_counter()))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    snap = llm.limiter.snapshot()
    return {"seconds": round(wall, 2), "calls_per_s": round(len(texts) / wall, 1),
            "sustained_calls_per_s": round(sustained(finished, t0), 1),
            "client_max_in_flight": snap.max_in_flight, "final_limit": snap.limit, "increases": snap.increases,
            "decreases": snap.decreases, "calls": llm.stats.calls, "failures": llm.stats.failures,
            "answered": sum(a.valid for a in answers), "cpu_ms_per_call": round(1000 * cpu / llm.stats.calls, 2)}


def run_raw(scenario: Scenario, url: str, seed: int) -> dict[str, Any]:
    """The OpenAI client alone: the same number of requests from ``cap`` threads, nothing else."""
    texts, _, _ = questions(scenario.items, seed)
    client = openai.OpenAI(base_url=url, api_key="none", timeout=60, max_retries=0)
    finished: list[float] = []

    def ask(text: str) -> None:
        client.chat.completions.create(model="test", messages=[{"role": "user", "content": text}], max_tokens=8)
        finished.append(time.perf_counter())

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(scenario.cap) as pool:
        list(pool.map(ask, texts))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"seconds": round(wall, 2), "calls_per_s": round(len(texts) / wall, 1),
            "sustained_calls_per_s": round(sustained(finished, t0), 1), "calls": len(texts),
            "cpu_ms_per_call": round(1000 * cpu / len(texts), 2)}


def run_embedded(model: str, items: int, repeats: int) -> dict[str, Any]:
    """The annotator against the embedded llama.cpp server (llama-cpp-python: one request at a time)."""
    from backend.models import local_llm

    port = free_port()
    proc = local_llm.serve(model, port=port, progress=False)
    url = local_llm.base_url_for("127.0.0.1", port)
    out: dict[str, Any] = {"model": model, "items": items, "caps": {}}
    try:
        run_annotator(Scenario("warm", 1, 4), url, 99, model=model)  # load the weights, warm the prefix
        for cap in (1, 4, 64):
            runs = [run_annotator(Scenario(f"cap{cap}", cap, items), url, seed, model=model)
                    for seed in range(repeats)]
            for run in runs:
                run["load_average"] = round(os.getloadavg()[0], 1)
                print("embedded", cap, json.dumps(run), flush=True)
            out["caps"][cap] = {"runs": runs, "summary": summarise(runs)}
    finally:
        local_llm.stop(proc)
    return out


def cache_writes(synchronous: str, writes: int = 300, threads: int = 10) -> float:
    """Answers stored per second by ``threads`` threads into a fresh cache file."""
    answer = {"content": '{"label": "card arrival"}', "logprobs": []}
    with tempfile.TemporaryDirectory() as folder:
        cache = ResponseCache(Path(folder) / "llm_responses.sqlite")

        def write(worker: int) -> None:
            cache._connect().execute(f"PRAGMA synchronous={synchronous}")  # this thread's connection
            for i in range(writes // threads):
                cache.put(f"{worker}-{i}", answer)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, range(threads)))
        return writes / (time.perf_counter() - t0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"mean": round(statistics.fmean(values), 2), "sd": round(statistics.stdev(values), 2)
                    if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", type=float, default=0.3, help="seconds the endpoint takes per answer")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--embedded", metavar="MODEL", help="ask the embedded llama.cpp server running MODEL instead")
    ap.add_argument("--items", type=int, default=40, help="questions per run with --embedded")
    ap.add_argument("--cache-writes", action="store_true", help="measure the answer cache's writes/s instead")
    ap.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # child mode: the endpoint
    ap.add_argument("--capacity", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--slots", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.delay, args.capacity, args.slots)
        return 0
    if args.cache_writes:
        result = {mode: [round(cache_writes(mode), 1) for _ in range(args.repeats)] for mode in ("FULL", "NORMAL")}
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps({"writes_per_s": result, "threads": 10}, indent=1) + "\n")
        return 0
    if args.embedded:
        result = {"cpus": _cpus(), "repeats": args.repeats, **run_embedded(args.embedded, args.items, args.repeats)}
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return 0

    results: dict[str, Any] = {"delay_s": args.delay, "repeats": args.repeats, "cpus": _cpus(), "scenarios": {}}
    with tempfile.TemporaryDirectory() as logs:
        for name in args.scenarios.split(","):
            scenario = SCENARIOS[name]
            runs = []
            for seed in range(args.repeats):
                endpoint = Endpoint(args.delay, scenario, Path(logs) / "llm.log")
                try:
                    run = (run_raw if scenario.raw else run_annotator)(scenario, endpoint.url, seed)
                    server = endpoint.counters()
                finally:
                    endpoint.close()
                run.update(server_max_in_flight=server["max_in_flight"], server_refused=server["refused"],
                           load_average=round(os.getloadavg()[0], 1))  # the machine is shared: say how busy
                runs.append(run)
                print(name, seed, json.dumps(run), flush=True)
            results["scenarios"][name] = {"cap": scenario.cap, "items": scenario.items,
                                          "capacity": scenario.capacity, "slots": scenario.slots,
                                          "raw": scenario.raw, "runs": runs, "summary": summarise(runs)}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
