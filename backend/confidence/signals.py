"""Per-item confidence signals of an HCC run, and the LLM self-consistency sampler.

Sampled self-consistency: ask the same question ``k`` more times at a temperature above zero and count how
often the samples repeat the greedy answer (Wang et al., "Self-Consistency Improves Chain of Thought
Reasoning in Language Models", ICLR 2023, use the vote of such samples; Manakul et al., "SelfCheckGPT",
EMNLP 2023, use their disagreement to flag unreliable outputs). A model that is unsure of a label scatters
its samples. Every sample is an ordinary cached request (its temperature and seed are part of the cache
key), so a re-run costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.confidence.prior import PriorMapping
from backend.confidence.probability import logit
from backend.config import LLM_VIEWS
from backend.data import MAX_TEXT_CHARS

SAMPLED_VIEWS = ("zero_shot", "hinted")


def self_consistency(
    llm: Any,
    texts: Sequence[str],
    greedy: Sequence[str | None],
    *,
    k: int = 3,
    temperature: float = 0.7,
    view: str = "zero_shot",
    hints: Sequence[str] | None = None,
    seed: int | None = None,
    progress: Callable[[], None] | None = None,
) -> tuple[list[float | None], list[list[str | None]]]:
    """Share of ``k`` sampled answers that equal the greedy answer, per text, and the sampled labels.

    ``llm`` is an :class:`backend.labelling.llm.LLMAnnotator`; sample ``j`` is sent with seed ``seed + 1 + j``
    (``seed`` defaults to the annotator's), so the samples differ from each other but are reproducible
    and cached. The share is ``None`` where it means nothing: the greedy answer was not a valid label, or
    every sample failed. A sample outside the label set counts as a disagreement.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"self-consistency k must be an integer >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"self-consistency temperature must be > 0 (0 repeats the greedy answer), got {temperature!r}")
    if view not in SAMPLED_VIEWS:
        raise ValueError(f"self-consistency view must be one of {', '.join(SAMPLED_VIEWS)}, got {view!r}")
    if len(greedy) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(greedy)} greedy answers")
    if view == "hinted" and (hints is None or len(hints) != len(texts)):
        raise ValueError("the hinted view needs one hint per text")
    base = llm.seed if seed is None else int(seed)
    rounds = []
    for j in range(k):
        if view == "zero_shot":
            rounds.append(llm.zero_shot(texts, temperature=temperature, seed=base + 1 + j, progress=progress))
        else:
            rounds.append(llm.hinted(texts, hints, temperature=temperature, seed=base + 1 + j, progress=progress))
    shares: list[float | None] = []
    samples: list[list[str | None]] = []
    for i, answer in enumerate(greedy):
        answered = [r[i] for r in rounds if r[i].error is None]
        samples.append([a.label for a in answered])
        if answer is None or not answered:
            shares.append(None)
        else:
            shares.append(round(sum(a.label == answer for a in answered) / len(answered), 4))
    return shares, samples


