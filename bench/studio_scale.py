"""A large import into a real Label Studio, pre-labelled by an encoder-only backend (issue 12).

    .venv/bin/python bench/studio_scale.py --tasks 10000 --out bench/results/studio_scale.json
    .venv/bin/python bench/studio_scale.py --tasks 100000 --stop-at-meta --out bench/results/studio_scale_100k.json

Steps: Label Studio (SQLite) and the backend as processes; a project with 5% of Banking77 train as annotated
tasks (the anchors); then ``--tasks`` unlabelled tasks imported in calls of ``--import-batch`` (5,000), Banking77
train and test texts repeated with a numbered suffix past the 13,083 distinct ones, so that every text is
encoded. Times are counted from the end of the import: the first predictions (``/status`` ``predicted`` > 0),
all predictions written and the job done (the review tab's filter is final then), with the job's steps as
``/status`` showed them, the backend's peak RSS, and the tasks that really carry a prediction of the project's
model version at the end. Each import call's webhook queues a pre-label, so with several calls labelling
begins during the import; ``--import-batch`` equal to ``--tasks`` measures the one-webhook case.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, save  # noqa: E402
from served_llm import RateSampler, ServedLLM  # noqa: E402
from studio_backend import TOKEN, _annotated, _config, _rows, _rss_mb  # noqa: E402
from studio_writes import FLAG  # noqa: E402

from backend.studio import launch  # noqa: E402
from backend.studio.settings import Settings  # noqa: E402

IMPORT_BATCH = 5000


def texts_for(n: int, pool: list[str]) -> list[str]:
    """``n`` distinct texts: the pool, then the pool again with a numbered suffix."""
    return [pool[i % len(pool)] + (f" ({i // len(pool)})" if i >= len(pool) else "") for i in range(n)]


def status(url: str, project: int) -> dict:
    return requests.get(f"{url}/status", params={"project": project}, timeout=30).json()


def wait_idle(url: str, project: int, *, timeout: float, timeline: list | None = None, t0: float = 0.0,
              until_meta: bool = False) -> dict:
    """Poll /status until no job runs or waits; ``timeline`` collects each new step, first predictions.
    ``until_meta``: stop once no job waits and the running one writes its task meta (every prediction is
    written and the review tab final by then)."""
    deadline, last_step = time.time() + timeout, None
    while time.time() < deadline:
        now = status(url, project)
        job = now.get("job") or {}
        if until_meta and (job.get("step") or "").startswith("writing the meta") and now.get("pending_jobs") == 0:
            if timeline is not None:
                timeline.append({"s": round(time.perf_counter() - t0, 1), "step": "writing the meta",
                                 "done": job.get("done"), "predicted": job.get("predicted"), "rate": job.get("rate")})
            return now
        if timeline is not None:
            step = (job.get("step") or "").split(" (")[0]
            if step != last_step or job.get("predicted") != (timeline[-1]["predicted"] if timeline else None):
                timeline.append({"s": round(time.perf_counter() - t0, 1), "step": step, "done": job.get("done"),
                                 "predicted": job.get("predicted"), "rate": job.get("rate")})
                print(json.dumps(timeline[-1]), file=sys.stderr, flush=True)
                last_step = step
        if job.get("state") in ("done", "failed") and now.get("pending_jobs") == 0 and job.get("kind"):
            return now
        time.sleep(1.0)
    raise TimeoutError("the pre-label did not finish")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--task-meta", default="flagged", help="HCC_TASK_META of the backend")
    ap.add_argument("--chunk", type=int, default=None, help="HCC_PRELABEL_CHUNK of the backend (its default: unset)")
    ap.add_argument("--memory-efficient-import", action="store_true",
                    help=f"start Label Studio with {FLAG}=true (off by default in Label Studio 1.23.2)")
    ap.add_argument("--import-batch", type=int, default=IMPORT_BATCH,
                    help="tasks per import call (each call's webhook queues a pre-label; one call = one webhook)")
    ap.add_argument("--stop-at-meta", action="store_true",
                    help="stop once every prediction is written and the job writes the task meta (one PATCH per "
                         "flagged task: hours at 100,000 tasks)")
    ap.add_argument("--llm-delay", type=float, default=None,
                    help="also an OpenAI-compatible stand-in for a served LLM cluster answering after this many "
                         "seconds, any number at once (bench/served_llm.py); default: encoder only")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    train, test = _rows("train.csv"), _rows("test.csv")
    rng = random.Random(0)
    anchors = rng.sample(train, round(0.05 * len(train)))
    pool = [r["text"] for r in train + test]
    rng.shuffle(pool)
    config = _config(sorted({r["category"] for r in train}))
    work = Path(tempfile.mkdtemp(prefix="hcc-bench-scale-"))
    results: dict = {"machine": machine(), "tasks": args.tasks, "anchors": len(anchors),
                     "task_meta": args.task_meta, "chunk": args.chunk or Settings().prelabel_chunk,
                     "import_batch": args.import_batch,
                     "backend": "encoder only (MiniLM)"}
    from label_studio_sdk import LabelStudio

    ls_env = {FLAG: "true"} if args.memory_efficient_import else {}
    results["label_studio_env"] = ls_env
    ls_service = launch.start_label_studio(data_dir=work / "ls", username="bench@example.com",
                                           password="bench-pass", token=TOKEN, extra_env=ls_env)
    services: list = [ls_service]
    try:
        llm_env, llm = {"HCC_LLM_BASE_URL": ""}, None
        if args.llm_delay is not None:  # answers every text's label: a strong view the pool keeps asking
            llm = ServedLLM(delay=args.llm_delay, answers={r["text"]: r["category"] for r in train + test},
                            work=work)
            services.append(llm)
            llm_env = {"HCC_LLM_BASE_URL": llm.url, "HCC_LLM_MODEL": "served-stand-in"}
            results["backend"] = f"encoder + an LLM stand-in answering after {args.llm_delay} s (bench/served_llm.py)"
            results["llm_cap"] = Settings().llm_concurrency
        ls = LabelStudio(base_url=ls_service.url, api_key=TOKEN, timeout=600)
        backend = launch.start_backend({"LABEL_STUDIO_URL": ls_service.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                        "LOG_LEVEL": "WARNING", "MODEL_DIR": str(work / "model_dir"),
                                        **llm_env, "HCC_TASK_META": args.task_meta,
                                        **({"HCC_PRELABEL_CHUNK": str(args.chunk)} if args.chunk else {})},
                                       log=work / "backend.log")
        services.append(backend)
        project = ls.projects.create(title="bench scale", label_config=config)
        ls.ml.create(url=backend.url, project=project.id, title="hcc")
        ls.projects.import_tasks(id=project.id, request=_annotated(anchors))
        wait_idle(backend.url, project.id, timeout=600)

        texts = texts_for(args.tasks, pool)
        sampler = RateSampler(llm) if llm is not None else None
        t_start = time.perf_counter()
        for start in range(0, len(texts), args.import_batch):
            batch = texts[start:start + args.import_batch]
            ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in batch])
        t0 = time.perf_counter()
        results["import_s"] = round(t0 - t_start, 1)
        # Each import call's webhook queues a pre-label, so with several calls labelling begins during the import.
        results["predicted_when_the_import_ended"] = (status(backend.url, project.id).get("job") or {}).get("predicted")
        print(f"imported {len(texts)} tasks in {results['import_s']} s", file=sys.stderr, flush=True)
        timeline: list = []
        final = wait_idle(backend.url, project.id, timeout=args.timeout, timeline=timeline, t0=t0,
                          until_meta=args.stop_at_meta)
        results["first_predictions_s"] = next((e["s"] for e in timeline if (e["predicted"] or 0) > 0), None)
        # The last job's meta comes after every prediction and the review tab.
        results["all_predictions_and_review_tab_s"] = next(
            (e["s"] for e in reversed(timeline) if e["step"].startswith("writing the meta")),
            round(time.perf_counter() - t0, 1))
        results["job_done_s"] = None if args.stop_at_meta else round(time.perf_counter() - t0, 1)
        results["timeline"] = timeline
        if sampler is not None:  # from the import on
            results.update(sampler.summary())
        results["last_run"] = final.get("last_run")
        results["backend_peak_rss_mb"] = _rss_mb(backend.pid)
        version = ls.projects.get(id=project.id).model_version
        # Ids, predictions and the count of annotations only: every column would cost ~6 ms a task (10 min at 100k).
        listed = ls.tasks.list(project=project.id, fields="all", include="id,predictions,total_annotations",
                               page_size=500)
        rows = [t.model_dump() for t in listed]
        predicted = sum(any(p.get("model_version") == version for p in t.get("predictions") or [])
                        for t in rows if not t.get("total_annotations"))
        results["tasks_with_a_prediction"] = predicted
        results["tasks_with_two_predictions_of_the_version"] = sum(
            sum(p.get("model_version") == version for p in t.get("predictions") or []) > 1 for t in rows)
        tabs = [v for v in ls.views.list(project=project.id) if (v.data or {}).get("title") == "Needs review"]
        results["review_tab"] = bool(tabs)
    finally:
        for service in reversed(services):
            service.stop()
    save(results, args.out, shown={k: v for k, v in results.items() if k != "timeline"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
