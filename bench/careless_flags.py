"""Flagging careless annotators in comparison mode: precision, recall, and the pairs that remain.

The simulation's mixed population (``backend.annotators.simulation``, population ``mix``): 20% of the
annotators click at random (eta = 0), the others have eta ~ Beta(8, 2); the reference model is really better
on a share ``mu`` of the items, estimated (as in Label Studio, where no ``mu`` is given). Regimes: with and
without the weak judge's prior per item (judge right ~84% of the time), with 1 and with 3 annotators per
item. The flag rule is the product's: an annotator is flagged when the quality (``eta_``, the posterior
mean of eta) is below 0.5 (``HCC_MIN_ANNOTATOR_QUALITY`` in Label Studio, ``--min-quality`` of
``hcc export-preferences`` and ``hcc annotators``). Per draw: precision and recall of the flags for the
random clickers, the accuracy of every choice, of the choices of unflagged annotators, and of the pairs
``hcc export-preferences`` would write (unflagged, and the posterior backs the choice: p > 1/2), with the
share of choices that remain. Mean and standard deviation over seeds.

    .venv/bin/python bench/careless_flags.py                 # ~3 min on 2 busy cores
    .venv/bin/python bench/careless_flags.py --markdown      # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.annotators.attentiveness import IdentifiabilityWarning, PairwiseAttentiveness  # noqa: E402
from backend.annotators.simulation import simulate_comparisons  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "careless_flags.json"
MIN_QUALITY = 0.5  # the product's default flag threshold
USERS = 50
PER_USER = (10, 50, 200)
MUS = (0.7, 0.9)
SEEDS = 5


OTHER_THRESHOLDS = (0.6, 0.7)  # not the product's: how much a higher threshold would buy, and cost


def precision_recall(flagged: pd.Series, careless: pd.Series) -> dict:
    hits = int((flagged & careless).sum())
    return {"precision": hits / int(flagged.sum()) if flagged.any() else float("nan"),
            "recall": hits / int(careless.sum()) if careless.any() else float("nan")}


def one_draw(n: int, mu: float, judge: bool, per_item: int, seed: int) -> dict:
    sim = simulate_comparisons(USERS, n, mu=mu, population="mix", seed=seed,
                               overlap_share=1.0 if per_item > 1 else 0.0, overlap_size=per_item,
                               judge_signal=1.0 if judge else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        est = PairwiseAttentiveness().fit(sim.labels, judge=sim.judge_left)
    careless = sim.eta.reindex(est.eta_.index) == 0.0
    flagged = est.eta_ < MIN_QUALITY
    labels = sim.labels
    right = (labels["choice"].to_numpy() == sim.truth.reindex(labels["item_id"]).to_numpy())
    kept = ~flagged.reindex(labels["worker_id"]).to_numpy()
    # The export also leaves out choices the posterior says are more likely wrong than right (p <= 1/2).
    p_choice = est.posteriors_.reindex(labels["item_id"]).to_numpy()[np.arange(len(labels)),
                                                                      (labels["choice"] == "right").to_numpy(int)]
    exported = kept & (p_choice > 0.5)
    return {
        "careless": int(careless.sum()), "flagged": int(flagged.sum()), **precision_recall(flagged, careless),
        "accuracy_all": float(right.mean()), "accuracy_kept": float(right[kept].mean()) if kept.any() else float("nan"),
        "kept_share": float(kept.mean()),
        "accuracy_exported": float(right[exported].mean()) if exported.any() else float("nan"),
        "exported_share": float(exported.mean()),
        "accuracy_attentive_only": float(right[~careless.reindex(labels["worker_id"]).to_numpy()].mean()),
        "clicker_quality_mean": float(est.eta_[careless].mean()) if careless.any() else float("nan"),
        "careful_quality_mean": float(est.eta_[~careless].mean()),
        **{f"{name}_at_{t}": value for t in OTHER_THRESHOLDS
           for name, value in precision_recall(est.eta_ < t, careless).items()},
    }


def cells() -> list[dict]:
    rows = []
    for judge in (False, True):
        for per_item in (1, 3):
            for mu in MUS:
                for n in PER_USER:
                    draws = [one_draw(n, mu, judge, per_item, seed) for seed in range(SEEDS)]
                    frame = pd.DataFrame(draws)
                    row = {"judge": judge, "per_item": per_item, "mu": mu, "m": USERS, "n": n, "seeds": SEEDS,
                           "draws_without_flags": int((frame["flagged"] == 0).sum())}
                    for key in frame.columns:
                        row[key] = float(frame[key].mean())  # NaN-skipping: precision of draws with flags
                        row[key + "_sd"] = float(frame[key].std(ddof=0))
                    rows.append(row)
                    print(f"judge={judge!s:5s} per_item={per_item} mu={mu} n={n:3d}: flagged {row['flagged']:.1f} "
                          f"of {row['careless']:.1f}, precision {row['precision']:.2f} recall {row['recall']:.2f}, "
                          f"accuracy {row['accuracy_all']:.3f} -> {row['accuracy_kept']:.3f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| judge | annotators per item | mu | comparisons per annotator | flagged / random clickers | "
             "precision | recall | accuracy of all choices | of the choices kept | choices kept | "
             "of the exported pairs (share) | mean quality: clickers / others |", "|---" * 12 + "|"]
    for r in rows:
        precision = "-" if np.isnan(r["precision"]) else f"{r['precision']:.2f} ± {r['precision_sd']:.2f}"
        lines.append(
            f"| {'yes' if r['judge'] else 'no'} | {r['per_item']} | {r['mu']} | {r['n']} | "
            f"{r['flagged']:.1f} / {r['careless']:.1f} | {precision} | {r['recall']:.2f} ± {r['recall_sd']:.2f} | "
            f"{r['accuracy_all']:.3f} | {r['accuracy_kept']:.3f} ± {r['accuracy_kept_sd']:.3f} | "
            f"{r['kept_share']:.2f} | {r['accuracy_exported']:.3f} ({r['exported_share']:.2f}) | "
            f"{r['clicker_quality_mean']:.2f} / {r['careful_quality_mean']:.2f} |")
    lines += ["", "Other thresholds (precision / recall):", "",
              "| judge | annotators per item | mu | comparisons per annotator | "
              + " | ".join(f"eta_ < {t}" for t in OTHER_THRESHOLDS) + " |", "|---" * (4 + len(OTHER_THRESHOLDS)) + "|"]
    for r in rows:
        cells = [f"{_num(r[f'precision_at_{t}'])} / {_num(r[f'recall_at_{t}'])}" for t in OTHER_THRESHOLDS]
        lines.append(f"| {'yes' if r['judge'] else 'no'} | {r['per_item']} | {r['mu']} | {r['n']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())["cells"]))
        return 0
    rows = cells()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rule": f"eta_ < {MIN_QUALITY}", "cells": rows}, indent=1))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
