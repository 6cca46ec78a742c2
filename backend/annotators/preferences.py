"""Comparison-mode data in and weighted preference pairs out.

Input: one row per (item, annotator) choice, from a CSV/JSONL file or a list of records (what the Label
Studio layer builds from ``<Pairwise>`` results). The keys are configurable (:class:`ComparisonKeys`).

Output (:func:`export_preferences`): one preference pair per kept choice, for DPO-style training::

    {"item_id", "prompt", "chosen", "rejected", "weight", "annotator", "annotator_quality", "judge_confidence"}

Weight. ``weight = 2 p - 1`` with ``p = P(the annotator's choice is the better response | all the data)``,
the posterior of :class:`backend.annotators.attentiveness.PairwiseAttentiveness`, in which the judge's
probability (when the pair was judged) is the item's prior and the annotators' choices the likelihood: the
confidence ``C = |2p - 1|`` of CW-PO (Confidence-Weighted Preference Optimisation, 2026), taken of the
posterior so that every piece of evidence is counted once and the weight grows with it: an unsure judge
(p_left = 1/2) changes nothing, an agreeing one raises it, a contradicting one lowers it. A choice the
evidence says is more likely wrong than right (``p <= 1/2``) is left out (``left_out_contradicted``), as
are choices of annotators whose quality (posterior mean ``eta``) is below ``min_quality``, ties and skips,
and pairs whose prompt or responses are missing. ``judge_confidence`` reports the judge's own
``2 |p_left - 1/2|``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from backend.annotators.attentiveness import MODEL_COLUMNS, PairwiseAttentiveness, clean_text

log = logging.getLogger(__name__)

EXPORT_FIELDS = ("item_id", "prompt", "chosen", "rejected", "weight", "annotator", "annotator_quality",
                 "judge_confidence")
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ComparisonKeys:
    """Names of the fields in the input (task data keys in Label Studio, columns in a file)."""

    item: str = "item_id"
    worker: str = "worker_id"
    choice: str = "choice"
    prompt: str = "prompt"
    response_left: str = "response_left"
    response_right: str = "response_right"
    model_left: str = "model_left"
    model_right: str = "model_right"

    def canonical(self) -> dict[str, str]:
        """Input name -> the engine's column name."""
        return {self.item: "item_id", self.worker: "worker_id", self.choice: "choice", self.prompt: "prompt",
                self.response_left: "response_left", self.response_right: "response_right",
                self.model_left: "model_left", self.model_right: "model_right"}


class TableError(ValueError):
    """A file cannot be read as a table (missing, not CSV/JSONL, no rows)."""


def read_table(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A CSV or JSONL file as string columns indexed by data row number (1-based), and read problems.

    Bytes that are not UTF-8 are replaced (U+FFFD) and reported; a JSONL line that is not a JSON object
    is skipped and reported. Empty cells are "".
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    raw = path.read_bytes()
    problems: list[str] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        problems.append(f"{path}: bytes that are not UTF-8 were replaced by U+FFFD")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        frame = _read_jsonl(text, path, problems)
    else:
        try:
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise TableError(f"{path}: not a readable CSV ({exc})") from exc
    frame.index = pd.RangeIndex(1, len(frame) + 1, name="row")
    return frame, problems


def _read_jsonl(text: str, path: Path, problems: list[str]) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            bad.append(number)
            continue
        rows.append({k: "" if v is None else (v if isinstance(v, str) else json.dumps(v) if isinstance(
            v, dict | list) else str(v)) for k, v in obj.items()})
    if bad:
        problems.append(f"{path}: {len(bad)} lines are not JSON objects and were skipped (lines {_examples(bad)})")
    return pd.DataFrame(rows).fillna("") if rows else pd.DataFrame()


def _examples(values: Iterable[Any]) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:_MAX_EXAMPLES]) + (", ..." if len(values) > _MAX_EXAMPLES else "")


def comparisons_frame(data: pd.DataFrame | Sequence[Mapping[str, Any]],
                      keys: ComparisonKeys | None = None) -> pd.DataFrame:
    """Records or a DataFrame with the input's names -> a DataFrame with the engine's column names.

    Fields other than those of ``keys`` are kept as they are. A missing id or choice field is an error
    naming the field; missing model or text fields are allowed (see the module docstring).
    """
    keys = keys or ComparisonKeys()
    frame = data.copy() if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
    missing = [name for name in (keys.item, keys.worker, keys.choice) if name not in frame.columns]
    if missing:
        raise ValueError(f"comparisons need the fields {[keys.item, keys.worker, keys.choice]}; missing {missing}, "
                         f"found {list(frame.columns)}")
    renames = {source: target for source, target in keys.canonical().items() if source in frame.columns}
    clashes = [target for source, target in renames.items() if source != target and target in frame.columns]
    frame = frame.drop(columns=clashes).rename(columns=renames)
    return frame


def has_models(frame: pd.DataFrame) -> bool:
    """Whether the frame names the models on both sides (pairwise mode)."""
    return all(c in frame.columns for c in MODEL_COLUMNS)


def fit_comparisons(data: pd.DataFrame | Sequence[Mapping[str, Any]], *, keys: ComparisonKeys | None = None,
                    judge: Mapping[str, Any] | None = None, **options: Any) -> PairwiseAttentiveness:
    """Fit :class:`PairwiseAttentiveness` on records or a DataFrame (``options`` go to the estimator).

    ``judge`` maps item ids to the judge's P(left better), or to judge verdicts
    (:func:`judge_left_probabilities`).
    """
    p_left = judge_left_probabilities(judge or {})
    return PairwiseAttentiveness(**options).fit(comparisons_frame(data, keys), judge=p_left or None)


