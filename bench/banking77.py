"""Banking77 benchmark: encoder classifiers, LLM views, HCC stages and an ablation of our changes.

5% of the train split (seeded) are the human anchors; the encoder rows use the whole test split, the
LLM rows a seeded sample of it (``--items``, or the whole split with ``--items 0``). Every LLM answer
is cached, so re-runs and new ablation rows only pay for calls they have not made before.

    .venv/bin/python bench/banking77.py --items 1000            # starts the embedded Qwen2.5-Coder-1.5B
    .venv/bin/python bench/banking77.py --llm-base-url http://127.0.0.1:8081/v1 --items 1000
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cli.evaluate import accuracy_by_stage  # noqa: E402
from backend.config import DEFAULT_LLM_MODEL, cache_dir  # noqa: E402
from backend.labelling.anchors import class_scores, knn_vote  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder, cpu_has_native_bf16  # noqa: E402
from backend.labelling.llm import LLMAnnotator  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline, dcca  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"

#: The paper's recipe, spelled out: HCCConfig's defaults are the ablation's winner, not the paper.
PAPER = {"classifier": "topk_mean", "vote_method": "knn", "unresolved": "vote", "combine": "dcca",
         "llm_views": ("zero_shot", "hinted")}
#: The DCCA settings of every row here; the pooled default is measured by bench/views.py.
DCCA = {"combine": "dcca", "llm_views": ("zero_shot", "hinted")}
#: Ablation rows: name -> HCC settings, each the paper's recipe with the named changes.
ABLATION = {
    "paper: AS k=3, zero-shot + hinted, 5-NN vote": HCCConfig(**PAPER),
    "centroid classifier, 5-NN vote": HCCConfig(**PAPER | {"classifier": "centroid"}),
    "centroid classifier, centroid vote": HCCConfig(**PAPER | {"classifier": "centroid", "vote_method": "centroid"}),
    "centroid classifier, centroid vote, 1 round": HCCConfig(
        **PAPER | {"classifier": "centroid", "vote_method": "centroid", "rounds": 1}),
    "centroid classifier, centroid vote, unresolved=encoder": HCCConfig(
        **PAPER | {"classifier": "centroid", "vote_method": "centroid", "unresolved": "encoder"}),
    "centroid classifier, ensemble vote": HCCConfig(**PAPER | {"classifier": "centroid", "vote_method": "ensemble"}),
    "AS k=3 classifier, centroid vote": HCCConfig(**PAPER | {"vote_method": "centroid"}),
}
#: The row that must equal the project's DCCA defaults (checked at start-up, so the table cannot drift again).
DEFAULT_ROW = "centroid classifier, centroid vote, unresolved=encoder"
assert ABLATION[DEFAULT_ROW] == HCCConfig(**DCCA), "the default row no longer matches HCCConfig's DCCA defaults"
#: Rows with the few-shot view (retrieved anchors as examples, encoder's top classes as candidates), run on
#: the first ``--few-shot-items`` items of the sample: each call reads ~70 more prompt tokens.
FEW_SHOT = {
    "centroid, zero-shot + few-shot(4 ex, top-5), centroid vote": HCCConfig(
        combine="dcca", classifier="centroid", vote_method="centroid", llm_views=("zero_shot", "few_shot"),
        few_shot_examples=4, candidates=5),
    "centroid, hinted + few-shot(4 ex, top-5), centroid vote": HCCConfig(
        combine="dcca", classifier="centroid", vote_method="centroid", llm_views=("hinted", "few_shot"),
        few_shot_examples=4, candidates=5),
    "centroid, zero-shot + hinted, same items (reference)": HCCConfig(classifier="centroid",
                                                                      vote_method="centroid", **DCCA),
}


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def encoder_rows(enc: Encoder, anchors, tests, labels) -> dict:
    idx = {lab: i for i, lab in enumerate(labels)}
    a_vec = enc.encode([r["text"] for r in anchors])
    a_lab = np.array([idx[r["category"]] for r in anchors])
    q = enc.encode([r["text"] for r in tests])
    gold = np.array([idx[r["category"]] for r in tests])
    rows = {}
    for method in ("topk_mean", "centroid", "ensemble"):
        for k in (3, 5):
            if method == "centroid" and k == 5:
                continue
            s = class_scores(q, a_vec, a_lab, len(labels), k=k, method=method)
            rows[f"{method} k={k}" if method != "centroid" else "centroid"] = float((s.labels == gold).mean())
    rows["plain 5-NN vote"] = float((knn_vote(q, a_vec, a_lab, k=5).labels == gold).mean())
    return rows


def speed_rows(model: str, train, labels) -> dict:
    """Encoder sentences/s (no cache) in each precision this CPU runs natively, and AS + DCCA seconds over
    10,000 items."""
    texts = [r["text"] for r in train[:2000]]
    rows: dict = {}
    precisions = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    for precision in precisions:
        enc = Encoder(model, precision=precision)
        enc.encode(texts[:64])  # load and warm up
        t0 = time.perf_counter()
        vectors = enc.encode(texts[64:])
        rows[f"encoder_sentences_per_s_{precision}"] = round((len(texts) - 64) / (time.perf_counter() - t0), 1)
    rng = np.random.default_rng(0)
    items = np.vstack([vectors] * 6)[:10000]
    items = items + rng.normal(0, 0.01, items.shape).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    anchors, a_lab = vectors[:500], rng.integers(0, len(labels), 500)
    t0 = time.perf_counter()
    scored = class_scores(items, anchors, a_lab, len(labels), k=3)
    views = np.column_stack([scored.labels, scored.labels, np.where(rng.random(10000) < 0.5, scored.labels,
                                                                    rng.integers(0, len(labels), 10000))])
    dcca(items, views, anchors, a_lab, k=5, rounds=2)
    rows["as_dcca_10k_items_s"] = round(time.perf_counter() - t0, 3)
    return rows


def hcc_row(records: list[dict], gold: list[str]) -> dict:
    """Flatten accuracy_by_stage into one table row (the keys bench/report.py reads)."""
    fields = [f for f in ("encoder_label", "llm_zero_shot", "llm_hinted", "llm_few_shot") if f in records[0]]
    scores = accuracy_by_stage(records, gold, fields=fields)
    row: dict = {"n": scores["n"], "final": scores["accuracy"], **{f: scores[f] for f in fields}}
    for stage in ("consistent", "round1", "round2", "unresolved"):
        cell = scores["stages"].get(stage, {"n": 0, "accuracy": None})
        row[f"{stage}_n"], row[f"{stage}_acc"] = cell["n"], cell["accuracy"]
    if "llm_hinted" in records[0]:
        row["hint_copied"] = sum(r["llm_hinted"] == r["encoder_label"] for r in records) / len(records)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000, help="LLM sample size (0: the whole test split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--model", default=DEFAULT_LLM_MODEL)
    ap.add_argument("--llm-base-url")
    ap.add_argument("--no-llm", action="store_true")
    ap.add_argument("--logprobs", action="store_true", help="ask for logprobs (about 2x slower here)")
    ap.add_argument("--structured", default="grammar", help="answer constraint (see LLMAnnotator)")
    ap.add_argument("--only", help="comma-separated ablation row numbers to run (1-based)")
    ap.add_argument("--few-shot-items", type=int, default=0, help="run the few-shot rows on this many items")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "banking77.json")
    args = ap.parse_args()

    train, test = read(DATA / "train.csv"), read(DATA / "test.csv")
    labels = json.loads((DATA / "categories.json").read_text())
    rng = random.Random(args.seed)
    anchors = rng.sample(train, round(0.05 * len(train)))
    sample = test if args.items <= 0 else random.Random(args.seed).sample(test, args.items)
    cache = cache_dir()
    enc = Encoder(args.encoder, cache_dir=cache / "embeddings")
    result: dict = {"anchors": len(anchors), "test_items": len(test), "llm_items": len(sample),
                    "encoder": args.encoder, "seed": args.seed}
    result["encoder_full_test"] = encoder_rows(enc, anchors, test, labels)
    result["speed"] = speed_rows(args.encoder, train, labels)
    print(json.dumps(result, indent=1), file=sys.stderr)
    if not args.no_llm:
        result["llm_model"] = args.model
        result["ablation"] = run_ablation(args, enc, anchors, sample, labels, cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


def run_ablation(args, enc, anchors, sample, labels, cache) -> dict:
    server = None
    base_url = args.llm_base_url
    if not base_url:
        from backend.models import local_llm

        port = 8091
        # Without logprobs the server need not keep logits for every prompt token.
        extra = () if args.logprobs else ("--logits_all", "false")
        server = local_llm.serve(args.model, port=port, log_file=cache / "bench-llm-server.log", extra_args=extra)
        base_url = local_llm.base_url_for("127.0.0.1", port)
    try:
        texts = [r["text"] for r in sample]
        gold = [r["category"] for r in sample]
        rows = {}
        wanted = {int(x) for x in args.only.split(",")} if args.only else None
        plan = [(name, config, texts, gold) for name, config in ABLATION.items()]
        plan = [row for number, row in enumerate(plan, start=1) if not wanted or number in wanted]
        if args.few_shot_items:
            n = args.few_shot_items
            plan += [(f"[{n} items] {name}", config, texts[:n], gold[:n]) for name, config in FEW_SHOT.items()]
        for name, config, row_texts, row_gold in plan:
            # A fresh annotator per row (same on-disk cache) so its call counts are the row's own.
            llm = LLMAnnotator(labels, base_url=base_url, model=args.model, cache_dir=cache / "llm",
                               concurrency=2, logprobs=args.logprobs, timeout=120,
                               structured=args.structured)
            pipe = HCCPipeline(enc, labels, llm=llm, config=replace(config))
            pipe.set_anchors([r["text"] for r in anchors], [r["category"] for r in anchors])
            t0 = time.perf_counter()
            res = pipe.annotate(row_texts, progress=True)
            row = hcc_row(res.records, row_gold)
            row["cai"], row["resolved_ratio"] = res.report["cai"], res.report["resolved_ratio"]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["llm"] = dict(res.report["llm"])
            rows[name] = row
            print(f"{name}: final {pct(row['final'])} C {row['consistent_n']} ({pct(row['consistent_acc'])})",
                  file=sys.stderr, flush=True)
        return rows
    finally:
        if server is not None:
            from backend.models import local_llm

            local_llm.stop(server)


if __name__ == "__main__":
    sys.exit(main())
