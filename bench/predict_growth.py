"""/predict cost against the number of records a project has stored (issue 14, item 11: unbounded growth).

A DCCA project (the configuration that votes with earlier consistent records) with 30 anchors and N stored
records, three in four of them consistent; the real MiniLM encoder with its on-disk cache; an LLM stand-in
that answers at once (its time is not the backend's and does not grow with the project). After one warm-up
request (the first request after a start reads the project once), it times ``ProjectModel.label`` of one
new task, as /predict runs it, and reports the median over ``--repeats`` requests per size.

The stored texts repeat 2,000 distinct sentences: each is encoded once, so what is timed is what a request
costs when every vector is already cached (the state of a long-running project), not MiniLM.

    .venv/bin/python bench/predict_growth.py                      # 1,000 / 10,000 / 80,000 records
    .venv/bin/python bench/predict_growth.py --sizes 1000 20000 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.labelling.encoder import Encoder  # noqa: E402
from backend.labelling.llm import LLMAnswer, LLMStats  # noqa: E402
from backend.labelling.pipeline import HCCConfig  # noqa: E402
from backend.studio.labelconfig import ChoicesTarget  # noqa: E402
from backend.studio.project import ProjectModel  # noqa: E402
from backend.studio.settings import Settings  # noqa: E402
from backend.studio.store import Anchor  # noqa: E402

LABELS = ("card", "transfer", "refund")
TARGET = ChoicesTarget(from_name="intent", to_name="text", value_key="text", labels=LABELS)
TOPICS = {"card": "my card payment was declined", "transfer": "my bank transfer has not arrived",
          "refund": "I want my money back for this order"}
DISTINCT = 2_000


class InstantLLM:
    """Both DCCA views answer with the label the text names, at once."""

    def __init__(self) -> None:
        self.stats = LLMStats()

    def _answers(self, texts: Sequence[str]) -> list[LLMAnswer]:
        named = [next((label for label in LABELS if label in text), LABELS[0]) for text in texts]
        return [LLMAnswer(label=label, valid=True, raw=label, probability=0.9) for label in named]

    def zero_shot(self, texts: Sequence[str], *, progress: Any = None) -> list[LLMAnswer]:
        return self._answers(texts)

    def hinted(self, texts: Sequence[str], hints: Sequence[str], *, progress: Any = None) -> list[LLMAnswer]:
        return self._answers(texts)


def stored_records(n: int) -> dict[int, dict[str, Any]]:
    records = {}
    for i in range(n):
        case = i % DISTINCT
        label = LABELS[case % 3]
        records[10_000 + i] = {"text": f"{TOPICS[label]} (case {case})", "label": label,
                               "stage": "consistent" if i % 4 else "combined", "score": 0.9}
    return records


def measure(n: int, repeats: int, encoder: Encoder, root: Path) -> dict[str, float]:
    settings = Settings(model_dir=root / f"n{n}", hcc=HCCConfig(combine="dcca", llm_views=("zero_shot", "hinted")))
    project = ProjectModel(1, TARGET, settings, encoder)
    for i in range(30):
        label = LABELS[i % 3]
        project.store.put_anchor(Anchor(i + 1, i + 1, f"{TOPICS[label]}, anchor {i}", label))
    project.pipeline.llm = InstantLLM()
    project.store.put_items(stored_records(n))
    t0 = time.perf_counter()
    project.label([{"id": 1, "data": {"text": "where is my card refund"}}])
    first = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        task = {"id": 2 + r, "data": {"text": f"the transfer I sent on day {r} of run {n} is missing"}}
        t0 = time.perf_counter()
        project.label([task])
        times.append(time.perf_counter() - t0)
    return {"stored": n, "first_request_s": round(first, 3), "median_request_s": round(statistics.median(times), 4),
            "max_request_s": round(max(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 80_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = Encoder(cache_dir=root / "embeddings", show_progress=False)
        encoder.encode([r["text"] for r in stored_records(DISTINCT).values()])  # MiniLM once per distinct text
        for i in range(8):  # the first single-text calls of torch are slower: not the project's cost
            encoder.encode([f"warm-up text {i}"])
        for n in args.sizes:
            print(json.dumps(measure(n, args.repeats, encoder, root)), flush=True)


if __name__ == "__main__":
    main()