def item_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """Per item id: prompt, response_left, response_right (the first non-empty value of each)."""
    columns = ["prompt", "response_left", "response_right"]
    texts = pd.DataFrame({c: clean_text(frame[c]) if c in frame.columns else "" for c in columns}, index=frame.index)
    texts["item_id"] = clean_text(frame["item_id"])
    texts = texts[texts["item_id"] != ""]
    return texts.replace("", np.nan).groupby("item_id", sort=False).first().fillna("")


def judge_left_probabilities(verdicts: Mapping[str, Any]) -> dict[str, float]:
    """item id -> P(left better) from judge verdicts (:class:`backend.annotators.judge.JudgeVerdict`, dicts with a
    ``p_left`` key, or plain numbers); items without a probability are left out."""
    out: dict[str, Any] = {}
    for item, verdict in dict(verdicts).items():
        if isinstance(verdict, Mapping):
            value = verdict.get("p_left")
        elif hasattr(verdict, "p_left"):
            value = verdict.p_left
        else:
            value = verdict  # a number (or something the estimator will refuse, naming the item)
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            out[str(item)] = value
    return out


def judge_items(judge: Any, frame: pd.DataFrame, *, progress=None) -> dict[str, Any]:
    """Ask a :class:`backend.annotators.judge.PairwiseJudge` about each item once; item id -> verdict."""
    texts = item_texts(frame)
    verdicts = judge.judge(list(texts["prompt"]), list(texts["response_left"]), list(texts["response_right"]),
                           progress=progress)
    return dict(zip(texts.index, verdicts, strict=True))


@dataclass
class PreferenceExport:
    records: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


def export_preferences(
    data: pd.DataFrame | Sequence[Mapping[str, Any]],
    *,
    keys: ComparisonKeys | None = None,
    judge: Mapping[str, Any] | None = None,
    min_quality: float = 0.5,
    estimator: PairwiseAttentiveness | None = None,
    **options: Any,
) -> PreferenceExport:
    """Weighted preference pairs from comparison records (module docstring: the weight and what is left out).

    ``judge``: item id -> P(left better), or judge verdicts; it is the EM's prior and sets the confidence
    factor of the weight. ``estimator``: an already fitted estimator on the same data (else one is fitted
    with ``options``).
    """
    if not 0.0 <= min_quality <= 1.0:
        raise ValueError(f"min_quality must be in [0, 1], got {min_quality}")
    frame = comparisons_frame(data, keys)
    p_left = judge_left_probabilities(judge or {})
    if estimator is None:
        estimator = PairwiseAttentiveness(**options).fit(frame, judge=p_left or None)
    texts = item_texts(frame)
    chosen = estimator.annotations_.copy()
    chosen["item_id"] = chosen["item_id"].astype(str)
    chosen["worker_id"] = chosen["worker_id"].astype(str)
    quality = estimator.eta_.reindex(chosen["worker_id"]).to_numpy()
    confidence = pd.to_numeric(pd.Series(p_left, dtype=object), errors="coerce").sub(0.5).abs().mul(2)
    judged = chosen["item_id"].map(confidence)
    item_text = texts.reindex(chosen["item_id"])
    has_text = ((item_text["prompt"] != "") & (item_text["response_left"] != "")
                & (item_text["response_right"] != "")).to_numpy()
    weight = 2.0 * chosen["p_correct"].to_numpy() - 1.0  # the posterior's confidence: evidence counted once
    supported = weight > 0.0
    keep = (quality >= min_quality) & has_text & supported
    left = (chosen["choice"] == "left").to_numpy()
    records = [
        {"item_id": item, "prompt": prompt, "chosen": left_text if is_left else right_text,
         "rejected": right_text if is_left else left_text, "weight": round(float(w), 6), "annotator": worker,
         "annotator_quality": round(float(q), 6), "judge_confidence": None if np.isnan(c) else round(float(c), 6)}
        for item, worker, prompt, left_text, right_text, is_left, w, q, c in zip(
            chosen["item_id"][keep], chosen["worker_id"][keep], item_text["prompt"][keep],
            item_text["response_left"][keep], item_text["response_right"][keep], left[keep], weight[keep],
            quality[keep], judged.to_numpy(dtype=float)[keep], strict=True)
    ]
    no_text_items = sorted(set(chosen["item_id"][~has_text]))
    if no_text_items:
        log.warning("%d items without a prompt or a response were not exported (%s)", len(no_text_items),
                    _examples(no_text_items))
    report = {
        "pairs": len(records), "choices": len(chosen),
        "left_out_low_quality": int((quality < min_quality).sum()),
        "left_out_missing_text": int((~has_text & (quality >= min_quality)).sum()),
        "left_out_contradicted": int((~supported & has_text & (quality >= min_quality)).sum()),
        "annotators_kept": int((estimator.eta_ >= min_quality).sum()), "annotators": len(estimator.eta_),
        "min_quality": min_quality, "reference": estimator.reference_, "mu": round(estimator.mu_, 6),
        "judged_items": len(p_left), "identifiability": estimator.identifiability_,
        "problems": estimator.problems_ + ([f"{len(no_text_items)} items without a prompt or a response "
                                            f"({_examples(no_text_items)})"] if no_text_items else []),
        "warnings": estimator.warnings_,
    }
    return PreferenceExport(records=records, report=report)


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line; returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
