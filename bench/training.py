"""Training the encoder on the anchors: frozen vs trained, every ClusterLLM-format set, several budgets and draws.

For each data set in ``../shared/data/clusterllm_nlu`` the anchors are a plain random share of
``large.jsonl`` (``random.Random(draw)``, no stratification, as in ``bench/views.py``); every row is
evaluated on one seeded sample of ``small.jsonl`` (``--items``). Each run trains the encoder exactly as
``hcc annotate`` does (:func:`backend.labelling.training.train_encoder`: fit part, held-out part, adopted
only when it beats the frozen encoder there) and scores the encoder-only pipeline with the frozen and with
the adopted encoder. Trained models are kept under ``$HCC_CACHE_DIR/trained``, so a re-run only re-scores.

    .venv/bin/python bench/training.py --budgets 0.01,0.05,0.1 --draws 5
    .venv/bin/python bench/training.py --report        # the table of bench/results/training.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline  # noqa: E402
from backend.labelling.training import TrainingConfig, train_encoder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clusterllm_nlu"
DATASETS = ("banking77", "clinc", "massive_scenario", "mtop_intent")
#: The HCC paper's Llama-3-8B "HCC with correction" at 5% anchors, and GPT-3.5's on Banking77.
PAPER_HCC = {"banking77": 77.71, "clinc": 82.43, "massive_scenario": 78.13, "mtop_intent": 63.39}


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def accuracy(pipeline: HCCPipeline, texts: list[str], gold: list[str]) -> float:
    records = pipeline.annotate(texts).records
    return sum(r["label"] == g for r, g in zip(records, gold, strict=True)) / len(gold)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--budgets", default="0.05")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--loss", default=TrainingConfig.loss)
    ap.add_argument("--epochs", type=int, default=TrainingConfig.epochs)
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=TrainingConfig.refit,
                    help="train the adopted recipe again on all the anchors (off by default, as in the library)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training.json")
    ap.add_argument("--report", action="store_true", help="print the table of --out and run nothing")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    if args.report:
        print(markdown(results))
        return
    config = TrainingConfig(loss=args.loss, epochs=args.epochs, refit=args.refit)
    cache = cache_dir()
    frozen = Encoder(args.encoder, cache_dir=cache / "embeddings", show_progress=False)
    results["meta"] = {"encoder": args.encoder, "items": args.items, "training": asdict(config)}
    for name in args.datasets.split(","):
        large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
        labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
        sample = random.Random(1234).sample(small, min(args.items, len(small)))
        texts, gold = [r["input"] for r in sample], [r["label"] for r in sample]
        for budget in (float(b) for b in args.budgets.split(",")):
            for draw in range(args.draws):
                # Rows from before the refit existed (trained on the fit part only) keep their six-part keys.
                key = f"{name}|{budget}|{draw}|{args.encoder}|{config.loss}|{config.epochs}" + \
                    ("|refit" if config.refit else "")
                if key in results["runs"]:
                    continue
                anchors = random.Random(draw).sample(large, round(budget * len(large)))
                a_texts, a_labels = [a["input"] for a in anchors], [a["label"] for a in anchors]
                pipeline = HCCPipeline(frozen, labels, config=HCCConfig())
                pipeline.set_anchors(a_texts, a_labels)
                before = accuracy(pipeline, texts, gold)
                t0 = time.perf_counter()
                trained = train_encoder(args.encoder, a_texts, a_labels, trained_dir=cache / "trained", config=config)
                seconds = trained.seconds if trained.reused else time.perf_counter() - t0
                after = before
                if trained.adopted:
                    encoder = Encoder(trained.model_path, cache_dir=cache / "embeddings", show_progress=False)
                    pipeline = HCCPipeline(encoder, labels, config=HCCConfig())
                    pipeline.set_anchors(a_texts, a_labels)
                    after = accuracy(pipeline, texts, gold)
                results["runs"][key] = {
                    "frozen": before, "default": after, "adopted": trained.adopted, "reason": trained.reason,
                    "anchors": len(anchors), "steps": trained.steps, "train_seconds": round(seconds, 1),
                    "holdout": [trained.holdout_right_before, trained.holdout_right_after, trained.holdout_anchors],
                    "peak_rss_mb": round(peak_rss_mb()),
                }
                print(f"{name} {budget:.0%} draw {draw}: frozen {100 * before:.2f} -> {100 * after:.2f} "
                      f"({'adopted' if trained.adopted else 'kept frozen'}, {trained.steps} steps, {seconds:.0f} s)",
                      file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown(results: dict) -> str:
    """One row per data set, budget, encoder and loss: frozen and default (trained where adopted) accuracy over
    the draws, the paired gain, adoptions, training time and the process's peak RSS."""
    cells: dict[tuple, list[dict]] = {}
    for key, run in results["runs"].items():
        name, budget, _draw, encoder, loss, epochs, *refit = key.split("|")
        encoder += " + refit on all anchors" if refit else ", fit part only"
        cells.setdefault((name, float(budget), encoder, loss, epochs), []).append(run)
    lines = ["| data set | anchors | encoder | draws | frozen | **trained, where adopted** | gain (paired) | adopted | "
             "training s, mean (max) | peak RSS MB | paper, Llama-3-8B HCC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, budget, encoder, _loss, _epochs), runs in sorted(cells.items()):
        frozen = [100 * r["frozen"] for r in runs]
        default = [100 * r["default"] for r in runs]
        gain = statistics.mean(d - f for d, f in zip(default, frozen, strict=True))
        seconds = [r["train_seconds"] for r in runs]
        paper = PAPER_HCC.get(name) if budget == 0.05 else None
        lines.append(
            f"| {name} | {budget:.0%} | {encoder} | {len(runs)} | {_mean_spread(frozen)} | **{_mean_spread(default)}** "
            f"| {gain:+.2f} | {sum(r['adopted'] for r in runs)} of {len(runs)} "
            f"| {statistics.mean(seconds):.0f} ({max(seconds):.0f}) | {max(r['peak_rss_mb'] for r in runs)} "
            f"| {f'{paper:.2f}' if paper else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
