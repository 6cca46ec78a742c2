"""Simulation study of the pairwise attentiveness EM, in the manner of Cai and Li (2025), and its speed.

m users x n comparisons each (m in {50, 200, 1000}, n in {10, 50, 200}); eta_u ~ Beta(8, 2) ("beta") or the
same with 20% random clickers, eta = 0 ("mix"); mu in {0.7, 0.9}. Regimes:

* ``mu known``: one annotation per item, mu given. The bar is the exact Bayes posterior mean of each eta_u
  (a 1-D integral per user: the likelihood depends on eta_u only through the user's count of choices for
  A), computed here independently on a 20,001-point grid.
* ``mu free``: one annotation per item, mu estimated (only eta (mu - 1/2) is identified).
* ``+ judge``: mu estimated, each item's prior from a simulated weak judge (right ~84% of the time).
* ``+ overlap``: mu estimated, 3 annotators on 20% of the items.

Metrics per cell, averaged over seeds: |mu_hat - mu| / mu, MAE of eta_hat, Spearman(eta_hat, eta).

    .venv/bin/python bench/annotator_sim.py                 # grid + speed, ~5 min on 2 busy cores
    .venv/bin/python bench/annotator_sim.py --only speed
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.annotators import attentiveness as att  # noqa: E402
from backend.annotators.simulation import simulate_comparisons  # noqa: E402

USERS = (50, 200, 1000)
PER_USER = (10, 50, 200)
POPULATIONS = ("beta", "mix")
MUS = (0.7, 0.9)
REGIMES = ("mu known", "mu free", "+ judge", "+ overlap")
RESULTS = Path(__file__).resolve().parent / "results" / "annotator_sim.json"


def exact_posterior_mean(labels: pd.DataFrame, workers: pd.Index, mu: float, a: float = 8.0,
                         b: float = 2.0) -> np.ndarray:
    """E[eta_u | data] with mu known and one annotation per item, by a fine grid over eta."""
    picked = np.where(labels["choice"] == "left", labels["model_left"], labels["model_right"]) == "A"
    k = pd.Series(picked, index=labels["worker_id"]).groupby(level=0).sum().reindex(workers).to_numpy(float)
    n = labels["worker_id"].value_counts().reindex(workers).to_numpy(float)
    grid = np.linspace(0.0, 1.0, 20_001)[1:-1]
    d = mu - 0.5
    log_post = ((a - 1) * np.log(grid) + (b - 1) * np.log1p(-grid))[None, :] \
        + k[:, None] * np.log(0.5 + grid * d)[None, :] + (n - k)[:, None] * np.log(0.5 - grid * d)[None, :]
    log_post -= log_post.max(axis=1, keepdims=True)
    weight = np.exp(log_post)
    return (weight * grid).sum(axis=1) / weight.sum(axis=1)


def one_cell(m: int, n: int, population: str, mu: float, regime: str, seed: int) -> dict:
    options = {"mu": mu} if regime == "mu known" else {}
    sim = simulate_comparisons(m, n, mu=mu, population=population, seed=seed,
                               overlap_share=0.2 if regime == "+ overlap" else 0.0,
                               judge_signal=1.0 if regime == "+ judge" else None)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", att.IdentifiabilityWarning)
        est = att.PairwiseAttentiveness(**options).fit(sim.labels, judge=sim.judge_left)
    seconds = time.perf_counter() - started
    truth = sim.eta.reindex(est.eta_.index).to_numpy()
    row = {
        "mu_rel_error": abs(est.mu_ - mu) / mu,
        "mae": float(np.abs(est.eta_.to_numpy() - truth).mean()),
        "mae_map": float(np.abs(est.eta_map_.to_numpy() - truth).mean()),
        "mae_constant_0.8": float(np.abs(0.8 - truth).mean()),
        "spearman": float(stats.spearmanr(est.eta_, truth).statistic),
        "iterations": est.n_iter_, "seconds": seconds, "annotations": len(sim.labels),
    }
    if regime == "mu known":
        exact = exact_posterior_mean(sim.labels, est.eta_.index, mu)
        row["mae_exact"] = float(np.abs(exact - truth).mean())
        row["max_gap_to_exact"] = float(np.abs(exact - est.eta_.to_numpy()).max())
    return row


def grid(seeds: int) -> list[dict]:
    rows = []
    for regime in REGIMES:
        for population in POPULATIONS:
            for mu in MUS:
                for m in USERS:
                    for n in PER_USER:
                        runs = [one_cell(m, n, population, mu, regime, seed) for seed in range(seeds)]
                        mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
                        rows.append({"regime": regime, "population": population, "mu": mu, "m": m, "n": n,
                                     "seeds": seeds, **mean})
                        print(f"{regime:10s} {population:4s} mu={mu} m={m:5d} n={n:4d}  "
                              f"mu_err={mean['mu_rel_error']:.4f} mae={mean['mae']:.4f} "
                              f"rho={mean['spearman']:.3f}", flush=True)
    return rows


def speed(n_users: int = 5_000, per_user: int = 200, tol: float = 1e-5) -> dict:
    """1,000,000 annotations (3 annotators per item), our EM next to crowd-kit's Dawid-Skene in one run."""
    sim = simulate_comparisons(n_users, per_user, mu=0.7, population="mix", overlap_share=1.0, seed=0)
    labels = sim.labels
    out: dict = {"annotations": len(labels), "items": int(labels["item_id"].nunique()), "workers": n_users,
                 "tol": tol}
    for name, tolerance in (("ours_same_tol", tol), ("ours_default_tol", att.PairwiseAttentiveness().tol)):
        est = att.PairwiseAttentiveness(tol=tolerance)
        phases = {}
        cpu = time.process_time()
        started = time.perf_counter()
        data = att.prepare_comparisons(labels)
        phases["prepare"] = time.perf_counter() - started
        mark = time.perf_counter()
        reference = att.pick_reference(data)
        layout = att._item_layout(data, reference, np.full(len(data.items), np.nan), est.judge_clip)
        stats_ = att._Stats.build(data, layout)
        state = est._run_em(stats_)
        phases["em"] = time.perf_counter() - mark
        mark = time.perf_counter()
        est.warnings_, est.problems_, est.reference_, est.identifiability_ = [], [], reference, "overlap"
        est._store(data, stats_, layout, state)
        phases["posterior_and_outputs"] = time.perf_counter() - mark
        phases["fit_total"] = time.perf_counter() - started
        phases["fit_cpu"] = time.process_time() - cpu
        phases["iterations"] = est.n_iter_
        phases["tol"] = tolerance
        out[name] = phases
        print(name, phases, flush=True)
    try:
        from crowdkit.aggregation import DawidSkene
    except ImportError:  # crowd-kit is a bench extra, not a dependency
        out["crowdkit_ds"] = None
        return out
    picked = np.where(labels["choice"] == "left", labels["model_left"], labels["model_right"])
    # Integer codes: crowd-kit's pandas code runs about twice as fast on them as on string ids.
    task_table = pd.DataFrame({"task": pd.factorize(labels["item_id"])[0],
                               "worker": pd.factorize(labels["worker_id"])[0], "label": pd.factorize(picked)[0]})
    cpu, started = time.process_time(), time.perf_counter()
    ds = DawidSkene(n_iter=100, tol=tol).fit(task_table)
    out["crowdkit_ds"] = {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                          "iterations": len(ds.loss_history_), "tol": tol}
    out["ratio_ds_over_ours_same_tol"] = out["crowdkit_ds"]["seconds"] / out["ours_same_tol"]["fit_total"]
    print("crowd-kit DS", out["crowdkit_ds"], flush=True)
    return out


