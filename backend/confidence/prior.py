"""The prior mapping: P(label is right) from the encoder's signals alone, before any review.

The packaged mapping (:data:`PRIOR`) was fitted once on Banking77 with MiniLM. On another data set, encoder
or classifier its level and slope can be far off (on the RTE entailment items of Snow et al. 2008, where
the encoder is right 53% of the time, its calibration error is 0.25 before any review). The anchors are
human labels the run already has, so each anchor can be classified by the *other* anchors (``folds``-fold
cross-fitting, every anchor held out once), which gives (encoder signals, right?) pairs on the team's own
data at no cost. :func:`fit_prior` Platt-scales the packaged log-odds on those pairs, ``z = a z_packaged +
b`` (Platt, "Probabilistic Outputs for Support Vector Machines", 1999), and adopts the rescaled mapping
only when it beats the packaged one by more than one standard error of the paired out-of-fold log-loss
difference: where the packaged mapping already fits (Banking77), it is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from backend.confidence.probability import item_log_loss, logit

#: The packaged mapping: log-odds = intercept + sum(weight * feature). Fitted by logistic regression of the
#: encoder's correctness on 2,000 Banking77 train items that are not anchors (seeded, 500 anchors, MiniLM,
#: centroid classifier; the first variant with all-mpnet-base-v2 as the second encoder); no test item was
#: used (bench/calibration.py --design). The first variant whose features are all present is used.
PRIOR: tuple[tuple[float, dict[str, float]], ...] = (
    (-2.606, {"encoder_logit": 0.234, "anchor_similarity": 1.991, "encoder2_logit": 0.517,
              "encoder2_anchor_similarity": 2.065}),
    (-3.32, {"encoder_logit": 0.678, "anchor_similarity": 4.88}),
    (0.01, {"encoder_logit": 0.875}),
)
_PLATT_C = 1e4  # Platt's two parameters are (almost) unpenalised
_ELICIT_C = 1e4  # the label-free estimator too: hundreds of items and two to four features need no penalty


def prior_features(encoder_probability: Any, anchor_similarity: Any, encoder2_probability: Any = None,
                   encoder2_anchor_similarity: Any = None) -> dict[str, np.ndarray]:
    """The prior's features from raw signals: log-odds of the probabilities, similarities with a missing
    value (NaN or -inf) as 0, as the calibrator's features impute it. The second encoder's are optional."""
    out = {"encoder_logit": logit(encoder_probability), "anchor_similarity": _similarity(anchor_similarity)}
    if encoder2_probability is not None:
        out["encoder2_logit"] = logit(encoder2_probability)
        out["encoder2_anchor_similarity"] = _similarity(encoder2_anchor_similarity)
    return out


@dataclass
class PriorMapping:
    """``log-odds = intercept + sum(weights[f] * features[f])``; ``adapted``: rescaled on the anchors (else a
    packaged variant of :data:`PRIOR`). ``message`` says which and why."""

    intercept: float = PRIOR[1][0]
    weights: dict[str, float] = field(default_factory=lambda: dict(PRIOR[1][1]))
    adapted: bool = False
    message: str = "packaged prior mapping"
    pairs: int = 0
    right: int = 0

    @classmethod
    def packaged(cls, features: Any, **fields: Any) -> PriorMapping:
        """The first packaged variant whose features are all among ``features`` (names)."""
        mapping = cls.packaged_or_none(features, **fields)
        if mapping is None:
            raise ValueError(f"no packaged prior mapping uses only {sorted(features)}")
        return mapping

    @classmethod
    def packaged_or_none(cls, features: Any, **fields: Any) -> PriorMapping | None:
        """As :meth:`packaged`, or None when no variant fits the features (records of a much older run)."""
        for intercept, weights in PRIOR:
            if all(name in features for name in weights):
                return cls(intercept=intercept, weights=dict(weights), **fields)
        return None

    def log_odds(self, features: Mapping[str, Any]) -> np.ndarray:
        """Log-odds of each item from :func:`prior_features`."""
        missing = [name for name in self.weights if name not in features]
        if missing:
            raise ValueError(f"the prior mapping needs the features {missing}")
        return self.intercept + sum(w * np.asarray(features[name], dtype=np.float64)
                                    for name, w in self.weights.items())

    def probability(self, features: Mapping[str, Any]) -> np.ndarray:
        return expit(self.log_odds(features))

    def as_dict(self) -> dict[str, Any]:
        return {"intercept": round(self.intercept, 4), "weights": {k: round(v, 4) for k, v in self.weights.items()},
                "adapted": self.adapted, "message": self.message, "pairs": self.pairs, "right": self.right}


def fit_prior(features: Mapping[str, Any], right: Any, *, folds: int = 5, min_pairs: int = 20,
              min_per_class: int = 5, random_state: int = 0, base: PriorMapping | None = None) -> PriorMapping:
    """The prior mapping for a run, from cross-fitted anchor predictions (see the module docstring).

    ``features`` (:func:`prior_features`) are those of each anchor's held-out prediction and ``right``
    whether it matched the anchor's label. With fewer than ``min_pairs`` pairs or fewer than
    ``min_per_class`` right or wrong ones, the packaged mapping is kept (and the message says why).
    ``base`` replaces the packaged mapping as the one rescaled or kept (the label-free estimator of
    :func:`fit_elicited`).
    """
    packaged = PriorMapping.packaged(features) if base is None else _copy(base)
    what = "packaged prior mapping" if base is None else "label-free prior mapping"
    y = np.asarray(right, dtype=bool)
    n, n_right = len(y), int(y.sum())
    packaged.pairs, packaged.right = n, n_right
    if n < min_pairs or min(n_right, n - n_right) < min_per_class:
        packaged.message = (f"{what}: {n} cross-checked anchors ({n_right} right) are too few "
                            f"to rescale it (need {min_pairs}, with {min_per_class} right and {min_per_class} wrong)")
        return packaged
    z = packaged.log_odds(features)
    splits = StratifiedKFold(n_splits=min(folds, n_right, n - n_right), shuffle=True, random_state=random_state)
    rescaled = np.empty(n)
    for train, test in splits.split(z.reshape(-1, 1), y):
        rescaled[test] = _platt(z[train], y[train]).predict_proba(z[test].reshape(-1, 1))[:, 1]
    gain = item_log_loss(expit(z), y) - item_log_loss(rescaled, y)  # > 0 where the rescaled mapping does better
    standard_error = gain.std(ddof=1) / math.sqrt(n)
    if gain.mean() <= standard_error:
        packaged.message = (f"{what}: rescaling it on {n} cross-checked anchors ({n_right} right) "
                            f"gained {gain.mean():.4f} nats per item, within one standard error ({standard_error:.4f})")
        return packaged
    model = _platt(z, y)
    slope, shift = float(model.coef_[0][0]), float(model.intercept_[0])
    return PriorMapping(
        intercept=slope * packaged.intercept + shift,
        weights={name: slope * w for name, w in packaged.weights.items()},
        adapted=True, pairs=n, right=n_right,
        message=(f"{what} rescaled on {n} cross-checked anchors ({n_right} right): log-odds x {slope:.3f} "
                 f"{shift:+.3f}, {gain.mean():.4f} nats per item better out of fold than before"),
    )


def fit_elicited(features: Mapping[str, Any], consistency: Any, *, min_items: int = 50) -> PriorMapping | None:
    """The label-free stage (EliCal: elicit confidence without labels, then calibrate it on a few labels).

    ``consistency`` is, per unlabelled item, the share of resampled classifiers (e.g. half the anchors,
    drawn anew each time) that give the item the label the full classifier gives: a self-consistency signal
    that needs no label. A logistic regression of it on the prior's one-pass ``features`` (soft targets:
    each item counts ``consistency`` times as a 1 and ``1 - consistency`` times as a 0) is a cheap estimator
    of it on this project's own items. Its log-odds then stand in for the packaged mapping as the ``base``
    of :func:`fit_prior`, which rescales them on the anchors' cross-check. None with fewer than
    ``min_items`` items or a constant target (nothing to learn from).
    """
    target = np.clip(np.asarray(consistency, dtype=np.float64), 0.0, 1.0)
    names = sorted(features)
    x = np.column_stack([np.asarray(features[name], dtype=np.float64) for name in names]) if names else None
    if x is None or len(target) < min_items or np.ptp(target) == 0.0:
        return None
    model = LogisticRegression(C=_ELICIT_C).fit(np.vstack([x, x]), np.r_[np.ones(len(x)), np.zeros(len(x))],
                                                sample_weight=np.r_[target, 1.0 - target] + 1e-9)
    return PriorMapping(intercept=float(model.intercept_[0]),
                        weights={name: float(w) for name, w in zip(names, model.coef_[0], strict=True)},
                        message=f"label-free estimator of the resampled-anchor consistency of {len(x)} items")


def _copy(mapping: PriorMapping) -> PriorMapping:
    return PriorMapping(intercept=mapping.intercept, weights=dict(mapping.weights), message=mapping.message)


def _similarity(value: Any) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    return np.where(np.isfinite(value), value, 0.0)


def _platt(z: np.ndarray, y: np.ndarray) -> LogisticRegression:
    return LogisticRegression(C=_PLATT_C).fit(z.reshape(-1, 1), y)


