"""Real crowd labels with gold (Snow et al. 2008): consensus accuracy and worker-quality ranking.

Side by side: majority vote (ours, ties broken by overall class frequency; and crowd-kit's), crowd-kit's
Dawid-Skene and one-coin Dawid-Skene, and ours: the one-coin attentive model, Dawid-Skene with Dirichlet
priors, the two shrunk into each other, and ``auto`` (shrinkage chosen by held-out likelihood). Quality
ranking = Spearman correlation between each worker's estimated quality and their accuracy against gold.
A synthetic set with class-biased annotators shows where a one-coin model fails.

crowd-kit is run here only as a point of comparison (``pip install 'label-studio-hcc[bench]'``).

    .venv/bin/python bench/crowd_workers.py
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.annotators.attentiveness import IdentifiabilityWarning  # noqa: E402
from backend.annotators.crowd import CategoricalAttentiveness, MajorityVote  # noqa: E402
from backend.annotators.simulation import simulate_crowd  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crowd_workers"
SETS = ("rte", "temp", "wsd")
RESULTS = Path(__file__).resolve().parent / "results" / "crowd_workers.json"
OURS = {
    "ours: one-coin attentive": {"model": "one_coin"},
    "ours: Dawid-Skene + Dirichlet": {"model": "dawid_skene"},
    "ours: shrunk (8 pseudo-labels)": {"model": "shrunk", "shrinkage": 8.0},
    "ours: auto (default)": {"model": "auto"},
    "ours: auto, Beta(2, 1) prior on eta": {"model": "auto", "a": 2.0, "b": 1.0},
}


def load(name: str) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    df = pd.read_csv(DATA / f"snow2008_{name}_labels.csv", dtype=str)
    gold = df.groupby("item_id")["gold"].first()
    worker_accuracy = (df["label"] == df["gold"]).groupby(df["worker_id"]).mean()
    return df[["item_id", "worker_id", "label"]], gold, worker_accuracy


def score(labels: pd.Series, quality: pd.Series | None, gold: pd.Series, worker_accuracy: pd.Series,
          seconds: float, **extra) -> dict:
    row = {"accuracy": float((labels.reindex(gold.index).astype(str) == gold).mean()), "seconds": seconds}
    if quality is not None:
        row["spearman"] = float(stats.spearmanr(quality.reindex(worker_accuracy.index), worker_accuracy).statistic)
    return {**row, **extra}


def ours(df: pd.DataFrame, gold: pd.Series, worker_accuracy: pd.Series) -> dict:
    rows = {}
    started = time.perf_counter()
    vote = MajorityVote().fit(df)
    rows["ours: majority vote (deterministic ties)"] = score(vote.labels_, vote.eta_, gold, worker_accuracy,
                                                              time.perf_counter() - started)
    for name, options in OURS.items():
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IdentifiabilityWarning)
            est = CategoricalAttentiveness(**options).fit(df)
        seconds = time.perf_counter() - started
        rows[name] = score(est.labels_, est.eta_, gold, worker_accuracy, seconds,
                           spearman_accuracy=float(stats.spearmanr(est.accuracy_.reindex(worker_accuracy.index),
                                                                   worker_accuracy).statistic),
                           shrinkage=None if np.isinf(est.shrinkage_) else est.shrinkage_, model=est.model_,
                           selection={str(k): v for k, v in est.selection_.items()})
    return rows


def crowdkit(df: pd.DataFrame, gold: pd.Series, worker_accuracy: pd.Series) -> dict:
    try:
        from crowdkit.aggregation import DawidSkene, OneCoinDawidSkene, Wawa
        from crowdkit.aggregation import MajorityVote as CKMajorityVote
    except ImportError:
        return {}
    table = df.rename(columns={"item_id": "task", "worker_id": "worker"})
    rows = {}
    started = time.perf_counter()
    vote = CKMajorityVote().fit(table)
    rows["crowd-kit: MajorityVote (ties by row order)"] = score(vote.labels_, vote.skills_, gold, worker_accuracy,
                                                                time.perf_counter() - started)
    reversed_vote = CKMajorityVote().fit(table.iloc[::-1])
    rows["crowd-kit: MajorityVote (ties by row order)"]["accuracy_rows_reversed"] = float(
        (reversed_vote.labels_.reindex(gold.index).astype(str) == gold).mean())
    started = time.perf_counter()
    ds = DawidSkene(n_iter=100).fit(table)
    rows["crowd-kit: DawidSkene"] = score(ds.labels_, _ds_accuracy(ds), gold, worker_accuracy,
                                          time.perf_counter() - started)
    started = time.perf_counter()
    one_coin = OneCoinDawidSkene(n_iter=100).fit(table)
    rows["crowd-kit: OneCoinDawidSkene"] = score(one_coin.labels_, one_coin.skills_, gold, worker_accuracy,
                                                 time.perf_counter() - started)
    try:
        Wawa().fit_predict(table)  # fit alone works; predicting hits scikit-learn >= 1.6
        rows["crowd-kit: Wawa"] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded: Wawa breaks on scikit-learn >= 1.6
        rows["crowd-kit: Wawa"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return rows


def _ds_accuracy(ds) -> pd.Series:
    """sum_k prior_k P(label k | true k) per worker, from crowd-kit's errors_ (rows worker x given label)."""
    errors, priors = ds.errors_, ds.priors_
    out = {}
    for worker, block in errors.groupby(level=0):
        given = block.droplevel(0)
        out[worker] = sum(priors[c] * (given.loc[c, c] if c in given.index else 0.0) for c in priors.index)
    return pd.Series(out)


def class_biased() -> dict:
    sim = simulate_crowd(300, 20, 5, kind="class_biased", seed=1)
    df, gold, accuracy = sim.labels, sim.truth, sim.accuracy
    return {**ours(df, gold, accuracy), **crowdkit(df, gold, accuracy)}


def table(results: dict) -> str:
    names = list(dict.fromkeys(name for block in results.values() for name in block))
    header = "| method | " + " | ".join(f"{s}: accuracy | {s}: Spearman" for s in results) + " |"
    lines = [header, "|---|" + "---|---|" * len(results)]
    for name in names:
        cells = []
        for block in results.values():
            row = block.get(name, {})
            cells.append(f"{row['accuracy']:.4f}" if "accuracy" in row else "-")
            cells.append(f"{row['spearman']:.3f}" if "spearman" in row else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def keep_earlier_crowdkit_rows(results: dict) -> None:
    """Without crowd-kit installed, carry its rows over from the previous results file (marked as such):
    they do not depend on our code."""
    if not RESULTS.is_file():
        return
    earlier = json.loads(RESULTS.read_text())
    for block, rows in results.items():
        if any(name.startswith("crowd-kit:") for name in rows):
            continue
        for name, row in earlier.get(block, {}).items():
            if name.startswith("crowd-kit:"):
                rows[name] = {**row, "from_earlier_run": True}


def main() -> int:
    warnings.simplefilter("ignore", FutureWarning)
    results = {}
    for name in SETS:
        df, gold, accuracy = load(name)
        results[f"snow {name}"] = {**ours(df, gold, accuracy), **crowdkit(df, gold, accuracy)}
    results["synthetic class-biased"] = class_biased()
    keep_earlier_crowdkit_rows(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
