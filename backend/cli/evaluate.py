"""Accuracy of predictions against gold labels, overall and per stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def accuracy_by_stage(
    predictions: Sequence[dict[str, Any]], gold: Sequence[str | None], *, fields: Sequence[str] = ()
) -> dict[str, Any]:
    """Accuracy overall and per ``stage``; rows with no gold label are not counted.

    ``fields`` names extra prediction fields (e.g. ``encoder_label``) to score on the same rows.
    """
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions but {len(gold)} gold labels: the files do not align")
    scored = [(p, g) for p, g in zip(predictions, gold, strict=True) if g is not None]
    result: dict[str, Any] = {"n": len(scored), "accuracy": _acc([p.get("label") == g for p, g in scored])}
    stages: dict[str, list[bool]] = {}
    for p, g in scored:
        stages.setdefault(str(p.get("stage")), []).append(p.get("label") == g)
    result["stages"] = {s: {"n": len(v), "accuracy": _acc(v)} for s, v in sorted(stages.items())}
    for name in fields:
        result[name] = _acc([p.get(name) == g for p, g in scored])
    return result


def _acc(hits: Sequence[bool]) -> float | None:
    return round(sum(hits) / len(hits), 6) if hits else None
