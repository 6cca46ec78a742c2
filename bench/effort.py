"""How much of a project must a team review before its labels are 95% right? (issue 16)

The effort curve of the review loop, with the backend learning from every review, beside an oracle that
reviews exactly the wrong items (from accuracy ``a`` it needs ``0.95 - a`` of the project).

Per data set and draw: the anchors are a plain random 5% of ``large.jsonl`` (``random.Random(draw)``, as
``bench/views.py``); the project is a seeded sample of ``--items`` texts of ``small.jsonl``
(``random.Random(1234)``); the default pipeline, encoder only (no LLM). Then, in rounds:

1. the unreviewed items are labelled with the anchors so far (the centroids refined on the project's texts
   where the anchors vouch for it, as the backend's jobs do);
2. the next ``--batch`` share of the project is reviewed in the order of the "Needs review" tab: the lowest
   published score first (the calibrator's P(label is right) once the reviews so far fit it, the records'
   own probability before);
3. every review becomes an anchor at once (left out of the prior's cross-check, as in the backend).

A reviewed item counts as right (the reviewer set its label). Within a round the labels do not change, so
the share reviewed when the project first reaches 95% is exact, not rounded up to the batch. Rows: the
frozen encoder, and the encoder trained on the draw's anchors (``backend/labelling/training.py``, adopted
only where its held-out anchors prove it; the trained models are cached under ``$HCC_CACHE_DIR/trained``
and shared with ``bench/views.py --train``). The trained row trains once, on the first anchors: the
backend would train again every ``HCC_TRAIN_EVERY`` (100) reviews, so its curve is at least this good.

    nice -n 10 .venv/bin/python bench/effort.py --out bench/results/effort.json     # 4 sets x 5 draws x 2 rows
    .venv/bin/python bench/effort.py --report bench/results/effort.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine  # noqa: E402

from backend.confidence.calibration import fit_calibrator  # noqa: E402
from backend.config import cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline  # noqa: E402
from backend.labelling.training import train_encoder  # noqa: E402
from backend.studio.project import published_probabilities  # noqa: E402
from bench.views import DATA, DATASETS, read_jsonl  # noqa: E402

TARGET = 0.95
ROWS = ("frozen", "trained")


def review_loop(encoder: Encoder, labels: list[str], anchors: list[dict], texts: list[str], gold: list[str], *,
                batch: float, target: float = TARGET, second_encoder: Encoder | None = None) -> dict[str, Any]:
    """The review loop of one project: accuracy before any review, the curve, the share reviewed at ``target``.
    ``second_encoder``: its opinion joins the records' signals, so the calibrator can order by it (as
    ``HCC_SECOND_ENCODER`` in the backend)."""
    n, step = len(texts), max(1, round(batch * len(texts)))
    project_vectors = encoder.encode(texts)
    reviewed: list[int] = []  # item positions, in review order
    reviewed_records: list[dict] = []  # each item's record when it was reviewed: what the calibrator learns from
    curve: list[tuple[float, float]] = []
    share_at_target = None
    while True:
        pipeline = HCCPipeline(encoder, labels, config=HCCConfig(), second_encoder=second_encoder)
        pipeline.set_anchors([a["input"] for a in anchors] + [texts[i] for i in reviewed],
                             [a["label"] for a in anchors] + [gold[i] for i in reviewed],
                             cross_check=[True] * len(anchors) + [False] * len(reviewed))
        pipeline.refine(project_vectors)
        done = set(reviewed)
        open_items = [i for i in range(n) if i not in done]
        records = pipeline.annotate([texts[i] for i in open_items]).records if open_items else []
        right = {i: r["label"] == gold[i] for i, r in zip(open_items, records, strict=True)}
        accuracy = (len(reviewed) + sum(right.values())) / n
        curve.append((len(reviewed) / n, accuracy))
        if share_at_target is None and accuracy >= target:
            share_at_target = len(reviewed) / n
        if share_at_target is not None or not open_items:
            break
        calibrator = fit_calibrator(reviewed_records, [gold[i] for i in reviewed])
        scores, _ = published_probabilities(records, calibrator)
        order = np.argsort(scores, kind="stable")[:step]
        wrong_so_far = n - round(accuracy * n)
        for position in order:  # labels hold within a round: the exact point the target is crossed
            i = open_items[position]
            reviewed.append(i)
            reviewed_records.append(records[position])
            if not right[i]:
                wrong_so_far -= 1
            if share_at_target is None and (n - wrong_so_far) / n >= target:
                share_at_target = len(reviewed) / n
        if share_at_target is not None:
            curve.append((len(reviewed) / n, (n - wrong_so_far) / n))
            break
    start = curve[0][1]
    oracle = max(0.0, target - start)
    return {"accuracy_before_review": start, "share_to_target": share_at_target, "oracle_share": oracle,
            "ratio_to_oracle": (share_at_target / oracle) if oracle > 0 else None,
            "accuracy_after_20pct": _at(curve, 0.2), "curve": curve, "reviews": len(reviewed)}


def _at(curve: list[tuple[float, float]], share: float) -> float | None:
    """The accuracy once ``share`` of the project was reviewed (the last round at or before it)."""
    before = [acc for s, acc in curve if s <= share + 1e-9]
    if curve and curve[-1][0] < share and curve[-1][1] >= TARGET:
        return curve[-1][1]  # the target was reached earlier; reviewing on can only keep it
    return before[-1] if before else None


def run_dataset(name: str, args, frozen: Encoder, cache: Path, runs: dict, save,
                second: Encoder | None = None) -> None:
    large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
    labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
    sample = random.Random(1234).sample(small, min(args.items, len(small)))
    texts, gold = [r["input"] for r in sample], [r["label"] for r in sample]
    for draw in range(args.draws):
        anchors = random.Random(draw).sample(large, round(args.anchor_share * len(large)))
        for row in args.rows.split(","):
            key = f"{name}|{args.anchor_share}|{draw}|{row}|{args.encoder}" + \
                (f"+{args.second_encoder}" if second is not None else "")
            if key in runs:
                continue
            encoder, training = frozen, None
            if row == "trained":
                training = train_encoder(args.encoder, [a["input"] for a in anchors], [a["label"] for a in anchors],
                                         trained_dir=cache / "trained")
                if training.adopted:
                    encoder = Encoder(training.model_path, cache_dir=cache / "embeddings", show_progress=False)
            t0 = time.perf_counter()
            run = review_loop(encoder, labels, anchors, texts, gold, batch=args.batch, second_encoder=second)
            run["seconds"] = round(time.perf_counter() - t0, 1)
            if training is not None:
                run["training"] = {"adopted": training.adopted, "seconds": training.seconds,
                                   "reason": training.reason}
            runs[key] = run
            save()
            ratio = run["ratio_to_oracle"]
            what = f"{row} + {args.second_encoder}" if second is not None else row
            print(f"{name} draw {draw} {what}: {100 * run['accuracy_before_review']:.1f}% before review, "
                  f"{100 * run['share_to_target']:.1f}% reviewed to reach 95% (oracle "
                  f"{100 * run['oracle_share']:.1f}%, {'-' if ratio is None else f'{ratio:.2f}x'}; {run['seconds']} s)",
                  file=sys.stderr, flush=True)


def yields(curve: list[list[float]] | list[tuple[float, float]]) -> list[float]:
    """Wrong labels made right per review, round by round: the accuracy gained over the share reviewed (1.0:
    every review fixed one error and nothing else; above 1: the new anchors fixed other items too)."""
    return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(curve) if b[0] > a[0]]


def _spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    return (f"{scale * statistics.mean(values):.{digits}f} "
            f"({scale * min(values):.{digits}f}-{scale * max(values):.{digits}f})")


def markdown(result: dict) -> str:
    lines = ["| data set | encoder | draws | accuracy before review | reviewed to reach 95% | oracle's share "
             "| **ratio to the oracle** | accuracy after 20% reviewed | errors fixed per review: first round -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for key, run in result["runs"].items():
        name, _, _, row, encoders = key.split("|")
        groups.setdefault((name, row, encoders), []).append(run)
    for (name, row, encoders), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], ROWS.index(kv[0][1]),
                                                                              kv[0][2])):
        ratios = [r["ratio_to_oracle"] for r in runs if r["ratio_to_oracle"] is not None]
        adopted = sum(r.get("training", {}).get("adopted", False) for r in runs)
        label = f"trained ({adopted} of {len(runs)} adopted)" if row == "trained" else "frozen"
        label += f" + second encoder {encoders.split('+', 1)[1]}" if "+" in encoders else ""
        lines.append(f"| {name} | {label} | {len(runs)} | {_spread([r['accuracy_before_review'] for r in runs])} | "
                     f"{_spread([r['share_to_target'] for r in runs])} | "
                     f"{_spread([r['oracle_share'] for r in runs])} | "
                     f"**{_spread(ratios, scale=1.0, digits=2)}x** | "
                     f"{_spread([r['accuracy_after_20pct'] for r in runs if r['accuracy_after_20pct'] is not None])} | "
                     f"{_spread([yields(r['curve'])[0] for r in runs], 1.0, 2)} -> "
                     f"{_spread([yields(r['curve'])[-1] for r in runs], 1.0, 2)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--rows", default=",".join(ROWS), help="frozen, trained, or both")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--items", type=int, default=1000, help="the project: a seeded sample of small.jsonl")
    ap.add_argument("--anchor-share", type=float, default=0.05)
    ap.add_argument("--batch", type=float, default=0.05, help="share of the project reviewed per round")
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--second-encoder", help="a second encoder whose opinion the calibrator orders by")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "effort.json")
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="print the table of one or more results files (their rows together) and exit")
    args = ap.parse_args()
    if args.report:
        runs = {key: run for path in args.report for key, run in json.loads(path.read_text())["runs"].items()}
        print(markdown({"runs": runs}))
        return 0
    result = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    result["meta"] = {"machine": machine(), "items": args.items, "batch": args.batch,
                      "anchor_share": args.anchor_share, "encoder": args.encoder, "target": TARGET}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    cache = cache_dir()
    frozen = Encoder(args.encoder, cache_dir=cache / "embeddings", show_progress=False)
    second = (Encoder(args.second_encoder, cache_dir=cache / "embeddings", show_progress=False)
              if args.second_encoder else None)
    for name in args.datasets.split(","):
        run_dataset(name, args, frozen, cache, result["runs"], save, second)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
