"""The ML backend against a real Label Studio: /predict latency and throughput, import-to-predictions time, RSS.

    .venv/bin/python bench/studio_backend.py --llm-base-url http://127.0.0.1:8091/v1 --llm-model qwen2.5-coder-1.5b \
        --out bench/results/studio_backend.json

``--second-encoder all-mpnet-base-v2`` measures the same with the second encoder's opinion (pulled first).

Steps (Banking77 from ../shared/data, 5% of train imported as annotated tasks = anchors):
1. /predict for 1 task, ``--single`` times on different test texts: with the LLM (answers not cached), then the
   same requests again (answers cached): p50/p95 latency.
2. /predict for a batch of 100 tasks, LLM not cached then cached, and with the encoder alone: tasks/s. The
   backend's own overhead per task is the cached batch's time / 100 (encoder, DCCA, state, JSON; the LLM
   cache lookups included).
3. Import ``--import-tasks`` test tasks into a project served by an encoder-only backend and time until every
   prediction is written, the project's model_version switched and task meta written (the LLM adds its own
   calls x latency on top: see docs/benchmarks.md, LLM throughput).
4. Peak RSS of the backend processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine  # noqa: E402

from backend.studio import launch  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
TOKEN = "bench-token-0123456789abcdef"


def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def _config(labels: list[str]) -> str:
    return ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text">'
            + "".join(f'<Choice value="{c}"/>' for c in labels) + "</Choices></View>")


def _annotated(rows: list[dict[str, str]]) -> list[dict]:
    return [{"data": {"text": r["text"]}, "annotations": [{"result": [
        {"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [r["category"]]}}]}]}
        for r in rows]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # peak resident set size
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _wait_job(backend_url: str, project: int, timeout: float = 7200, steps: dict | None = None) -> dict:
    """Wait until no job runs or waits; ``steps`` collects when each job step was first seen."""
    deadline, t0 = time.time() + timeout, time.perf_counter()
    while time.time() < deadline:
        status = requests.get(f"{backend_url}/status", params={"project": project}, timeout=10).json()
        job = status.get("job") or {}
        if steps is not None and job.get("step"):
            steps.setdefault(job["step"], round(time.perf_counter() - t0, 1))
        if job.get("state") in ("done", "failed") and status.get("pending_jobs") == 0:
            return status
        time.sleep(0.5)
    raise TimeoutError("pre-labelling did not finish")


def _predict(url: str, tasks: list[dict], project: int, config: str) -> float:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/predict", json={"tasks": tasks, "project": f"{project}.0", "label_config": config},
                      timeout=3600)
    r.raise_for_status()
    assert len(r.json()["results"]) == len(tasks)
    return time.perf_counter() - t0


def _pcts(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(1000 * statistics.median(ordered), 1),
            "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-base-url", required=True)
    ap.add_argument("--llm-model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--llm-structured", default="grammar")
    ap.add_argument("--single", type=int, default=20, help="1-task /predict requests")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--import-tasks", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--second-encoder", default="", help="HCC_SECOND_ENCODER of both backends (e.g. all-mpnet-base-v2)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    train, test = _rows("train.csv"), _rows("test.csv")
    rng = random.Random(args.seed)
    anchors = rng.sample(train, round(0.05 * len(train)))
    rng.shuffle(test)
    labels = sorted({r["category"] for r in train})
    config = _config(labels)
    work = Path(tempfile.mkdtemp(prefix="hcc-bench-studio-"))
    results: dict = {"machine": machine(), "anchors": len(anchors), "llm": args.llm_model,
                     "second_encoder": args.second_encoder or None}

    from label_studio_sdk import LabelStudio

    ls_service = launch.start_label_studio(data_dir=work / "ls", username="bench@example.com", password="bench-pass",
                                           token=TOKEN)
    ls = LabelStudio(base_url=ls_service.url, api_key=TOKEN)
    base_env = {"LABEL_STUDIO_URL": ls_service.url, "LABEL_STUDIO_API_KEY": TOKEN, "LOG_LEVEL": "WARNING",
                "HCC_LLM_MODEL": args.llm_model, "HCC_LLM_STRUCTURED": args.llm_structured, "HCC_LLM_LOGPROBS": "0",
                "HCC_SECOND_ENCODER": args.second_encoder}
    services = [ls_service]
    try:
        with_llm = launch.start_backend({**base_env, "MODEL_DIR": str(work / "md-llm"),
                                         "HCC_LLM_BASE_URL": args.llm_base_url}, log=work / "backend-llm.log")
        encoder_only = launch.start_backend({**base_env, "MODEL_DIR": str(work / "md-enc"), "HCC_LLM_BASE_URL": ""},
                                            log=work / "backend-enc.log")
        services += [with_llm, encoder_only]

        project = ls.projects.create(title="bench predict", label_config=config)
        ls.ml.create(url=with_llm.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=_annotated(anchors))
        _wait_job(with_llm.url, project.id)
        enc_project = ls.projects.create(title="bench predict encoder", label_config=config)
        ls.ml.create(url=encoder_only.url, project=enc_project.id, title="hcc")
        ls.projects.import_tasks(id=enc_project.id, request=_annotated(anchors))
        _wait_job(encoder_only.url, enc_project.id)

        def tasks(rows, start_id):
            return [{"id": start_id + i, "data": {"text": r["text"]}} for i, r in enumerate(rows)]

        singles = tasks(test[:args.single], 10_000_000)
        cold = [_predict(with_llm.url, [t], project.id, config) for t in singles]
        warm = [_predict(with_llm.url, [t], project.id, config) for t in singles]
        enc = [_predict(encoder_only.url, [t], enc_project.id, config) for t in singles]
        results["predict_1_task"] = {"llm_not_cached": _pcts(cold), "llm_cached": _pcts(warm),
                                     "encoder_only": _pcts(enc), "requests": len(singles)}
        print(json.dumps(results["predict_1_task"]), flush=True)

        batch = tasks(test[args.single:args.single + args.batch], 20_000_000)
        cold_s = _predict(with_llm.url, batch, project.id, config)
        warm_s = _predict(with_llm.url, batch, project.id, config)
        enc_s = _predict(encoder_only.url, batch, enc_project.id, config)
        results[f"predict_batch_{len(batch)}"] = {
            "llm_not_cached_tasks_per_s": round(len(batch) / cold_s, 2),
            "llm_cached_tasks_per_s": round(len(batch) / warm_s, 1),
            "encoder_only_tasks_per_s": round(len(batch) / enc_s, 1),
            "overhead_ms_per_task_llm_cached": round(1000 * warm_s / len(batch), 2),
            "overhead_ms_per_task_encoder_only": round(1000 * enc_s / len(batch), 2),
        }
        print(json.dumps(results[f"predict_batch_{len(batch)}"]), flush=True)

        big = ls.projects.create(title="bench import", label_config=config)
        ls.ml.create(url=encoder_only.url, project=big.id, title="hcc")
        ls.projects.import_tasks(id=big.id, request=_annotated(anchors))
        _wait_job(encoder_only.url, big.id)
        rows = test[:args.import_tasks]
        t0 = time.perf_counter()
        ls.projects.import_tasks(id=big.id, request=[{"data": {"text": r["text"]}} for r in rows])
        t_import = time.perf_counter() - t0
        steps: dict = {}
        status = _wait_job(encoder_only.url, big.id, steps=steps)
        total = time.perf_counter() - t0
        # The last chunk's meta write starts once every prediction is written.
        meta_started = max((s for step, s in steps.items() if step.startswith("writing the meta")),
                           default=float("nan"))
        results["import_to_predictions"] = {
            "tasks": len(rows), "backend": "encoder only", "import_call_s": round(t_import, 1),
            "predictions_written_s": round(t_import + meta_started, 1),
            "meta_written_s": round(total, 1), "job": status.get("last_run")}
        print(json.dumps(results["import_to_predictions"]), flush=True)
        results["backend_peak_rss_mb"] = {"with_llm": _rss_mb(with_llm.pid), "encoder_only": _rss_mb(encoder_only.pid)}
    finally:
        for service in reversed(services):
            service.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
