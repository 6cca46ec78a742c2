"""The offline annotation job: files in, one JSON line per input row out, plus a report.

Used by ``hcc annotate`` and ``hcc demo``; knows nothing of Label Studio.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend import data
from backend.labelling.concurrency import DEFAULT_CAP
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder
from backend.labelling.llm import LLMAnnotator
from backend.labelling.pipeline import HCCConfig, HCCPipeline
from backend.labelling.training import TrainingConfig, TrainingResult, train_encoder

log = logging.getLogger(__name__)


@dataclass
class AnnotateOptions:
    labels_file: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    encoder: str = DEFAULT_ENCODER
    encoder_precision: str | None = None  # None: HCC_ENCODER_PRECISION, else auto
    second_encoder: str | None = None  # a second encoder's opinion, a confidence signal (backend/confidence/prior.py)
    llm_base_url: str | None = None  # None: encoder only
    llm_model: str = "local"
    llm_api_key: str | None = None
    llm_concurrency: int = DEFAULT_CAP  # cap on requests in flight
    llm_timeout: float = 60.0
    logprobs: bool = False  # on the label views; the choice view decides by the server (LLMAnnotator)
    choice_logprobs: bool | None = None
    structured: str = "auto"
    seed: int = 0
    self_consistency: int = 0  # k sampled zero-shot answers per item (0: off); see backend/confidence/signals.py
    sc_temperature: float = 0.7
    cache_dir: Path | None = None
    progress: bool = True
    hcc: HCCConfig = field(default_factory=HCCConfig)
    train: bool = True  # fit the encoder to the anchors where they suffice (backend/labelling/training.py)
    training: TrainingConfig = field(default_factory=TrainingConfig)


def load_inputs(unlabeled: str | Path, anchors: str | Path, opts: AnnotateOptions):
    """Read both files and the label set; report every row problem on stderr."""
    label_file = data.read_label_file(opts.labels_file) if opts.labels_file else None
    label_set = list(label_file) if label_file else None
    anchor_table = data.read_table(anchors, text_field=opts.text_field, label_field=opts.label_field,
                                   require_label=True)
    picked, label_set = data.select_anchors(anchor_table, label_set)
    if not picked.ids:
        raise data.DataError(f"{anchors}: no usable anchor rows (every row was empty or unlabelled)")
    table = data.read_table(unlabeled, text_field=opts.text_field, label_field=opts.label_field)
    ids = data.row_ids(table)  # also records duplicate-id problems
    for problem in anchor_table.problems + table.problems:
        print(f"warning: {problem}", file=sys.stderr)
    descriptions = {k: v for k, v in (label_file or {}).items() if v}
    return table, ids, picked, label_set, descriptions


def train_for(anchor_texts: list[str], anchor_labels: list[str], opts: AnnotateOptions) -> TrainingResult | None:
    """Fit the encoder to the anchors (None when training is off); the result says whether it was adopted."""
    if not opts.train:
        return None
    trained_dir = Path(opts.cache_dir) / "trained" if opts.cache_dir else None
    result = train_encoder(opts.encoder, anchor_texts, anchor_labels, trained_dir=trained_dir,
                           config=opts.training, progress=opts.progress)
    if opts.progress:
        print(f"training: {result.reason}{' (reused)' if result.reused else ''}", file=sys.stderr)
    return result


def build_pipeline(label_set: list[str], opts: AnnotateOptions, descriptions: dict[str, str] | None = None,
                   *, encoder_model: str | None = None) -> HCCPipeline:
    """The pipeline of ``opts``; ``encoder_model`` (a trained encoder's directory) replaces ``opts.encoder``."""
    cache = Path(opts.cache_dir) if opts.cache_dir else None
    encoder = Encoder(encoder_model or opts.encoder, cache_dir=cache / "embeddings" if cache else None,
                      show_progress=opts.progress or None, precision=opts.encoder_precision)
    second = None
    if opts.second_encoder:
        second = Encoder(opts.second_encoder, cache_dir=cache / "embeddings" if cache else None,
                         show_progress=opts.progress or None, precision=opts.encoder_precision)
    llm = None
    if opts.llm_base_url:
        llm = LLMAnnotator(
            label_set, base_url=opts.llm_base_url, model=opts.llm_model, api_key=opts.llm_api_key,
            descriptions=descriptions or None, seed=opts.seed,
            cache_dir=cache / "llm" if cache else None, concurrency=opts.llm_concurrency,
            timeout=opts.llm_timeout, logprobs=opts.logprobs, structured=opts.structured,
            choice_logprobs=opts.choice_logprobs,
        )
        llm.check()
    return HCCPipeline(encoder, label_set, llm=llm, config=opts.hcc, second_encoder=second,
                       descriptions=descriptions or {})


def annotate_files(unlabeled: str | Path, anchors: str | Path, out: str | Path, opts: AnnotateOptions,
                   *, report_path: str | Path | None = None) -> dict[str, Any]:
    table, ids, picked, label_set, descriptions = load_inputs(unlabeled, anchors, opts)
    training = train_for(picked.texts, picked.labels, opts)
    trained_model = training.model_path if training is not None and training.adopted else None
    pipeline = build_pipeline(label_set, opts, descriptions, encoder_model=trained_model)
    pipeline.set_anchors(picked.texts, picked.labels)
    for label in pipeline.classes_without_anchors():
        fate = ("has no anchors; it is scored by its name until it has some" if opts.hcc.label_prototypes
                else "has no anchors; the encoder can never predict it")
        print(f"warning: label {label!r} {fate}", file=sys.stderr)
    texts = [t[: data.MAX_TEXT_CHARS] for t in table.texts()]
    skip = [not t.strip() for t in texts]
    result = pipeline.annotate(texts, skip=skip, progress=opts.progress)
    if opts.progress:
        print(f"prior: {pipeline.prior().message}", file=sys.stderr)
        print(pipeline.classifier_choice().message, file=sys.stderr)
        if pipeline.refinement() is not None:
            print(f"transductive: {pipeline.refinement().message}", file=sys.stderr)
    if opts.self_consistency and pipeline.llm is not None:
        _add_self_consistency(result, pipeline.llm, opts)
    problems_by_row: dict[int, list[str]] = {}
    for problem in table.problems:
        problems_by_row.setdefault(problem.row, []).append(problem.kind)
    for number, (rec, row) in enumerate(zip(result.records, table.rows, strict=True), start=1):
        rec["text"] = str(row.get(table.text_field) or "")
        rec["id"] = ids[number - 1]
        if number in problems_by_row:
            rec["problems"] = problems_by_row[number]
    write_jsonl(out, result.records)
    report = dict(result.report, anchors_used=len(picked.ids), problems=len(table.problems))
    if training is not None:
        report["training"] = training.as_dict()
    if report_path:
        write_json(report_path, report)
    return report


def _add_self_consistency(result, llm: LLMAnnotator, opts: AnnotateOptions) -> None:
    from copy import copy

    from backend.confidence.signals import add_self_consistency

    # Samples need no token probabilities, and asking for them doubles a llama.cpp call: a copy of the
    # annotator (same client, cache and prompts) without them.
    sampler = copy(llm)
    sampler.logprobs = False
    sampler.stats = type(llm.stats)()
    add_self_consistency(result.records, sampler, k=opts.self_consistency, temperature=opts.sc_temperature)
    result.report["self_consistency"] = {"k": opts.self_consistency, "temperature": opts.sc_temperature,
                                         "llm": sampler.stats.as_dict()}


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write atomically: a crash never leaves a half-written file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