def add_self_consistency(
    records: list[dict[str, Any]],
    llm: Any,
    *,
    k: int = 3,
    temperature: float = 0.7,
    view: str = "zero_shot",
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Add ``llm_self_consistency`` and ``llm_samples`` to HCC records (in place; also returned).

    The greedy answer is the record's ``llm_<view>``; skipped rows (no label) are left alone. Texts are
    cut to the length the pipeline sent the LLM.
    """
    rows = [i for i, rec in enumerate(records) if rec.get("label") is not None and f"llm_{view}" in rec]
    if not rows:
        return records
    texts = [str(records[i].get("text") or "")[:MAX_TEXT_CHARS] for i in rows]
    greedy = [records[i][f"llm_{view}"] for i in rows]
    hints = [records[i].get("encoder_label") or "none" for i in rows] if view == "hinted" else None
    shares, samples = self_consistency(llm, texts, greedy, k=k, temperature=temperature, view=view,
                                       hints=hints, progress=progress)
    for i, share, sampled in zip(rows, shares, samples, strict=True):
        records[i]["llm_self_consistency"] = share
        records[i]["llm_samples"] = sampled
    return records


# -- the feature matrix ------------------------------------------------------------------------------------


@dataclass
class Signals:
    """Per-item features of HCC records for the calibrator: ``values[i, j]`` is feature ``names[j]`` of
    record ``i``; every value is finite (a missing signal is imputed and, for the LLM ones, flagged)."""

    values: np.ndarray
    names: list[str]
    scored: np.ndarray  # (n,) bool: the record has a label to be right or wrong about (not skipped)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]


def feature_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The features these records support, in a fixed order (see :func:`signal_features`)."""
    scored = [r for r in records if isinstance(r, Mapping) and r.get("label") is not None]
    keys = set().union(*(r.keys() for r in scored)) if scored else set()
    views = [v for v in LLM_VIEWS if f"llm_{v}" in keys]
    names = [name for name, key in _ENCODER_SIGNALS if key in keys]
    names += ["backs_encoder"] if "encoder_label" in keys else []
    names += ["backs_encoder2"] if "encoder2_label" in keys else []
    names += [f"backs_{v}" for v in views]
    if views and "encoder_label" in keys:
        names += [f"agree_{p}" for p in _partitions(["encoder", *views])]
    for v in views:
        names += [f"llm_{v}_p_backing", f"llm_{v}_p_against", f"llm_{v}_p_missing"]
    if "llm_self_consistency" in keys:
        names += ["self_consistency", "samples_back_label", "self_consistency_missing"]
    if any(k.startswith("vote_round") and k.endswith("_share") for k in keys):
        names.append("vote_share")
    stages = sorted({str(r.get("stage")) for r in scored} - {"skipped", "None"}, key=_stage_order)
    names += [f"stage_{s}" for s in stages] if len(stages) > 1 else []
    names += ["agreement_score"] if "score" in keys else []
    return names


def signal_features(records: Sequence[Mapping[str, Any]], *, names: Sequence[str] | None = None) -> Signals:
    """Feature matrix of HCC records (the output rows of ``hcc annotate`` or ``HCCPipeline.annotate``).

    Features, each about the record's final ``label``:

    * ``prior_logit``: log-odds of ``prior_probability``, the run's prior mapping (``backend/confidence/prior.py``);
    * ``encoder_logit`` (log-odds of ``encoder_probability``, the softmax of the encoder's class scores),
      ``encoder_score``, ``encoder_margin``, ``anchor_similarity`` (cosine to the nearest human anchor
      of that label); ``encoder2_logit``, ``encoder2_anchor_similarity`` and ``backs_encoder2``: the same
      from the optional second encoder;
    * ``backs_encoder`` / ``backs_<view>``: that annotator gave the final label; ``agree_<pattern>``:
      one-hot of which of the encoder and LLM labels agree with each other (``encoder=zero_shot|hinted``:
      those two agree, the hinted view differs);
    * ``llm_<view>_p_backing`` / ``_p_against``: the LLM's token probability of its answer when that
      answer is / is not the final label, 0 otherwise, and ``llm_<view>_p_missing`` when the server gave
      no logprobs;
    * ``self_consistency`` (share of sampled answers equal to the greedy one), ``samples_back_label``
      (share equal to the final label) and ``self_consistency_missing``;
    * ``vote_share``: the winner's share in the last DCCA vote when it backs the final label;
    * ``stage_<stage>`` one-hots and ``agreement_score`` (the record's uncalibrated ``score``).

    ``names`` fixes the columns (those a calibrator was fitted on): a feature a record lacks is imputed
    with its neutral value, so records of an older or differently configured run can still be scored.
    Without ``names`` the columns are those the records support (:func:`feature_names`).
    """
    if isinstance(records, Mapping) or not isinstance(records, Sequence):
        raise ValueError("records must be a list of dicts (one per item)")
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} is a {type(rec).__name__}, not a dict")
    names = list(names) if names is not None else feature_names(records)
    values = np.zeros((len(records), len(names)), dtype=np.float64)
    for i, rec in enumerate(records):
        if rec.get("label") is None:
            continue
        row = _row_features(rec)
        values[i] = [row.get(name, _neutral(name)) for name in names]
    scored = np.array([rec.get("label") is not None for rec in records], dtype=bool)
    return Signals(values=values, names=names, scored=scored)


_LOGIT_SIGNALS = (
    ("prior_logit", "prior_probability"),
    ("encoder_logit", "encoder_probability"),
    ("encoder2_logit", "encoder2_probability"),
)
_ENCODER_SIGNALS = (
    *_LOGIT_SIGNALS,
    ("encoder_score", "encoder_score"),
    ("encoder_margin", "encoder_margin"),
    ("anchor_similarity", "anchor_similarity"),
    ("encoder2_anchor_similarity", "encoder2_anchor_similarity"),
)


def _neutral(name: str) -> float:
    # A missing LLM probability or self-consistency is flagged by its *_missing column.
    return 1.0 if name.endswith("_missing") else 0.0


def _number(rec: Mapping[str, Any], key: str) -> float | None:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if value is not None and key in rec:
            raise ValueError(f"field {key!r} must be a number or null, got {value!r}")
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return value


def _share(rec: Mapping[str, Any], key: str) -> float | None:
    value = _number(rec, key)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"field {key!r} must lie in [0, 1], got {value!r}")
    return value


