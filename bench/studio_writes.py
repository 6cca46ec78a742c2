"""What each of the backend's writes costs in a real Label Studio as the project grows (issue 12).

    .venv/bin/python bench/studio_writes.py --sizes 5000,25000,50000 --out bench/results/studio_writes.json
    .venv/bin/python bench/studio_writes.py --sizes 5000,25000,50000 --memory-efficient-import \\
        --out bench/results/studio_writes_flag.json

A pre-label writes a chunk with a bulk prediction import, reads the chunk's prediction ids back, sets the
project's model version and checks the review tab; the task meta is one PATCH per task, and a single prediction
can also be created through ``/api/predictions``. This times each of those calls, through the backend's own
client, at growing project sizes: the project is filled to each size with tasks that all carry a prediction (as
in a project the backend has pre-labelled), then each call is timed on tasks drawn from it, with a model version
of its own. ``--memory-efficient-import`` starts Label Studio with its feature flag
``fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short`` on (off by default in 1.23.2): with it
off, Label Studio recounts the annotations and predictions of every task of the project after each bulk import.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, save  # noqa: E402
from studio_backend import TOKEN, _config  # noqa: E402

from backend.studio import launch  # noqa: E402
from backend.studio.client import StudioClient  # noqa: E402

LABELS = ["alpha", "beta", "gamma"]
FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
IMPORT_CALL = 5000  # tasks per import call while filling the project


def prediction(task: int, version: str, rng: random.Random) -> dict:
    label = rng.choice(LABELS)
    return {"task": task, "model_version": version, "score": round(rng.random(), 4), "result": [
        {"from_name": "intent", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]}


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return round(time.perf_counter() - t0, 3)


def fill(client: StudioClient, ls, project: int, have: int, size: int, rng: random.Random) -> list[int]:
    """Import tasks up to ``size``, each with a prediction of version ``base``; return every task id."""
    for start in range(have, size, IMPORT_CALL):
        n = min(IMPORT_CALL, size - start)
        ls.projects.import_tasks(id=project, request=[{"text": f"task {start + i}"} for i in range(n)])
    ids = sorted(t.id for t in client.tasks(project, include="id"))
    # The new tasks (ids grow), in one call: Label Studio takes 250 MB bodies, and this is set-up, not measured.
    if ids[have:]:
        client._send_one_import(project, [prediction(t, "base", rng) for t in ids[have:]])
    return ids


def measure(client: StudioClient, project: int, ids: list[int], size: int, rng: random.Random) -> dict:
    row: dict = {"tasks": size}
    for n in (250, 2000, 5000):
        chunk = rng.sample(ids, min(n, len(ids)))
        version = f"v{size}-{n}"
        row[f"bulk_import_{n}_s"] = timed(client.import_predictions, project, [prediction(t, version, rng)
                                                                               for t in chunk])
        row[f"read_ids_{n}_s"] = timed(client.prediction_ids, project, version, tasks=chunk)
    row["set_model_version_s"] = timed(client.set_model_version, project, f"v{size}-5000")
    row["review_tab_s"] = timed(client.ensure_review_tab, project, threshold=rng.random())
    one = rng.sample(ids, 200)
    row["one_by_one_200_s"] = timed(client.create_predictions, [prediction(t, f"single{size}", rng) for t in one])
    row["meta_200_s"] = timed(client.update_meta, {t: {"hcc_needs_review": True} for t in one}, merge=True,
                              owned=("hcc_needs_review",))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="5000,25000,50000", help="project sizes (tasks), ascending")
    ap.add_argument("--memory-efficient-import", action="store_true", help=f"start Label Studio with {FLAG}=true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="hcc-bench-writes-"))
    extra = {FLAG: "true"} if args.memory_efficient_import else {}
    results: dict = {"machine": machine(), "label_studio_env": extra, "rows": []}
    from label_studio_sdk import LabelStudio

    service = launch.start_label_studio(data_dir=work / "ls", username="bench@example.com", password="bench-pass",
                                        token=TOKEN, extra_env=extra)
    try:
        ls = LabelStudio(base_url=service.url, api_key=TOKEN, timeout=1800)
        client = StudioClient(service.url, TOKEN, timeout=1800, import_timeout=1800)
        project = ls.projects.create(title="bench writes", label_config=_config(LABELS)).id
        rng, have = random.Random(0), 0
        for size in sizes:
            t0 = time.perf_counter()
            ids = fill(client, ls, project, have, size, rng)
            print(f"filled to {size} tasks in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            have = size
            results["rows"].append(measure(client, project, ids, size, rng))
    finally:
        service.stop()
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
