"""/predict cost against the number of records a project has stored (issue 12; issue 14, item 11).

A project with 30 anchors, 40 reviewed tasks (so the score is calibrated, as in a project in use) and N stored
records, three in four of them consistent; the real MiniLM encoder with its on-disk cache; for DCCA (the
configuration that votes with earlier consistent records) an LLM stand-in that answers at once (its time is
not the backend's and does not grow with the project). Each request is ``HCCService.predict`` of a batch of
``--batch`` new tasks: what the ``/predict`` route runs between reading the JSON and writing it (the model's
labels, the batch's scores and threshold, Label Studio's result shapes). After one warm-up request (the first
after a start reads the project once) it times ``--repeats`` requests per size and reports p50 / p99 / max.

The stored texts repeat 2,000 distinct sentences: each is encoded once, so what is timed is what a request
costs when every vector is already cached (the state of a long-running project), not MiniLM.

    .venv/bin/python bench/predict_growth.py                      # 1,000 / 10,000 / 100,000 records, both
    .venv/bin/python bench/predict_growth.py --sizes 1000 20000 --repeats 50 --combine dcca
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
from backend.studio.service import HCCService  # noqa: E402
from backend.studio.settings import Settings  # noqa: E402
from backend.studio.store import Anchor  # noqa: E402

LABELS = ("card", "transfer", "refund")
LABEL_CONFIG = ('<View><Text name="text" value="$text"/><Choices name="intent" toName="text" choice="single">'
                + "".join(f'<Choice value="{label}"/>' for label in LABELS) + "</Choices></View>")
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


def measure(n: int, combine: str, batch: int, repeats: int, encoder: Encoder, root: Path) -> dict[str, Any]:
    config = HCCConfig(combine="dcca", llm_views=("zero_shot", "hinted")) if combine == "dcca" else HCCConfig()
    service = HCCService(Settings(model_dir=root / f"{combine}-{n}", hcc=config))
    service._encoder = encoder  # the one warmed up below, with its cache
    project = service.model(1, LABEL_CONFIG)
    if combine == "dcca":
        project.pipeline.llm = InstantLLM()
    for i in range(30):
        label = LABELS[i % 3]
        project.store.put_anchor(Anchor(i + 1, i + 1, f"{TOPICS[label]}, anchor {i}", label))
    records = stored_records(n)
    project.store.put_items(records)
    for i, (task_id, record) in enumerate(list(records.items())[:40]):  # reviews of predicted tasks
        label = record["label"] if i % 4 else LABELS[(LABELS.index(record["label"]) + 1) % 3]
        project.store.put_anchor(Anchor(1000 + i, task_id, record["text"], label))
    project.store.set("anchors_synced", time.time())  # no Label Studio to rebuild the anchors from

    def request(r: int) -> float:
        tasks = [{"id": 1_000_000 + r * batch + j,
                  "data": {"text": f"the {LABELS[j % 3]} I asked about on day {r}, item {j}, run {combine} {n}"}}
                 for j in range(batch)]
        t0 = time.perf_counter()
        answers = service.predict(tasks, 1, LABEL_CONFIG)
        seconds = time.perf_counter() - t0
        assert len(answers) == batch and all(a["result"] for a in answers), answers
        return seconds

    first = request(-1)
    times = sorted(request(r) for r in range(repeats))
    return {"stored": n, "combine": combine, "batch": batch, "requests": repeats, "first_request_s": round(first, 3),
            "p50_ms": round(1000 * statistics.median(times), 1),
            "p99_ms": round(1000 * times[min(len(times) - 1, round(0.99 * (len(times) - 1)))], 1),
            "max_ms": round(1000 * times[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--combine", nargs="+", default=["pool", "dcca"], choices=["pool", "dcca"])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_growth.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = Encoder(cache_dir=root / "embeddings", show_progress=False)
        encoder.encode([r["text"] for r in stored_records(DISTINCT).values()])  # MiniLM once per distinct text
        for i in range(8):  # the first single-text calls of torch are slower: not the project's cost
            encoder.encode([f"warm-up text {i}"])
        for combine in args.combine:
            for n in args.sizes:
                rows.append(measure(n, combine, args.batch, args.repeats, encoder, root))
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
