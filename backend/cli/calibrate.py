"""``hcc calibrate``: calibrated confidence and review flags for an ``hcc annotate`` output.

Reads the annotate JSONL and a file of human labels for some of its rows, fits a
:class:`backend.confidence.calibration.Calibrator` on the reviewed rows (prediction vs human label), and writes every
row back with ``confidence`` (P(label is right)), ``needs_review`` and ``review_rank``. The flag threshold
follows from the target precision of the rows left unflagged. Knows nothing of Label Studio.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend import data


@dataclass
class CalibrateOptions:
    label_field: str | None = None
    id_field: str | None = None
    target_precision: float = 0.95
    plot: str | Path | None = None
    save_calibrator: str | Path | None = None
    calibrator: dict[str, Any] | None = None  # Calibrator options (methods, min_pairs, ...)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an annotate output; a line that is not a JSON object is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise data.DataError(f"{path} line {number}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise data.DataError(f"{path} line {number}: not a JSON object")
            records.append(obj)
    if not records:
        raise data.DataError(f"{path}: no rows")
    if not any("label" in r for r in records):
        raise data.DataError(f"{path}: no 'label' field in any row; give the output of `hcc annotate`")
    return records


def read_human_labels(path: str | Path, records: Sequence[dict[str, Any]], *, label_field: str | None = None,
                      id_field: str | None = None) -> tuple[list[str | None], list[str]]:
    """One human label (or None) per prediction row, and warnings.

    Rows are matched by id when the human file has an id column (``id``/``item_id`` or ``id_field``),
    else row by row, which needs the same number of rows. A blank label means "not reviewed".
    """
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: no such file")
    rows, _, bad_json = data._read_rows(path)
    columns = dict.fromkeys(k for row in rows for k in row if k is not None)
    label_col = data._pick(columns, label_field, data.LABEL_FIELDS, "label", str(path))
    if label_col is None:
        raise data.DataError(f"{path}: no label column (looked for {', '.join(data.LABEL_FIELDS)}; "
                             f"found {list(columns)})")
    id_col = data._pick(columns, id_field, data.ID_FIELDS, "id", str(path))
    warnings = [f"{path} row {row}, field '(row)': {detail}" for row, detail in bad_json]
    labels = [data._as_label(row.get(label_col)) for row in rows]
    if id_col is None:
        if len(rows) != len(records):
            raise data.DataError(f"{path} has {len(rows)} rows and the predictions {len(records)}, and it has no "
                                 f"id column ({', '.join(data.ID_FIELDS)}) to match them by")
        return labels, warnings
    position = {str(r.get("id")): i for i, r in enumerate(records) if r.get("id") is not None}
    if not position:
        raise data.DataError(f"{path} has an id column {id_col!r} but the predictions have no 'id' field")
    human: list[str | None] = [None] * len(records)
    seen: dict[str, int] = {}
    for number, (row, label) in enumerate(zip(rows, labels, strict=True), start=1):
        raw = row.get(id_col)
        key = None if raw is None or not str(raw).strip() else str(raw).strip()
        if label is None:
            continue
        if key is None or key not in position:
            warnings.append(f"{path} row {number}, field {id_col!r}: id {key!r} is not in the predictions; ignored")
            continue
        if key in seen:
            warnings.append(f"{path} row {number}, field {id_col!r}: id {key!r} already labelled in row "
                            f"{seen[key]}; the later label is used")
        seen[key] = number
        human[position[key]] = label
    return human, warnings


def calibrate_files(pred: str | Path, human: str | Path, out: str | Path, opts: CalibrateOptions
                    ) -> dict[str, Any]:
    """Fit on the reviewed rows, write the scored rows to ``out``; returns the summary."""
    from backend.cli.annotate import write_json, write_jsonl
    from backend.confidence.calibration import Calibrator

    if not 0 < opts.target_precision <= 1:
        raise ValueError(f"--target-precision must be in (0, 1], got {opts.target_precision}")
    records = read_predictions(pred)
    human_labels, warnings = read_human_labels(human, records, label_field=opts.label_field,
                                               id_field=opts.id_field)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    skipped_reviews = sum(1 for r, h in zip(records, human_labels, strict=True) if h and r.get("label") is None)
    if skipped_reviews:
        print(f"warning: {skipped_reviews} human labels are for rows without a prediction (skipped rows); "
              "they cannot say whether a prediction was right", file=sys.stderr)
    calibrator = Calibrator(**(opts.calibrator or {})).fit_records(records, human_labels)
    print(("note: " if not calibrator.fallback_ else "fallback: ") + calibrator.message_, file=sys.stderr)
    for note in calibrator.notes_:
        print(f"note: {note}", file=sys.stderr)
    confidence = calibrator.predict_records(records)
    summary = score_rows(records, human_labels, confidence, target_precision=opts.target_precision)
    write_jsonl(out, records)
    summary.update(_fit_summary(calibrator, records, human_labels))
    summary["out"] = str(out)
    if opts.plot:
        summary["plot"] = _plot(calibrator, records, human_labels, opts.plot)
    if opts.save_calibrator:
        write_json(opts.save_calibrator, calibrator.to_dict())
        summary["calibrator"] = str(opts.save_calibrator)
    return summary


def score_rows(records: list[dict[str, Any]], human_labels: Sequence[str | None], confidence: Sequence[float], *,
               target_precision: float) -> dict[str, Any]:
    """Add ``confidence``, ``needs_review``, ``review_rank`` (1 = first) and ``reviewed`` to the rows.

    Reviewed rows are not flagged again; rows without a label (skipped, empty text) have nothing to review.
    The threshold is chosen on the other rows so that those left unflagged reach ``target_precision``.
    """
    import numpy as np

    from backend.confidence.calibration import review_order, threshold_for_precision

    # Rounded first, so that the written confidences, the threshold and the flags agree exactly.
    conf = np.round(np.asarray(confidence, dtype=float), 4)
    reviewed = np.array([h is not None and r.get("label") is not None for r, h in zip(records, human_labels,
                                                                                    strict=True)])
    scored = np.array([r.get("label") is not None for r in records])
    open_rows = np.flatnonzero(scored & ~reviewed)
    threshold = threshold_for_precision(conf[open_rows], target_precision)
    rank = np.zeros(len(records), dtype=int)
    rank[open_rows[review_order(conf[open_rows])]] = np.arange(1, len(open_rows) + 1)
    for i, rec in enumerate(records):
        rec["confidence"] = float(conf[i])
        rec["reviewed"] = bool(reviewed[i])
        if reviewed[i]:
            rec["human_label"] = human_labels[i]
        else:
            rec.pop("human_label", None)  # left by an earlier calibrate run on this file
        rec["needs_review"] = bool(rank[i] and conf[i] < threshold)
        rec["review_rank"] = int(rank[i]) if rank[i] else None
    accepted = [i for i in open_rows if conf[i] >= threshold]
    return {
        "rows": len(records),
        "scored": int(scored.sum()),
        "reviewed": int(reviewed.sum()),
        "target_precision": target_precision,
        "threshold": threshold,
        "flagged": int(len(open_rows) - len(accepted)),
        "accepted": len(accepted),
        "expected_precision_accepted": round(float(conf[accepted].mean()), 4) if accepted else None,
    }


def _fit_summary(calibrator, records, human_labels) -> dict[str, Any]:
    from backend.confidence.calibration import (
        brier_score,
        error_detection_auroc,
        expected_calibration_error,
        log_loss,
        reviewed_pairs,
    )

    out: dict[str, Any] = {
        "pairs": calibrator.n_pairs_, "pairs_right": calibrator.n_right_, "method": calibrator.method_,
        "fallback": calibrator.fallback_, "message": calibrator.message_, "notes": calibrator.notes_,
        "cv_log_loss": calibrator.cv_log_loss_,
    }
    rows, correct = reviewed_pairs(records, human_labels)
    if len(rows):
        # Out-of-fold probabilities when the method was chosen by cross-validation: in-sample ones flatter.
        probs = calibrator.oof_ if calibrator.oof_ is not None else [records[i]["confidence"] for i in rows]
        out["pairs_metrics"] = {
            "out_of_fold": calibrator.oof_ is not None,
            "ece": round(expected_calibration_error(probs, correct), 4),
            "brier": round(brier_score(probs, correct), 4),
            "log_loss": round(log_loss(probs, correct), 4),
            "auroc": _round(error_detection_auroc(probs, correct)),
        }
    return out


def _plot(calibrator, records, human_labels, path) -> str | None:
    from backend.confidence.calibration import plot_reliability, reviewed_pairs

    rows, correct = reviewed_pairs(records, human_labels)
    if not len(rows):
        print("warning: no reviewed rows with a prediction: no reliability diagram", file=sys.stderr)
        return None
    oof = calibrator.oof_ is not None
    probs = calibrator.oof_ if oof else [records[i]["confidence"] for i in rows]
    how = "out-of-fold" if oof else "in-sample, prior mapping"
    title = f"{len(rows)} reviewed rows, {calibrator.method_} ({how})"
    return str(plot_reliability(probs, correct, path, title=title))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run(args: Any) -> int:
    """Entry point of ``hcc calibrate`` (argparse namespace from backend/cli/main.py)."""
    options: dict[str, Any] = {}
    if args.methods:
        options["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.min_pairs is not None:
        options["min_pairs"] = args.min_pairs
    opts = CalibrateOptions(label_field=args.label_field, id_field=args.id_field,
                            target_precision=args.target_precision, plot=args.plot,
                            save_calibrator=args.save_calibrator, calibrator=options)
    summary = calibrate_files(args.pred, args.human, args.out, opts)
    print(json.dumps(summary))
    return 0
