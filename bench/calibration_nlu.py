"""Is the score users see a calibrated probability on data the project was not fitted on? (issue 13, item 4)

Every ClusterLLM set in ``../shared/data/clusterllm_nlu`` (Banking77, CLINC, MASSIVE-scenario, MTOP-intent),
encoder only (MiniLM, the default pooled pipeline, no LLM). Per draw: the anchors are a plain random 5% of
``large.jsonl`` (``random.Random(draw)``, as bench/views.py), the items a seeded sample of ``small.jsonl``
(``--items``, the same for every draw). A seeded permutation of the items (``default_rng(draw)``) gives the
reviewed items: its first 1% or 5%; every metric is on the other 95% (the same held-out items for every
budget). Scores measured on the held-out items, before any review and after 1% / 5% reviewed:

* ``cli``: what ``hcc annotate`` + ``hcc calibrate`` give: the record's ``score`` before any review, the
  calibrator's ``confidence`` fitted on the reviewed records after (its fallback below 20 reviews);
* ``studio``: Label Studio's prediction score: each reviewed item becomes an anchor (left out of the prior's
  cross-check, as in the backend), the items are labelled again, and the score is
  :func:`backend.studio.project.published_probabilities` of the new records with the calibrator fitted on
  the reviewed items' records (what ``ProjectModel.scores`` writes);
* ``prior``: the records' ``prior_probability`` (the score of an encoder-only DCCA run, and the
  calibrator's starting point).

Each with the label-free stage of the prior off (the default) and on (``HCCConfig(label_free_prior=True)``).
Reported: ECE (10 bins) and error-detection AUROC, mean and spread (min-max) over the draws.

    nice -n 10 .venv/bin/python bench/calibration_nlu.py                 # 4 sets x 5 draws, ~12 min on 2 cores
    nice -n 10 .venv/bin/python bench/calibration_nlu.py --anchor-share 0.01 \
        --out bench/results/calibration_nlu_few_anchors.json              # 1% anchors
    .venv/bin/python bench/calibration_nlu.py --markdown                 # the table of docs/calibration.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.confidence.calibration import (  # noqa: E402
    error_detection_auroc,
    expected_calibration_error,
    fit_calibrator,
)
from backend.config import cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline  # noqa: E402
from backend.labelling.training import train_encoder  # noqa: E402
from backend.studio.project import published_probabilities  # noqa: E402
from bench.views import DATA, DATASETS, read_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "calibration_nlu.json"
BUDGETS = (0.0, 0.01, 0.05)
SCORES = ("cli", "studio", "prior")


def draw_anchors(large: list[dict], draw: int, anchor_share: float) -> list[dict]:
    return random.Random(draw).sample(large, round(anchor_share * len(large)))


def run_draw(encoder: Encoder, labels: list[str], large: list[dict], items: list[dict], draw: int,
             label_free: bool, anchor_share: float = 0.05) -> dict[str, Any]:
    """The three scores' ECE and AUROC on the held-out items of one draw, per review budget."""
    anchors = draw_anchors(large, draw, anchor_share)
    texts, gold = [r["input"] for r in items], [r["label"] for r in items]
    config = HCCConfig(label_free_prior=label_free)
    pipe = HCCPipeline(encoder, labels, config=config)
    pipe.set_anchors([a["input"] for a in anchors], [a["label"] for a in anchors])
    records = pipe.annotate(texts).records
    perm = np.random.default_rng(draw).permutation(len(items))
    held = perm[round(0.05 * len(items)):]
    out: dict[str, Any] = {"accuracy": float(np.mean([r["label"] == g for r, g in zip(records, gold, strict=True)])),
                           "prior": pipe.prior().message}
    for budget in BUDGETS:
        reviewed = perm[: round(budget * len(items))]
        human: list[str | None] = [None] * len(items)
        for i in reviewed:
            human[i] = gold[i]
        cal = fit_calibrator(records, human)
        cli = np.array([r["score"] for r in records]) if len(reviewed) == 0 else cal.predict_records(records)
        # Label Studio: the reviews are anchors at once (not in the prior's cross-check), the items re-labelled.
        learnt = HCCPipeline(encoder, labels, config=config)
        learnt.set_anchors([a["input"] for a in anchors] + [texts[i] for i in reviewed],
                           [a["label"] for a in anchors] + [gold[i] for i in reviewed],
                           cross_check=[True] * len(anchors) + [False] * len(reviewed))
        relabelled = learnt.annotate([texts[i] for i in held]).records
        studio, calibrated = published_probabilities(relabelled, cal)
        right = np.array([records[i]["label"] == gold[i] for i in held])
        right_after = np.array([r["label"] == gold[i] for r, i in zip(relabelled, held, strict=True)])
        prior = np.array([records[i]["prior_probability"] for i in held])
        if budget == 0.0:
            out["ece_floor"] = ece_floor(studio)
        out[f"{budget:.0%}"] = {
            "cli": metrics(cli[held], right), "studio": metrics(studio, right_after), "prior": metrics(prior, right),
            "studio_calibrated": calibrated, "calibrator": cal.method_ if not cal.fallback_ else "fallback"}
    return out


