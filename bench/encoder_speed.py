"""Encoder throughput and fidelity: sentences/s per encoder, precision and batch size, on a quiet machine.

For each packaged encoder on disk (all-MiniLM-L6-v2; all-mpnet-base-v2 after `hcc encoder pull
all-mpnet-base-v2`) and each precision this CPU runs natively (float32; bfloat16 where it has AVX512-BF16
or AMX), encode 2,000 Banking77 train texts without a cache (after a 64-text warm-up) and report
sentences/s, the cosine of every vector to the float32 one, and the nearest-centroid accuracy on the full
test split with 5% of train as anchors (the setting of bench/banking77.py).

    .venv/bin/python bench/encoder_speed.py                   # writes bench/results/encoder_speed.json
    .venv/bin/python bench/encoder_speed.py --markdown        # the table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.labelling.anchors import class_scores  # noqa: E402
from backend.labelling.encoder import Encoder, cpu_has_native_bf16  # noqa: E402
from backend.models import encoder_models  # noqa: E402
from bench.banking77 import DATA, read  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "encoder_speed.json"


def measure(name: str, precision: str, batch: int, texts: list[str], anchors, test, labels) -> dict:
    enc = Encoder(name, precision=precision, batch_size=batch, show_progress=False)
    enc.encode(texts[:64])  # load and warm up
    t0 = time.perf_counter()
    vectors = enc.encode(texts[64:])
    rate = (len(texts) - 64) / (time.perf_counter() - t0)
    index = {label: i for i, label in enumerate(labels)}
    a_vec = enc.encode([r["text"] for r in anchors])
    q_vec = enc.encode([r["text"] for r in test])
    scored = class_scores(q_vec, a_vec, np.array([index[r["category"]] for r in anchors]), len(labels),
                          method="centroid")
    gold = np.array([index[r["category"]] for r in test])
    return {"encoder": name, "precision": precision, "batch": batch, "sentences_per_s": round(rate, 1),
            "centroid_accuracy": float((scored.labels == gold).mean()), "vectors": vectors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print the table of an existing result and exit")
    ap.add_argument("--batches", default="32,64")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return 0
    train, test = read(DATA / "train.csv"), read(DATA / "test.csv")
    labels = json.loads((DATA / "categories.json").read_text())
    anchors = random.Random(0).sample(train, round(0.05 * len(train)))
    texts = [r["text"] for r in train[:2000]]
    precisions = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    rows = []
    for spec in encoder_models.PACKAGED.values():
        try:
            encoder_models.local_path(spec.name)
        except encoder_models.EncoderModelError as exc:
            print(f"skipping {spec.name}: {exc}", file=sys.stderr)
            continue
        reference = None
        for precision in precisions:
            for batch in (int(b) for b in args.batches.split(",")):
                row = measure(spec.name, precision, batch, texts, anchors, test, labels)
                vectors = row.pop("vectors")
                reference = vectors if reference is None else reference
                cosine = (vectors * reference).sum(axis=1)
                row |= {"cosine_to_float32_mean": round(float(cosine.mean()), 5),
                        "cosine_to_float32_min": round(float(cosine.min()), 5)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    result = {"machine": f"{platform.machine()}, native bfloat16: {cpu_has_native_bf16()}",
              "texts": len(texts) - 64, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["| encoder | precision | batch | sentences/s | cosine to float32 (mean / min) | centroid accuracy, "
             "full test |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['encoder']} | {r['precision']} | {r['batch']} | {r['sentences_per_s']:,.0f} | "
                     f"{r['cosine_to_float32_mean']:.4f} / {r['cosine_to_float32_min']:.4f} | "
                     f"{100 * r['centroid_accuracy']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
