"""Do the views earn their place? Every ClusterLLM-format set, several anchor budgets, plain random draws.

For each data set in ``../shared/data/clusterllm_nlu`` the anchors are a plain random share of
``large.jsonl`` (no stratification: users do not stratify), drawn anew per draw; the rows are evaluated on
one seeded sample of ``small.jsonl`` (``--items``; the same items for every row and draw). Rows:

* encoder alone (nearest centroid over the anchors, labels without anchors scored by their names) and the
  same without the label names (the cold-start ablation);
* the encoder with its centroids refined on the unlabelled texts where the anchors vouch for it (the
  default's transductive step, ``backend/labelling/transductive.py``), no LLM. The refinement reads the
  texts of all of ``small.jsonl`` (as it reads all of a project's imported tasks), never their labels;
* the default's encoder before any LLM question: the classifier the anchors choose (centroid, or the
  centroid + top-k ensemble where it proves better out of fold, ``anchors.choose_classifier``), refined
  where the anchors vouch for it;
* LLM zero-shot (draw-independent);
* the paper's recipe (AS k=3, zero-shot + hinted, 5-NN DCCA vote), on the first ``--paper-draws`` draws;
* the default: views pooled by the anchors' evidence (``combine="pool"``, the choice view).

LLM answers are cached on disk (``$HCC_CACHE_DIR``), so a re-run replays them at no LLM cost; the table's
LLM cost is the questions each row asks per evaluated item (anchor questions included).

``--train`` measures what a project that trained its encoder gets (``hcc annotate``'s default, *Start
training* in Label Studio): per draw the encoder is fine-tuned on the draw's anchors
(``backend/labelling/training.py``, adopted only where its held-out anchors prove it; trained models are
cached under ``$HCC_CACHE_DIR/trained``), and the rows are the frozen encoder alone (the baseline), the
trained encoder alone, the default's encoder over it and the default (views pooled) over it.

    .venv/bin/python bench/views.py --llm-base-url http://127.0.0.1:8081/v1      # after `hcc llm serve`
    .venv/bin/python bench/views.py --no-llm --budgets 0.01,0.05,0.1 --draws 5   # encoder rows only
    .venv/bin/python bench/views.py --train --llm-base-url http://127.0.0.1:8081/v1 \
        --out bench/results/views_trained.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import DEFAULT_LLM_MODEL, cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.llm import LLMAnnotator  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline  # noqa: E402
from backend.labelling.training import train_encoder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clusterllm_nlu"
DATASETS = ("banking77", "clinc", "massive_scenario", "mtop_intent")
#: The HCC paper's Llama-3-8B figures at 5% anchors (../shared/data/README.md): zero-shot, encoder, HCC.
PAPER = {"banking77": (33.06, 73.93, 77.71), "clinc": (32.49, 79.01, 82.43),
         "massive_scenario": (43.52, 75.55, 78.13), "mtop_intent": (34.17, 52.49, 63.39)}
PAPER_RECIPE = HCCConfig(combine="dcca", classifier="topk_mean", vote_method="knn", unresolved="vote",
                         llm_views=("zero_shot", "hinted"))
DEFAULT = HCCConfig(combine="pool", llm_views=("choice",))


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def accuracy(labels, gold) -> float:
    return float(np.mean([a == b for a, b in zip(labels, gold, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--budgets", default="0.05", help="anchor shares of large.jsonl, comma-separated")
    ap.add_argument("--llm-budgets", default="0.05", help="budgets that also get the LLM rows")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--paper-draws", type=int, default=1, help="draws that also run the paper's recipe")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--llm-base-url")
    ap.add_argument("--llm-model", default=DEFAULT_LLM_MODEL)
    ap.add_argument("--no-llm", action="store_true")
    ap.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=True,
                    help="the LLM zero-shot row (the same for every encoder: --no-zero-shot skips it)")
    ap.add_argument("--train", action="store_true",
                    help="train the encoder on each draw's anchors; rows over the trained encoder")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "views.json")
    ap.add_argument("--report", nargs="*", type=Path, metavar="JSON",
                    help="print the table of earlier results (these files, or --out) and run nothing")
    args = ap.parse_args()
    if args.report is not None:
        for path in args.report or [args.out]:
            data = json.loads(path.read_text())
            table = markdown_trained(data) if data.get("meta", {}).get("train") else markdown(data)
            print(f"{path.name}:\n\n{table}\n")
        return
    if not args.no_llm and not args.llm_base_url:
        ap.error("give --llm-base-url (e.g. from `hcc llm serve`) or --no-llm")
    cache = cache_dir()
    encoder = Encoder(args.encoder, cache_dir=cache / "embeddings", show_progress=False)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results["meta"] = {"encoder": args.encoder, "llm": None if args.no_llm else args.llm_model, "items": args.items,
                       "train": args.train}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a long run stopped part-way keeps what it measured
        args.out.write_text(json.dumps(results, indent=1))

    for name in args.datasets.split(","):
        run_dataset(name, args, encoder, cache, results["runs"], save)
        save()
    print(markdown_trained(results) if args.train else markdown(results))


def run_dataset(name: str, args, encoder: Encoder, cache: Path, runs: dict, save=lambda: None) -> None:
    large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
    labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
    sample = random.Random(1234).sample(small, min(args.items, len(small))) if args.items else small
    texts, gold = [r["input"] for r in sample], [r["label"] for r in sample]
    project = encoder.encode([r["input"] for r in small])  # what a team imports: every text, no label
    llm_budgets = {float(b) for b in args.llm_budgets.split(",")} if not args.no_llm else set()

    def annotator() -> LLMAnnotator:  # a fresh one per row: its counts are the row's own
        return LLMAnnotator(labels, base_url=args.llm_base_url, model=args.llm_model, cache_dir=cache / "llm",
                            concurrency=2)

    if llm_budgets and not args.train and args.zero_shot:  # draw-independent: the frozen runs' table has it
        key = f"{name}|zero_shot"
        if key not in runs:
            llm = annotator()
            t0 = time.perf_counter()
            answers = llm.zero_shot(texts)
            runs[key] = {"accuracy": accuracy([a.label for a in answers], gold), "questions_per_item": 1.0,
                         "seconds": time.perf_counter() - t0, "llm": llm.stats.as_dict()}
            print(f"{name} LLM zero-shot {100 * runs[key]['accuracy']:.2f}", file=sys.stderr)
    for budget in (float(b) for b in args.budgets.split(",")):
        for draw in range(args.draws):
            anchors = random.Random(draw).sample(large, round(budget * len(large)))
            if args.train:
                run_trained_draw(name, budget, draw, anchors, texts, gold, labels, args, encoder, cache, runs,
                                 annotator if budget in llm_budgets else None, save)
                continue
            rows = {"encoder": (HCCConfig(classifier="centroid", transductive=False), False),
                    "encoder, no label names": (HCCConfig(classifier="centroid", label_prototypes=False,
                                                          transductive=False), False),
                    "encoder, refined": (HCCConfig(classifier="centroid"), False),
                    "encoder, default": (HCCConfig(), False)}
            if budget in llm_budgets:
                rows["default"] = (DEFAULT, True)
                if draw < args.paper_draws:
                    rows["paper recipe"] = (PAPER_RECIPE, True)
            for row, (config, with_llm) in rows.items():
                key = f"{name}|{budget}|{draw}|{row}|{args.encoder}"
                if key in runs:
                    continue
                llm = annotator() if with_llm else None
                pipeline = HCCPipeline(encoder, labels, llm=llm, config=config)
                pipeline.set_anchors([a["input"] for a in anchors], [a["label"] for a in anchors])
                t0 = time.perf_counter()
                if config.transductive:
                    pipeline.refine(project)
                result = pipeline.annotate(texts)
                seconds = time.perf_counter() - t0
                run = {"accuracy": accuracy([r["label"] for r in result.records], gold), "seconds": seconds,
                       "anchors": len(anchors), "classes_without_anchors": len(pipeline.classes_without_anchors())}
                if with_llm:
                    run["llm"] = llm.stats.as_dict()
                    run["questions_per_item"] = questions_per_item(result.report, config, len(texts))
                    run["stages"] = result.report["stages"]
                    if "combination" in result.report:
                        run["combination"] = result.report["combination"]
                if "transductive" in result.report:
                    run["transductive"] = result.report["transductive"]
                run["classifier"] = result.report["classifier"]["method"]
                runs[key] = run
                save()
                print(f"{name} {budget:.0%} draw {draw} {row}: {100 * run['accuracy']:.2f} "
                      f"({seconds:.0f} s)", file=sys.stderr)


def run_trained_draw(name: str, budget: float, draw: int, anchors: list[dict], texts: list[str], gold: list[str],
                     labels: list[str], args, frozen: Encoder, cache: Path, runs: dict, annotator,
                     save=lambda: None) -> None:
    """One draw of ``--train``: the encoder fitted to the draw's anchors (or the frozen one where training
    was not adopted), then the rows over it; ``annotator`` (None: no LLM row) makes the default's LLM."""
    prefix = f"{name}|{budget}|{draw}"
    rows = {"encoder": (HCCConfig(classifier="centroid", transductive=False), False),
            "trained encoder": (HCCConfig(classifier="centroid", transductive=False), False),
            "trained, the default's encoder": (HCCConfig(), False)}
    if annotator is not None:
        rows["default"] = (DEFAULT, True)
    if all(f"{prefix}|{row}|{args.encoder}" in runs for row in rows):
        return
    anchor_texts, anchor_labels = [a["input"] for a in anchors], [a["label"] for a in anchors]
    training = train_encoder(args.encoder, anchor_texts, anchor_labels, trained_dir=cache / "trained")
    print(f"{name} {budget:.0%} draw {draw} training: {training.reason}{' (reused)' if training.reused else ''}",
          file=sys.stderr)
    trained = (Encoder(training.model_path, cache_dir=cache / "embeddings", show_progress=False)
               if training.adopted else frozen)
    small = read_jsonl(DATA / name / "small.jsonl")
    for row, (config, with_llm) in rows.items():
        key = f"{prefix}|{row}|{args.encoder}"
        if key in runs:
            continue
        encoder = frozen if row == "encoder" else trained
        llm = annotator() if with_llm else None
        pipeline = HCCPipeline(encoder, labels, llm=llm, config=config)
        pipeline.set_anchors(anchor_texts, anchor_labels)
        t0 = time.perf_counter()
        if config.transductive:
            pipeline.refine(encoder.encode([r["input"] for r in small]))
        result = pipeline.annotate(texts)
        run = {"accuracy": accuracy([r["label"] for r in result.records], gold),
               "seconds": time.perf_counter() - t0, "anchors": len(anchors),
               "classifier": result.report["classifier"]["method"],
               "training": {"adopted": training.adopted, "seconds": training.seconds, "steps": training.steps,
                            "reason": training.reason}}
        if with_llm:
            run["llm"] = llm.stats.as_dict()
            run["questions_per_item"] = questions_per_item(result.report, config, len(texts))
            run["stages"] = result.report["stages"]
            run["combination"] = result.report.get("combination")
        if "transductive" in result.report:
            run["transductive"] = result.report["transductive"]
        runs[key] = run
        save()
        print(f"{name} {budget:.0%} draw {draw} {row}: {100 * run['accuracy']:.2f} ({run['seconds']:.0f} s)",
              file=sys.stderr)


