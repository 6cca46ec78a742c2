"""Model choice of ``CategoricalAttentiveness(model="auto")`` against the best fixed model, set by set.

Every crowd set in ``../shared/data/crowd_workers`` (Snow et al. 2008: RTE, TEMP, WSD), the same sets
subsampled to 100 items (several draws: small real cases), and synthetic sets of several shapes, each
over several seeds: small dense binary sets of class-biased workers (108 x 39, the shape of a public set
where auto once lost 5 points to Dawid-Skene), class-biased and one-coin workers with 3 or 10 classes,
and few labels per item (3, and 2: too few to choose on). For every draw: consensus accuracy of majority
vote, of the three fixed models (one-coin, Dawid-Skene, shrunk with 8 pseudo-labels) and of ``auto``;
"best fixed" is the best of the three fixed models on that draw (an oracle: it looks at the gold labels).
Nothing here was used to fit a constant except ``selection_z`` (see docs/comparison-mode.md, "Model
choice").

    .venv/bin/python bench/crowd_model_choice.py                 # ~5 min on 2 busy cores
    .venv/bin/python bench/crowd_model_choice.py --markdown      # the table from the JSON

``HCC_BENCH_ROOT=DIR`` imports ``backend`` from DIR instead (how the "before" column was measured, with
the previous ``crowd.py``); ``--out`` names the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, os.environ.get("HCC_BENCH_ROOT", str(Path(__file__).resolve().parents[1])))

from backend.annotators.attentiveness import IdentifiabilityWarning  # noqa: E402
from backend.annotators.crowd import CategoricalAttentiveness, MajorityVote  # noqa: E402
from backend.annotators.simulation import simulate_crowd, simulate_detection  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crowd_workers"
RESULTS = Path(__file__).resolve().parent / "results" / "crowd_model_choice.json"
FIXED = {"one_coin": {"model": "one_coin"}, "dawid_skene": {"model": "dawid_skene"},
         "shrunk_8": {"model": "shrunk", "shrinkage": 8.0}}
SUBSAMPLE_DRAWS = 5
SEEDS = 5


def snow(name: str, n_items: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    df = pd.read_csv(DATA / f"snow2008_{name}_labels.csv", dtype=str)
    if n_items is not None:
        chosen = pd.Series(df["item_id"].unique()).sample(n_items, random_state=seed)
        df = df[df["item_id"].isin(chosen)]
    return df[["item_id", "worker_id", "label"]], df.groupby("item_id")["gold"].first()


def cases() -> Iterator[tuple[str, int, pd.DataFrame, pd.Series]]:
    """(set name, draw, labels, gold) for every draw of every set."""
    for name in ("rte", "temp", "wsd"):
        if (DATA / f"snow2008_{name}_labels.csv").is_file():
            yield f"Snow {name.upper()} (all items)", 0, *snow(name)
            for draw in range(SUBSAMPLE_DRAWS):
                yield f"Snow {name.upper()}, 100 items", draw, *snow(name, 100, draw)
    synthetic = {
        "dense binary, class-biased 108x39 (all label all)": lambda s: simulate_detection(108, 39, seed=s),
        "binary, class-biased 300 items, 39 workers, 3 per item": lambda s: simulate_detection(300, 39, 3, seed=s),
        "3 classes, class-biased 300x20, 5 per item": lambda s: simulate_crowd(300, 20, 5, kind="class_biased",
                                                                                seed=s),
        "3 classes, class-biased 100x20, 5 per item": lambda s: simulate_crowd(100, 20, 5, kind="class_biased",
                                                                                seed=s),
        "3 classes, class-biased 300x20, 3 per item": lambda s: simulate_crowd(300, 20, 3, kind="class_biased",
                                                                                seed=s),
        "3 classes, class-biased 300x20, 2 per item": lambda s: simulate_crowd(300, 20, 2, kind="class_biased",
                                                                                seed=s),
        "3 classes, one-coin 300x20, 2 per item": lambda s: simulate_crowd(300, 20, 2, kind="one_coin", seed=s),
        "3 classes, one-coin 600x60, 3 per item": lambda s: simulate_crowd(600, 60, 3, kind="one_coin", seed=s),
        "10 classes, one-coin 300x30, 3 per item": lambda s: simulate_crowd(300, 30, 3, n_classes=10,
                                                                             kind="one_coin", seed=s),
        "10 classes, class-biased 300x30, 3 per item": lambda s: simulate_crowd(300, 30, 3, n_classes=10,
                                                                                 kind="class_biased", seed=s),
    }
    for name, draw in synthetic.items():
        for seed in range(SEEDS):
            sim = draw(seed)
            yield name, seed, sim.labels, sim.truth


def accuracy(labels: pd.Series, gold: pd.Series) -> float:
    return float((labels.reindex(gold.index).astype(str) == gold.astype(str)).mean())


def measure(df: pd.DataFrame, gold: pd.Series) -> dict:
    row = {"majority_vote": accuracy(MajorityVote().fit(df).labels_, gold)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        for name, options in FIXED.items():
            row[name] = accuracy(CategoricalAttentiveness(**options).fit(df).labels_, gold)
        started = time.perf_counter()
        auto = CategoricalAttentiveness().fit(df)
    row.update(auto=accuracy(auto.labels_, gold), auto_seconds=time.perf_counter() - started,
               shrinkage=None if np.isinf(auto.shrinkage_) else float(auto.shrinkage_),
               best_fixed=max(row[name] for name in FIXED))
    return row


def summarise(rows: list[dict]) -> list[dict]:
    frame = pd.DataFrame(rows)
    out = []
    for name, block in frame.groupby("set", sort=False):
        gap = block["auto"] - block["best_fixed"]
        picks = block["shrinkage"].map(lambda s: "inf" if s is None or pd.isna(s) else f"{s:g}")
        out.append({"set": name, "draws": len(block),
                    **{c: float(block[c].mean()) for c in ("majority_vote", *FIXED, "auto", "best_fixed")},
                    "auto_minus_best_mean": float(gap.mean()), "auto_minus_best_sd": float(gap.std(ddof=0)),
                    "auto_minus_best_worst": float(gap.min()), "picks": picks.value_counts().to_dict()})
    return out


def markdown(summary: list[dict], before: list[dict] | None) -> str:
    old = {r["set"]: r for r in before or []}
    head = ("| set | draws | majority vote | one-coin | Dawid-Skene | shrunk 8 | best fixed | **auto** | "
            "auto - best: mean ± sd (worst) | shrinkage picked |" + (" auto before: mean (worst gap) |" if old else ""))
    lines = [head, "|---" * (10 + bool(old)) + "|"]
    for r in summary:
        picks = ", ".join(f"{k} x{v}" for k, v in r["picks"].items())
        line = (f"| {r['set']} | {r['draws']} | {r['majority_vote']:.3f} | {r['one_coin']:.3f} | "
                f"{r['dawid_skene']:.3f} | {r['shrunk_8']:.3f} | {r['best_fixed']:.3f} | **{r['auto']:.3f}** | "
                f"{r['auto_minus_best_mean']:+.3f} ± {r['auto_minus_best_sd']:.3f} ({r['auto_minus_best_worst']:+.3f}) "
                f"| {picks} |")
        if old:
            b = old.get(r["set"])
            line += f" {b['auto']:.3f} ({b['auto_minus_best_worst']:+.3f}) |" if b else " - |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--markdown", action="store_true", help="print the table from the JSON files")
    parser.add_argument("--before", default=str(RESULTS.with_name("crowd_model_choice_before.json")))
    args = parser.parse_args()
    if args.markdown:
        before = Path(args.before)
        old = json.loads(before.read_text())["summary"] if before.is_file() else None
        print(markdown(json.loads(Path(args.out).read_text())["summary"], old))
        return 0
    rows = []
    for name, draw, df, gold in cases():
        rows.append({"set": name, "draw": draw, **measure(df, gold)})
        r = rows[-1]
        print(f"{name} #{draw}: auto {r['auto']:.3f} best {r['best_fixed']:.3f} shrinkage {r['shrinkage']}",
              flush=True)
    summary = summarise(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "draws": rows}, indent=1))
    print(markdown(summary, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
