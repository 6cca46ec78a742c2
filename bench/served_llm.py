"""A stand-in for a served LLM cluster, for the scale benchmark: answers after a fixed delay, any number at once.

    .venv/bin/python bench/served_llm.py --serve PORT --delay 0.3 --answers answers.json   # child mode

``tests/fault_server.FaultServer`` (real HTTP/1.1, keep-alive, one thread per connection) answers each chat
request after ``--delay`` seconds with a label of the request's own label set (the JSON schema's enum): the
text's label from ``--answers`` (text -> label; a numbered suffix " (n)" is dropped) when it is one of the
candidates, else the first candidate. So the LLM view is a strong annotator, and the backend's pool keeps
asking it: the benchmark measures how fast the backend keeps such a cluster busy, not the LLM's quality.
``/stats`` gives the requests so far and the most held at once; :class:`RateSampler` reads it every second.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.models.local_llm import free_port  # noqa: E402
from backend.studio import launch  # noqa: E402

SUFFIX = re.compile(r" \(\d+\)$")


def _label_set(body: dict[str, Any]) -> list[str]:
    fmt = body.get("response_format") or {}
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema") or {}
    return schema.get("properties", {}).get("label", {}).get("enum") or []


def _text(body: dict[str, Any]) -> str:
    users = [m.get("content") or "" for m in body.get("messages") or [] if m.get("role") == "user"]
    last = users[-1] if users else ""
    return SUFFIX.sub("", last.rsplit("Text: ", 1)[-1].strip())


def serve(port: int, delay: float, answers: Path) -> None:
    from tests import fault_server as fs

    gold: dict[str, str] = json.loads(answers.read_text())

    def respond(body: dict[str, Any]) -> fs.Action:
        labels = _label_set(body) or ["unknown"]
        label = gold.get(_text(body))
        return fs.label(label if label in labels else labels[0], delay=delay)

    server = fs.FaultServer(default=respond, keep_alive=True, port=port)
    server.start()
    print(f"served-LLM stand-in on {server.url}", flush=True)
    threading.Event().wait()


class ServedLLM:
    """The stand-in in a child process; ``stats()`` reads its counters."""

    def __init__(self, *, delay: float, answers: dict[str, str], work: Path) -> None:
        self.port = free_port()
        path = work / "llm_answers.json"
        path.write_text(json.dumps(answers))
        log = work / "served_llm.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port), "--delay", str(delay),
               "--answers", str(path)]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        launch.wait_http(f"{self.url}/models", timeout=60, proc=self.proc, log=log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as answer:
            return json.load(answer)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class RateSampler:
    """Reads the stand-in's request count every second in a thread; ``summary()``: calls, calls/s."""

    def __init__(self, llm: ServedLLM) -> None:
        self.llm, self.samples = llm, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self.llm.stats()
                self.samples.append((time.perf_counter(), stats["requests"], stats["max_in_flight"]))
            except OSError:
                pass
            self._stop.wait(1.0)

    def summary(self, window: float = 30.0) -> dict[str, Any]:
        """The calls, the time from the first to the last, calls/s over it, the best ``window``-second rate,
        and the most requests held at once."""
        self._stop.set()
        self._thread.join(timeout=5)
        moving = [(t, n) for t, n, _ in self.samples]
        first = next((i for i, (_, n) in enumerate(moving) if n > moving[0][1]), None) if moving else None
        if first is None:
            return {"llm_calls": 0}
        last = max(i for i, (_, n) in enumerate(moving) if n > moving[i - 1][1])
        t0, n0 = moving[first - 1]
        t1, n1 = moving[last]
        best = 0.0
        for i in range(first - 1, last + 1):
            j = next((k for k in range(i, last + 1) if moving[k][0] - moving[i][0] >= window), None)
            if j is not None:
                best = max(best, (moving[j][1] - moving[i][1]) / (moving[j][0] - moving[i][0]))
        return {"llm_calls": n1 - moving[0][1], "llm_seconds": round(t1 - t0, 1),
                "llm_calls_per_s": round((n1 - n0) / max(t1 - t0, 1e-9), 1),
                f"llm_calls_per_s_best_{int(window)}s": round(best, 1),
                "llm_max_in_flight": max(m for _, _, m in self.samples)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.3)
    ap.add_argument("--answers", type=Path, required=True)
    args = ap.parse_args()
    serve(args.serve, args.delay, args.answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
