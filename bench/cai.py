"""Does CAI track accuracy here? Every ClusterLLM-format set, budgets 1/5/10%, 5 plain random anchor draws.

CAI (HCC paper) is |C| / |I|: items on which the views agree over those on which they do not. The paper
reports Pearson 0.81-0.93 between CAI and accuracy across its settings and warns that the relation is not
monotone. Here, for each data set, budget and draw, the views are the encoder (the default's: the
classifier the anchors choose, refined on the texts where they vouch for it) and the LLM's zero-shot
answer (one per item, draw-independent, so cached once per set); the paper's recipe adds a third, hinted
view, which costs a call per item and draw and is measured on draw 0 at 5% only (``bench/views.py``).
Correlations are given over all settings, within each data set (budgets and draws move accuracy; the
LLM's answers stay) and across data sets at one budget (the LLM's strength changes).

    .venv/bin/hcc llm serve --port 8081 &
    .venv/bin/python bench/cai.py --llm-base-url http://127.0.0.1:8081/v1
    .venv/bin/python bench/cai.py --report
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from views import DATA, DATASETS, read_jsonl  # noqa: E402

from backend.config import DEFAULT_LLM_MODEL, cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.llm import LLMAnnotator  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline, cai  # noqa: E402

OUT = Path(__file__).parent / "results" / "cai.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--budgets", default="0.01,0.05,0.1")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--llm-base-url")
    ap.add_argument("--llm-model", default=DEFAULT_LLM_MODEL)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true", help="print the tables of --out and stop")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(args.out.read_text())))
        return
    if not args.llm_base_url:
        ap.error("give --llm-base-url (e.g. from `hcc llm serve`)")
    cache = cache_dir()
    encoder = Encoder(DEFAULT_ENCODER, cache_dir=cache / "embeddings", show_progress=False)
    rows = []
    for name in args.datasets.split(","):
        rows += run_dataset(name, args, encoder, cache)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "items": args.items}, indent=1))
    print(markdown({"rows": rows, "items": args.items}))


def run_dataset(name: str, args, encoder: Encoder, cache: Path) -> list[dict]:
    large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
    labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
    sample = random.Random(1234).sample(small, min(args.items, len(small)))  # the items bench/views.py scores
    texts, gold = [r["input"] for r in sample], np.array([r["label"] for r in sample])
    project = encoder.encode([r["input"] for r in small])
    llm = LLMAnnotator(labels, base_url=args.llm_base_url, model=args.llm_model, cache_dir=cache / "llm",
                       concurrency=2)
    zero_shot = np.array([a.label or "" for a in llm.zero_shot(texts)])
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for draw in range(args.draws):
            anchors = random.Random(draw).sample(large, round(budget * len(large)))
            pipeline = HCCPipeline(encoder, labels, config=HCCConfig())
            pipeline.set_anchors([a["input"] for a in anchors], [a["label"] for a in anchors])
            pipeline.refine(project)
            predicted = np.array([r["label"] for r in pipeline.annotate(texts).records])
            agree = predicted == zero_shot
            consistent = float((predicted[agree] == gold[agree]).mean()) if agree.any() else None
            rows.append({"dataset": name, "budget": budget, "draw": draw, "consistent": int(agree.sum()),
                         "cai": cai(int(agree.sum()), int((~agree).sum())),
                         "encoder_accuracy": float((predicted == gold).mean()),
                         "consistent_accuracy": consistent,
                         "llm_accuracy": float((zero_shot == gold).mean())})
            print(f"{name} {budget:.0%} draw {draw}: CAI {rows[-1]['cai']:.3f}, encoder "
                  f"{100 * rows[-1]['encoder_accuracy']:.2f}", file=sys.stderr)
    return rows


def _correlations(cais: list[float], accuracies: list[float]) -> str:
    if len(cais) < 3 or len(set(cais)) < 2 or len(set(accuracies)) < 2:
        return "- | -"
    return f"{stats.pearsonr(cais, accuracies)[0]:+.2f} | {stats.spearmanr(cais, accuracies)[0]:+.2f}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["| data set | budget | CAI, mean (min-max) | encoder accuracy, mean | consistent items' accuracy "
             "| LLM zero-shot |",
             "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["budget"]), []).append(row)
    for (name, budget), group in groups.items():
        c = [r["cai"] for r in group]
        consistent = [r["consistent_accuracy"] for r in group if r["consistent_accuracy"] is not None]
        lines.append(f"| {name} | {budget:.0%} | {np.mean(c):.3f} ({min(c):.3f}-{max(c):.3f}) | "
                     f"{100 * np.mean([r['encoder_accuracy'] for r in group]):.2f} | "
                     f"{100 * np.mean(consistent):.2f} | {100 * group[0]['llm_accuracy']:.2f} |")
    lines += ["", "| settings | n | Pearson r (CAI, encoder accuracy) | Spearman rho |", "|---|---|---|---|"]
    scopes = [("all", rows)]
    scopes += [(f"within {name}", [r for r in rows if r["dataset"] == name])
               for name in dict.fromkeys(r["dataset"] for r in rows)]
    scopes += [(f"across data sets at {budget:.0%} (means over draws)", None)
               for budget in dict.fromkeys(r["budget"] for r in rows)]
    for label, scope in scopes:
        if scope is None:
            budget = float(label.split(" at ")[1].split("%")[0]) / 100
            means = [(np.mean([r["cai"] for r in g]), np.mean([r["encoder_accuracy"] for r in g]))
                     for (n, b), g in groups.items() if abs(b - budget) < 1e-9]
            cais, accs = [m[0] for m in means], [m[1] for m in means]
        else:
            cais, accs = [r["cai"] for r in scope], [r["encoder_accuracy"] for r in scope]
        lines.append(f"| {label} | {len(cais)} | {_correlations(cais, accs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