def questions_per_item(report: dict, config: HCCConfig, items: int) -> float:
    """LLM questions a run asks per evaluated item, anchor questions included (cached or not)."""
    combination = report.get("combination")
    if combination is None:
        return float(len(config.llm_views))
    return (combination["anchor_llm_questions"] + combination["items_asked"] * len(config.llm_views)) / items


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown(results: dict) -> str:
    """One row per data set and anchor budget: each configuration's accuracy over the draws, mean (min-max),
    the default's paired gain over the encoder alone, and the paper's Llama-3-8B figures."""
    runs = results["runs"]
    cells: dict[tuple[str, str], dict[str, dict[int, dict]]] = {}
    zero_shot: dict[str, float] = {}
    for key, run in runs.items():
        parts = key.split("|")
        if len(parts) == 2:
            zero_shot[parts[0]] = 100 * run["accuracy"]
            continue
        name, budget, draw, row, _encoder = parts
        cells.setdefault((name, budget), {}).setdefault(row, {})[int(draw)] = run
    lines = ["| data set | anchors | draws | encoder alone | encoder, no label names | encoder, refined where the "
             "anchors vouch | refined on | encoder, the default's (classifier chosen, refined) | ensemble chosen "
             "| LLM zero-shot | paper recipe (draw 0) | **default** | default - encoder (paired) | default - the "
             "default's encoder (paired) | LLM adopted | LLM questions / item | paper, Llama-3-8B: encoder / HCC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, budget), rows in sorted(cells.items()):
        acc = {row: [100 * r["accuracy"] for _, r in sorted(draws.items())] for row, draws in rows.items()}
        default = rows.get("default", {})
        paired = [100 * (default[d]["accuracy"] - rows["encoder"][d]["accuracy"]) for d in default
                  if d in rows.get("encoder", {})]
        own = rows.get("encoder, default", {})
        over_own = [100 * (default[d]["accuracy"] - own[d]["accuracy"]) for d in default if d in own]
        ensemble = [r.get("classifier") == "ensemble" for r in own.values()]
        adopted = [bool(r.get("combination", {}).get("llm_adopted")) for r in default.values()]
        questions = [r.get("questions_per_item", 0.0) for r in default.values()]
        refined = [bool(r.get("transductive", {}).get("adopted")) for r in rows.get("encoder, refined", {}).values()]
        paper = PAPER.get(name)
        lines.append(
            f"| {name} | {float(budget):.0%} | {len(acc.get('encoder', []))} | {_mean_spread(acc.get('encoder', []))} "
            f"| {_mean_spread(acc.get('encoder, no label names', []))} "
            f"| {_mean_spread(acc.get('encoder, refined', []))} "
            f"| {f'{sum(refined)} of {len(refined)} draws' if refined else '-'} "
            f"| {_mean_spread(acc.get('encoder, default', []))} "
            f"| {f'{sum(ensemble)} of {len(ensemble)} draws' if ensemble else '-'} "
            f"| {f'{zero_shot[name]:.2f}' if name in zero_shot and default else '-'} "
            f"| {_mean_spread(acc.get('paper recipe', []))} | **{_mean_spread(acc.get('default', []))}** "
            f"| {f'{round(statistics.mean(paired), 2) + 0.0:+.2f}' if paired else '-'} "
            f"| {f'{round(statistics.mean(over_own), 2) + 0.0:+.2f}' if over_own else '-'} "
            f"| {f'{sum(adopted)} of {len(adopted)}' if adopted else '-'} "
            f"| {f'{statistics.mean(questions):.2f}' if questions else '-'} "
            f"| {f'{paper[1]:.2f} / {paper[2]:.2f}' if paper and budget == '0.05' else '-'} |")
    return "\n".join(lines)


def markdown_trained(results: dict) -> str:
    """``--train``'s table: per data set and budget, the frozen encoder alone, the trained encoder alone, the
    default's encoder over it and the default over it (mean (min-max) over the draws), with paired gains."""
    cells: dict[tuple[str, str], dict[str, dict[int, dict]]] = {}
    for key, run in results["runs"].items():
        parts = key.split("|")
        if len(parts) == 5:
            cells.setdefault((parts[0], parts[1]), {}).setdefault(parts[3], {})[int(parts[2])] = run
    lines = ["| data set | anchors | draws | encoder alone (frozen) | trained encoder alone | trained, the default's "
             "encoder | **default over the trained encoder** | default - frozen encoder (paired) | default - "
             "trained default's encoder (the LLM's share) | training adopted | training s, mean | LLM adopted | "
             "LLM questions / item | paper, Llama-3-8B HCC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def paired(rows: dict, a: str, b: str) -> str:
        gains = [100 * (rows[a][d]["accuracy"] - rows[b][d]["accuracy"]) for d in rows.get(a, {})
                 if d in rows.get(b, {})]
        return f"{round(statistics.mean(gains), 2) + 0.0:+.2f}" if gains else "-"

    own = "trained, the default's encoder"
    for (name, budget), rows in sorted(cells.items()):
        acc = {row: [100 * r["accuracy"] for _, r in sorted(draws.items())] for row, draws in rows.items()}
        trained = list(rows.get("trained encoder", {}).values())
        default = list(rows.get("default", {}).values())
        adopted = [bool((r.get("combination") or {}).get("llm_adopted")) for r in default]
        seconds = [r["training"]["seconds"] or 0.0 for r in trained]
        questions = [r["questions_per_item"] for r in default]
        paper = PAPER.get(name)
        cells_of_row = [
            name, f"{float(budget):.0%}", str(len(acc.get("encoder", []))), _mean_spread(acc.get("encoder", [])),
            _mean_spread(acc.get("trained encoder", [])), _mean_spread(acc.get(own, [])),
            f"**{_mean_spread(acc.get('default', []))}**", paired(rows, "default", "encoder"),
            paired(rows, "default", own), f"{sum(r['training']['adopted'] for r in trained)} of {len(trained)}",
            f"{statistics.mean(seconds):.0f}" if seconds else "-",
            f"{sum(adopted)} of {len(adopted)}" if adopted else "-",
            f"{statistics.mean(questions):.2f}" if questions else "-",
            f"{paper[2]:.2f}" if paper and budget == "0.05" else "-"]
        lines.append("| " + " | ".join(cells_of_row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