def report(result: dict) -> str:
    """The markdown tables of docs/benchmarks.md from the JSON results."""
    rows = pd.DataFrame(result.get("grid", []))
    out = []
    if not rows.empty:
        known = rows[rows["regime"] == "mu known"]
        out += ["MAE of eta with mu known, one annotation per item (EM posterior mean / exact Bayes posterior "
                "mean / EM MAP / constant 0.8):", "",
                "| population | mu | m | " + " | ".join(f"n={n}" for n in PER_USER) + " |",
                "|---|---|---|" + "---|" * len(PER_USER)]
        for (population, mu, m), block in known.groupby(["population", "mu", "m"], sort=False):
            cells = [f"{r.mae:.3f} / {r.mae_exact:.3f} / {r.mae_map:.3f} / {r['mae_constant_0.8']:.3f}"
                     for _, r in block.sort_values("n").iterrows()]
            out.append(f"| {population} | {mu} | {m} | " + " | ".join(cells) + " |")
        ratio = (known["mae"] / known["mae_exact"])
        map_ratio = (known["mae_map"] / known["mae_exact"])
        out += ["", f"EM (posterior mean) MAE / exact MAE: {ratio.min():.4f} to {ratio.max():.4f} over the "
                f"{len(known)} cells; largest |EM - exact| for one user: {known['max_gap_to_exact'].max():.1e}. "
                f"EM MAP / exact: {map_ratio.min():.3f} to {map_ratio.max():.3f} "
                f"({int((map_ratio > 1.10).sum())} cells above 1.10).", ""]
        out += ["|mu_hat - mu| / mu, MAE of eta, Spearman rho (mu estimated):", "",
                "| regime | population | mu | m | " + " | ".join(f"n={n}" for n in PER_USER) + " |",
                "|---|---|---|---|" + "---|" * len(PER_USER)]
        for (regime, population, mu, m), block in rows[rows["regime"] != "mu known"].groupby(
                ["regime", "population", "mu", "m"], sort=False):
            cells = [f"{r.mu_rel_error:.3f} / {r.mae:.3f} / {r.spearman:.2f}"
                     for _, r in block.sort_values("n").iterrows()]
            out.append(f"| {regime} | {population} | {mu} | {m} | " + " | ".join(cells) + " |")
    speed_ = result.get("speed")
    if speed_:
        same, default, ds = speed_["ours_same_tol"], speed_["ours_default_tol"], speed_.get("crowdkit_ds")
        out += ["", f"Speed, {speed_['annotations']:,} annotations ({speed_['items']:,} items, {speed_['workers']:,} "
                "annotators), one run:", "",
                "| | tol | iterations | prepare | EM | posterior + outputs | fit total | fit CPU time |",
                "|---|---|---|---|---|---|---|---|"]
        for name, row in (("ours, crowd-kit's tolerance", same), ("ours, default tolerance", default)):
            out.append(f"| {name} | {row['tol']:g} | {row['iterations']} | {row['prepare']:.2f} s | {row['em']:.2f} s "
                       f"| {row['posterior_and_outputs']:.2f} s | {row['fit_total']:.2f} s | {row['fit_cpu']:.2f} s |")
        if ds:
            out.append(f"| crowd-kit DawidSkene | {ds['tol']:g} | {ds['iterations']} | | | | {ds['seconds']:.2f} s "
                       f"| {ds['cpu']:.2f} s |")
            out.append(f"\nRatio crowd-kit DS / ours (same tolerance): {speed_['ratio_ds_over_ours_same_tol']:.1f}x; "
                       f"load average (1 min) {speed_['load_average_at_start'][0]:.1f} at the start, "
                       f"{speed_['load_average_at_end'][0]:.1f} at the end.")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=("grid", "speed", "report"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.only == "report":
        print(report(result))
        return 0
    result["machine"] = {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
                         "cpus": __import__("os").cpu_count()}
    if args.only in (None, "grid"):
        result["grid"] = grid(args.seeds)
    if args.only in (None, "speed"):
        import os

        load = os.getloadavg()
        result["speed"] = speed()
        result["speed"]["load_average_at_start"] = load
        result["speed"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