def _row_features(rec: Mapping[str, Any]) -> dict[str, float]:
    label = rec.get("label")
    row: dict[str, float] = {}
    for name, key in _LOGIT_SIGNALS:
        prob = _share(rec, key)
        if prob is not None:
            row[name] = float(logit(prob))
    for name, key in _ENCODER_SIGNALS[len(_LOGIT_SIGNALS):]:
        value = _number(rec, key)
        if value is not None:
            row[name] = value
    packaged = PriorMapping.packaged_or_none(row) if "prior_logit" not in row else None
    if packaged is not None:  # a record of an older run: the packaged mapping of its encoder signals
        row["prior_logit"] = float(packaged.log_odds(row))
    own = _share(rec, "score") if rec.get("score_kind") == "probability" else None
    if own is not None:
        # The record's own P(right) (a pooled run's score: the encoder's temperature fitted on all the anchors,
        # and the LLM where it was asked) is the calibrator's base: it is what the user saw before the reviews,
        # and with few anchors the encoder-signal prior is the worse calibrated of the two (docs/calibration.md).
        row["prior_logit"] = float(logit(own))
    views = [v for v in LLM_VIEWS if f"llm_{v}" in rec]
    row["backs_encoder"] = float(rec.get("encoder_label") == label)
    if "encoder2_label" in rec:
        row["backs_encoder2"] = float(rec.get("encoder2_label") == label)
    for v in views:
        backs = rec.get(f"llm_{v}") == label
        row[f"backs_{v}"] = float(backs)
        p = _share(rec, f"llm_{v}_probability")
        p = p if rec.get(f"llm_{v}") is not None else None  # no valid answer: its probability is of nothing
        row[f"llm_{v}_p_missing"] = float(p is None)
        row[f"llm_{v}_p_backing"] = p if p is not None and backs else 0.0
        row[f"llm_{v}_p_against"] = p if p is not None and not backs else 0.0
    if views:
        labels = [rec.get("encoder_label"), *(rec.get(f"llm_{v}") for v in views)]
        row[f"agree_{_pattern(['encoder', *views], labels)}"] = 1.0
    if "llm_self_consistency" in rec:
        share = _share(rec, "llm_self_consistency")
        samples = rec.get("llm_samples") or []
        if not isinstance(samples, list):
            raise ValueError(f"field 'llm_samples' must be a list of labels, got {samples!r}")
        row["self_consistency_missing"] = float(share is None)
        row["self_consistency"] = share if share is not None else 0.0
        row["samples_back_label"] = sum(s == label for s in samples) / len(samples) if samples else 0.0
    row["vote_share"] = _last_vote_share(rec, label)
    row[f"stage_{rec.get('stage')}"] = 1.0
    score = _share(rec, "score")
    if score is not None:
        row["agreement_score"] = score
    return row


def _last_vote_share(rec: Mapping[str, Any], label: Any) -> float:
    rounds = sorted(int(k[len("vote_round"):]) for k in rec
                    if k.startswith("vote_round") and k[len("vote_round"):].isdigit())
    if not rounds or rec.get(f"vote_round{rounds[-1]}") != label:
        return 0.0
    return _share(rec, f"vote_round{rounds[-1]}_share") or 0.0


def _pattern(names: Sequence[str], labels: Sequence[Any]) -> str:
    """Which annotators agree: groups of equal labels joined by ``=``, groups by ``|`` (an invalid label
    (None) agrees with nobody)."""
    groups: list[list[int]] = []
    for i, label in enumerate(labels):
        home = next((g for g in groups if label is not None and labels[g[0]] == label), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return "|".join("=".join(names[i] for i in g) for g in groups)


def _partitions(names: Sequence[str]) -> list[str]:
    """Every agreement pattern of these annotators (set partitions, in the order :func:`_pattern` names
    them), so a pattern no training item showed still has a column."""
    def split(items: list[int]) -> list[list[list[int]]]:
        if not items:
            return [[]]
        first, rest = items[0], items[1:]
        out = []
        for part in split(rest):
            out.append([[first], *part])
            for j in range(len(part)):
                out.append([*part[:j], [first, *part[j]], *part[j + 1:]])
        return out

    seen = []
    for part in split(list(range(len(names)))):
        labels: list[Any] = [None] * len(names)
        for g, group in enumerate(part):
            for i in group:
                labels[i] = g
        pattern = _pattern(names, labels)
        if pattern not in seen:
            seen.append(pattern)
    return sorted(seen, key=lambda p: (p.count("|"), p))


def _stage_order(stage: str) -> tuple[int, str]:
    order = {"consistent": 0, "unresolved": 99, "encoder_only": 100}
    return order.get(stage, 1 if stage.startswith("round") else 50), stage