def ece_floor(p: np.ndarray, draws: int = 50) -> float:
    """Mean ECE of a perfectly calibrated score on as many items: outcomes drawn from ``p`` itself. On a few
    hundred items an ECE near it is as good as can be told apart."""
    rng = np.random.default_rng(0)
    return round(float(np.mean([expected_calibration_error(p, rng.random(len(p)) < p) for _ in range(draws)])), 4)


def metrics(p: np.ndarray, right: np.ndarray) -> dict[str, float | None]:
    return {"ece": round(float(expected_calibration_error(p, right)), 4),
            "auroc": error_detection_auroc(p, right), "mean": round(float(np.mean(p)), 4),
            "accuracy": round(float(np.mean(right)), 4)}


def summary(draws: list[dict[str, Any]], budget: str, score: str, metric: str) -> dict[str, float]:
    values = [d[budget][score][metric] for d in draws if d[budget][score][metric] is not None]
    return {"mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
            "max": round(float(np.max(values)), 4), "n": len(values)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| set (accuracy) | label-free stage | score | ECE: 0% / 1% / 5% reviewed "
             "| AUROC: 0% / 1% / 5% reviewed |", "|---|---|---|---|---|"]
    for name, by_stage in result["runs"].items():
        for stage, draws in by_stage.items():
            acc = 100 * float(np.mean([d["accuracy"] for d in draws]))
            floor = float(np.mean([d["ece_floor"] for d in draws])) if all("ece_floor" in d for d in draws) else None
            for score in SCORES:
                cells = []
                for metric in ("ece", "auroc"):
                    parts = []
                    for budget in BUDGETS:
                        s = summary(draws, f"{budget:.0%}", score, metric)
                        parts.append(f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})")
                    cells.append(" / ".join(parts))
                lines.append(f"| {name} ({acc:.1f}%) | {stage} | {score} | {cells[0]} | {cells[1]} |")
            if floor is not None and stage == "off":
                lines.append(f"| {name} | | ECE of a perfectly calibrated score on these items | {floor:.3f} | |")
    return "\n".join(lines)


def draw_encoder(frozen: Encoder, large: list[dict], draw: int, args) -> Encoder:
    """The encoder a draw is scored with: with ``--train``, the one trained on the draw's anchors where
    adopted, as ``hcc annotate`` and the backend use it (cached under ``$HCC_CACHE_DIR/trained``)."""
    if not args.train:
        return frozen
    anchors = draw_anchors(large, draw, args.anchor_share)
    training = train_encoder(DEFAULT_ENCODER, [a["input"] for a in anchors], [a["label"] for a in anchors],
                             trained_dir=cache_dir() / "trained")
    print(f"draw {draw}: {training.reason}", file=sys.stderr, flush=True)
    if not training.adopted:
        return frozen
    return Encoder(training.model_path, cache_dir=cache_dir() / "embeddings", show_progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--anchor-share", type=float, default=0.05, help="anchors: this share of large.jsonl")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--markdown", action="store_true", help="print the table of an existing --out and exit")
    ap.add_argument("--train", action="store_true",
                    help="per draw, the encoder trained on the draw's anchors where adopted (as hcc annotate)")
    ap.add_argument("--label-free", default="off,on", help="the label-free stage settings to run")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    encoder = Encoder(DEFAULT_ENCODER, cache_dir=cache_dir() / "embeddings", show_progress=False)
    result: dict[str, Any] = {"meta": {"encoder": DEFAULT_ENCODER, "items": args.items, "draws": args.draws,
                                       "train": args.train,
                                       "anchors": f"{args.anchor_share:.1%} of large.jsonl",
                                       "budgets": list(BUDGETS)}, "runs": {}}
    t0 = time.perf_counter()
    for name in args.datasets.split(","):
        large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
        labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
        items = random.Random(1234).sample(small, min(args.items, len(small)))
        encoders = [draw_encoder(encoder, large, draw, args) for draw in range(args.draws)]
        for stage in args.label_free.split(","):
            draws = [run_draw(used, labels, large, items, draw, stage == "on", args.anchor_share)
                     for draw, used in enumerate(encoders)]
            result["runs"].setdefault(name, {})[stage] = draws
            print(f"{name} label-free {stage}: " + json.dumps({b: {s: summary(draws, b, s, "ece")["mean"]
                                                                   for s in SCORES} for b in ("0%", "5%")}),
                  file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
