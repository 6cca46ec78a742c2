"""Calibrated confidence: the probability that an item's label is right, learnt from reviewed items.

Every item a human labels after a prediction existed is a training pair (the item's signals, whether the
prediction matched the human). :class:`Calibrator` maps signals (``backend/confidence/signals.py``) to P(right):

* ``prior``: a fixed mapping of the encoder's signals to log-odds, ``z0 = a + b * logit(encoder
  probability) + c * anchor similarity`` (coefficients fitted once on Banking77 *train* items, see
  :data:`backend.confidence.prior.PRIOR`), with its level shifted towards the reviews:
  ``P = sigmoid(z0 + s)``, ``s`` the MAP
  estimate under a N(0, 1) prior, so 0 reviews leave the prior unchanged and a few only move it a little;
* ``platt``: Platt scaling of the prior's log-odds, ``P = sigmoid(a z0 + b)``, fitted on Platt's smoothed
  targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2) (Platt, "Probabilistic Outputs for Support Vector
  Machines", 1999);
* ``isotonic``: isotonic regression of correctness on ``z0`` (Zadrozny & Elkan, "Transforming Classifier
  Scores into Accurate Multiclass Probability Estimates", KDD 2002);
* ``logistic``: logistic regression on every signal, ``P = sigmoid(a z0 + b + w . x)`` with the
  standardised signals ``x`` under an L2 penalty ``|w|^2 / (2C)``: it starts from Platt-on-the-prior and
  lets the reviews say how much each other signal (LLM agreement, logprobs, self-consistency, stage, ...)
  moves it.

The method is chosen by stratified k-fold cross-validated log loss on the pairs alone. With fewer than
``min_pairs`` pairs, or fewer than ``min_per_class`` right or wrong ones (including a single class), the
calibrator falls back to ``prior`` and says so in ``message_``.

Metrics: expected calibration error over equal-width bins (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017), the Brier score, the AUROC of detecting wrong labels from 1 - P, and the effort
curve (dataset accuracy after a human corrects the lowest-scored share of items).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

from backend.confidence.prior import PriorMapping
from backend.confidence.probability import item_log_loss
from backend.confidence.signals import Signals, logit, signal_features

METHODS = ("prior", "platt", "isotonic", "logistic")

_EPS = 1e-4  # probabilities stay inside [_EPS, 1 - _EPS]: a finite log loss, no 0 or 1 from few pairs
_FIT_TOL = 1e-4  # a near-zero penalty on the Platt slope and intercept keeps single-class fits finite


def prior_log_odds(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The calibrator's base log-odds of each row (feature ``prior_logit``).

    A pooled run's record gives its own P(right), its ``score`` (``score_kind: probability``); other records
    their ``prior_probability``: the mapping of the run's anchors (``backend/confidence/prior.py``). Records
    of an older run fall back to the packaged :data:`backend.confidence.prior.PRIOR` on their encoder
    signals; without the encoder's probability the uncalibrated ``agreement_score`` is read as a
    probability; without that either, every item gets even odds.
    """
    values = np.asarray(values, dtype=np.float64)
    if "prior_logit" in names:
        return values[:, list(names).index("prior_logit")].copy()
    packaged = PriorMapping.packaged_or_none(names)
    if packaged is not None:
        return packaged.log_odds({name: values[:, j] for j, name in enumerate(names)}) + np.zeros(len(values))
    if "agreement_score" in names:
        return logit(np.clip(values[:, list(names).index("agreement_score")], 0.05, 0.95))
    return np.zeros(len(values))


class Calibrator:
    """Map item signals to P(label is right); fitted on (signals, right?) pairs from reviewed items.

    Parameters are keyword-only: ``methods`` (candidates, a subset of :data:`METHODS`), ``min_pairs``
    and ``min_per_class`` (below either, the ``prior`` fallback), ``folds`` (cross-validation folds used
    to choose the method), ``C`` (inverse L2 strength of the logistic model; several values compete
    as separate candidates), ``shift_scale`` (standard deviation of the prior on the fallback's shift).

    Learned attributes: ``method_`` (the chosen method), ``params_`` (its parameters, plain floats),
    ``cv_log_loss_`` (candidate -> cross-validated log loss; empty in fallback), ``fallback_``,
    ``message_`` (what was done and why, for the user), ``notes_`` (e.g. no LLM logprobs),
    ``n_pairs_``, ``n_right_``, ``feature_names_``, ``oof_`` (out-of-fold P(right) of the pairs under
    the chosen method, or None in fallback: an honest view of the fit for reports and plots).
    """

    def __init__(
        self,
        *,
        methods: Sequence[str] = METHODS,
        min_pairs: int = 20,
        min_per_class: int = 3,
        folds: int = 5,
        C: float | Sequence[float] = (0.1, 1.0),  # noqa: N803 - the name scikit-learn uses
        shift_scale: float = 0.35,
        random_state: int = 0,
        selection: str = "one_se",
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {list(methods)}")
        if min_pairs < 2 or min_per_class < 1 or folds < 2:
            raise ValueError("min_pairs must be >= 2, min_per_class >= 1 and folds >= 2")
        cs = [C] if isinstance(C, (int, float)) else list(C)
        if not cs or not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for c in cs):
            raise ValueError(f"C must be a positive number or a list of them, got {C!r}")
        if not (math.isfinite(shift_scale) and shift_scale > 0):
            raise ValueError(f"shift_scale must be a positive number, got {shift_scale!r}")
        self.methods = tuple(methods)
        self.min_pairs = min_pairs
        self.min_per_class = min_per_class
        self.folds = folds
        self.C = tuple(float(c) for c in cs)
        self.shift_scale = float(shift_scale)
        self.random_state = random_state
        if selection not in ("one_se", "min"):
            raise ValueError(f"selection must be 'one_se' or 'min', got {selection!r}")
        self.selection = selection

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, correct: Sequence[bool] | np.ndarray, *, feature_names: Sequence[str]
            ) -> Calibrator:
        """Fit on ``X`` (n_pairs, n_features), whose columns are ``feature_names``, and ``correct``."""
        X = _check_matrix(X, feature_names)
        y = _check_correct(correct, len(X))
        self.feature_names_ = list(feature_names)
        self.n_pairs_, self.n_right_ = len(y), int(y.sum())
        self.notes_ = _notes(X, self.feature_names_)
        z0 = prior_log_odds(X, self.feature_names_)
        n_wrong = self.n_pairs_ - self.n_right_
        self.cv_log_loss_: dict[str, float] = {}
        self.oof_: np.ndarray | None = None
        reason = self._fallback_reason(n_wrong)
        if reason is None:
            self.oof_ = self._choose(X, y, z0)
            self.fallback_ = False
            how = ("the simplest within one standard error of the lowest cross-validated log loss"
                   if self.selection == "one_se" else "the lowest cross-validated log loss")
            self.message_ = (f"calibrated on {self.n_pairs_} reviewed items ({self.n_right_} right): "
                             f"{self.method_}, {how}")
        else:
            self.method_ = "prior"
            self.fallback_ = True
            self.message_ = reason
        self.params_ = self._fit_method(self.method_, X, y, z0)
        return self

    def _fallback_reason(self, n_wrong: int) -> str | None:
        n, right = self.n_pairs_, self.n_right_
        tail = "confidence is the prior mapping (a pooled run's own probability, docs/calibration.md)"
        if n == 0:
            return f"no reviewed items yet: {tail}, not calibrated on this data"
        if n < self.min_pairs:
            return (f"{n} reviewed items ({right} right), fewer than {self.min_pairs}: {tail}, its level "
                    "shifted towards the reviews")
        if right == 0 or n_wrong == 0:
            which = "right" if n_wrong == 0 else "wrong"
            return (f"all {n} reviewed labels were {which}: nothing to tell right from wrong yet; {tail}, its "
                    "level shifted towards the reviews")
        if min(right, n_wrong) < self.min_per_class:
            few = "wrong" if n_wrong < right else "right"
            return (f"only {min(right, n_wrong)} of {n} reviewed labels were {few} (need "
                    f"{self.min_per_class}): {tail}, its level shifted towards the reviews")
        if self.methods == ("prior",):
            return f"only the prior method was allowed: {tail}, its level shifted towards the reviews"
        return None

    def _candidates(self) -> list[str]:
        out: list[str] = []
        for method in self.methods:
            out += [f"logistic(C={c:g})" for c in self.C] if method == "logistic" else [method]
        return out

    def _choose(self, X: np.ndarray, y: np.ndarray, z0: np.ndarray) -> np.ndarray:
        n_splits = min(self.folds, int(y.sum()), int((~y).sum()))
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        splits = list(splitter.split(X, y))
        oof: dict[str, np.ndarray] = {}
        for candidate in self._candidates():
            pred = np.empty(len(y))
            for train, test in splits:
                params = self._fit_method(candidate, X[train], y[train], z0[train])
                pred[test] = _predict(params, X[test], z0[test], self.feature_names_)
            oof[candidate] = pred
            self.cv_log_loss_[candidate] = round(log_loss(pred, y), 6)
        order = self._candidates()
        best = min(order, key=lambda c: self.cv_log_loss_[c])
        if self.selection == "one_se":
            # The simplest candidate within one standard error of the best (Hastie et al., ESL 7.10): with
            # tens of pairs the CV losses of the candidates differ by less than their noise.
            losses = item_log_loss(oof[best], y)
            limit = self.cv_log_loss_[best] + losses.std(ddof=1) / np.sqrt(len(y))
            best = next(c for c in order if self.cv_log_loss_[c] <= limit)
        self.method_ = best
        return oof[self.method_]

    def _fit_method(self, method: str, X: np.ndarray, y: np.ndarray, z0: np.ndarray) -> dict[str, Any]:
        if method == "prior":
            (shift,) = _fit_logistic(np.ones((len(y), 1)), y, offset=z0, penalty=[1 / self.shift_scale**2])
            return {"method": "prior", "shift": shift}
        if method == "platt":
            slope, intercept = _fit_logistic(np.column_stack([z0, np.ones(len(y))]), _platt_targets(y),
                                             penalty=[_FIT_TOL, _FIT_TOL])
            return {"method": "platt", "slope": slope, "intercept": intercept}
        if method == "isotonic":
            return _fit_isotonic(z0, y)
        c = float(method[len("logistic(C="):-1])
        # A constant column (e.g. no logprobs) says nothing; the prior's own log-odds is z0 already.
        keep = np.flatnonzero((X.std(axis=0) > 1e-9) & (np.array(self.feature_names_) != "prior_logit"))
        mean, scale = X[:, keep].mean(axis=0), X[:, keep].std(axis=0)
        design = np.column_stack([z0, np.ones(len(y)), (X[:, keep] - mean) / scale])
        coef = _fit_logistic(design, y, penalty=[_FIT_TOL, _FIT_TOL] + [1 / c] * len(keep))
        return {"method": "logistic", "C": c, "slope": coef[0], "intercept": coef[1],
                "features": [self.feature_names_[j] for j in keep], "mean": mean.tolist(),
                "scale": scale.tolist(), "weights": coef[2:]}

    # -- prediction --------------------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(label is right) per row of ``X`` (columns ``feature_names_``): a 1-D array in (0, 1)."""
        self._check_fitted()
        X = _check_matrix(X, self.feature_names_)
        return _predict(self.params_, X, prior_log_odds(X, self.feature_names_), self.feature_names_)

    def fit_records(self, records: Sequence[Mapping[str, Any]], human_labels: Sequence[str | None]
                    ) -> Calibrator:
        """Fit on HCC records and the human label of each (None: not reviewed). A pair is a record with
        a predicted label and a human label; it is right when the two are equal."""
        rows, correct = reviewed_pairs(records, human_labels)
        signals = signal_features(records)
        return self.fit(signals.values[rows], correct, feature_names=signals.names)

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """P(label is right) of each record; 0.0 for a record without a label (skipped)."""
        self._check_fitted()
        signals: Signals = signal_features(records, names=self.feature_names_)
        out = np.zeros(len(records))
        if signals.scored.any():
            out[signals.scored] = self.predict_proba(signals.values[signals.scored])
        return out

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable state: options and what was learnt."""
        self._check_fitted()
        return {
            "options": {"methods": list(self.methods), "min_pairs": self.min_pairs,
                        "min_per_class": self.min_per_class, "folds": self.folds, "C": list(self.C),
                        "shift_scale": self.shift_scale, "random_state": self.random_state,
                        "selection": self.selection},
            "method": self.method_, "params": self.params_, "feature_names": self.feature_names_,
            "cv_log_loss": self.cv_log_loss_, "fallback": self.fallback_, "message": self.message_,
            "notes": self.notes_, "n_pairs": self.n_pairs_, "n_right": self.n_right_,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Calibrator:
        try:
            cal = cls(**state["options"])
            cal.method_, cal.params_ = state["method"], dict(state["params"])
            cal.feature_names_ = list(state["feature_names"])
            cal.cv_log_loss_, cal.fallback_ = dict(state["cv_log_loss"]), bool(state["fallback"])
            cal.message_, cal.notes_ = str(state["message"]), list(state["notes"])
            cal.n_pairs_, cal.n_right_ = int(state["n_pairs"]), int(state["n_right"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a saved Calibrator state: missing or bad field {exc}") from exc
        cal.oof_ = None
        return cal

    def _check_fitted(self) -> None:
        if not hasattr(self, "params_"):
            raise ValueError("this Calibrator is not fitted yet: call fit() or fit_records() first")


def fit_calibrator(records: Sequence[Mapping[str, Any]], human_labels: Sequence[str | None], **options: Any
                   ) -> Calibrator:
    """``Calibrator(**options).fit_records(records, human_labels)``: the one call a caller needs."""
    return Calibrator(**options).fit_records(records, human_labels)


def reviewed_pairs(records: Sequence[Mapping[str, Any]], human_labels: Sequence[str | None]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the records that have both a predicted and a human label, and whether they match."""
    if len(records) != len(human_labels):
        raise ValueError(f"{len(records)} records but {len(human_labels)} human labels: they must align")
    rows, correct = [], []
    for i, (rec, human) in enumerate(zip(records, human_labels, strict=True)):
        if human is not None and not isinstance(human, str):
            raise ValueError(f"human label of row {i} must be a string or None, got {human!r}")
        if not human or not human.strip() or not isinstance(rec, Mapping) or rec.get("label") is None:
            continue  # not reviewed (a blank label too), or no prediction to be right or wrong about
        rows.append(i)
        correct.append(rec["label"] == human.strip())
    return np.asarray(rows, dtype=np.int64), np.asarray(correct, dtype=bool)


# -- model fitting helpers ---------------------------------------------------------------------------------


def _fit_logistic(design: np.ndarray, target: np.ndarray, *, penalty: Sequence[float],
                  offset: np.ndarray | None = None) -> list[float]:
    """Coefficients minimising the summed cross-entropy of sigmoid(offset + design @ beta) against
    ``target`` (0/1 or soft) plus sum(penalty * beta^2) / 2."""
    design = np.asarray(design, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    base = np.zeros(len(target)) if offset is None else np.asarray(offset, dtype=np.float64)
    pen = np.asarray(penalty, dtype=np.float64)

    def loss(beta: np.ndarray) -> tuple[float, np.ndarray]:
        z = base + design @ beta
        # log(1 + e^z) - t z, written stably for large |z|
        value = np.sum(np.logaddexp(0.0, z) - target * z) + 0.5 * np.sum(pen * beta**2)
        grad = design.T @ (expit(z) - target) + pen * beta
        return float(value), grad

    start = np.zeros(design.shape[1])
    if offset is None and design.shape[1] >= 2:
        start[0] = 1.0  # Platt / logistic: the slope on the prior's log-odds starts at "trust the prior"
    result = minimize(loss, start, jac=True, method="L-BFGS-B")
    return [float(b) for b in result.x]


def _platt_targets(y: np.ndarray) -> np.ndarray:
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def _fit_isotonic(z0: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    # Smoothed bounds: a block of 8 right answers is not proof that the next one is certain.
    eps = max(_EPS, 1 / (len(y) + 2))
    iso = IsotonicRegression(y_min=eps, y_max=1 - eps, out_of_bounds="clip").fit(z0, y.astype(float))
    return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}


def _predict(params: Mapping[str, Any], X: np.ndarray, z0: np.ndarray, names: Sequence[str]) -> np.ndarray:
    method = params["method"]
    if method == "prior":
        p = expit(z0 + params["shift"])
    elif method == "platt":
        p = expit(params["slope"] * z0 + params["intercept"])
    elif method == "isotonic":
        p = np.interp(z0, params["x"], params["y"]) if len(params["x"]) else np.full(len(z0), 0.5)
    else:
        p = expit(params["slope"] * z0 + params["intercept"] + _logistic_signals(params, X, names))
    return np.clip(p, _EPS, 1 - _EPS)


def _logistic_signals(params: Mapping[str, Any], X: np.ndarray, names: Sequence[str]) -> np.ndarray:
    if not params["features"]:
        return np.zeros(len(X))
    cols = [list(names).index(f) for f in params["features"]]
    scaled = (X[:, cols] - np.asarray(params["mean"])) / np.asarray(params["scale"])
    return scaled @ np.asarray(params["weights"])


def _notes(X: np.ndarray, names: Sequence[str]) -> list[str]:
    notes = []
    missing = [n for n in names if n.endswith("_p_missing")]
    if missing and all(np.all(X[:, names.index(n)] == 1) for n in missing) and len(X):
        notes.append("no LLM token probabilities in these records (the server returned no logprobs, or "
                     "--no-logprobs): calibrated on the other signals")
    return notes


# -- input checks ------------------------------------------------------------------------------------------


def _check_matrix(X: Any, names: Sequence[str]) -> np.ndarray:
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"features must be a numeric array: {exc}") from exc
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"features must be (n_items, {len(names)}) for the {len(names)} feature names, "
                         f"got shape {X.shape}")
    bad = ~np.isfinite(X)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"feature {names[col]!r} of row {row} is not a finite number ({X[row, col]})")
    return X


def _check_correct(correct: Any, n: int) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"correct must be one value per row ({n}), got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.all(np.isin(arr, [0, 1])):
            raise ValueError("correct must hold booleans (or 0/1): whether each predicted label was right")
        arr = arr.astype(bool)
    return arr


def _check_probabilities(probabilities: Any, correct: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"probabilities must be a 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must be finite numbers in [0, 1]")
    y = _check_correct(correct, len(p)) if correct is not None else None
    return p, y


# -- metrics -----------------------------------------------------------------------------------------------


def log_loss(probabilities: Any, correct: Any) -> float:
    """Mean negative log-likelihood of ``correct`` under ``probabilities`` (clipped to [1e-6, 1 - 1e-6])."""
    p, y = _check_probabilities(probabilities, correct)
    if len(p) == 0:
        raise ValueError("log loss of no items")
    return float(item_log_loss(p, y).mean())


def expected_calibration_error(probabilities: Any, correct: Any, *, n_bins: int = 10) -> float:
    """ECE = sum over equal-width bins of (share of items in the bin) * |accuracy - mean probability|.

    Bins are [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0] for ``n_bins=10`` (Guo et al., ICML 2017).
    """
    p, y = _check_probabilities(probabilities, correct)
    if len(p) == 0:
        raise ValueError("ECE of no items")
    table = reliability_table(p, y, n_bins=n_bins)
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in table) / len(p))


def reliability_table(probabilities: Any, correct: Any, *, n_bins: int = 10) -> list[dict[str, Any]]:
    """Per non-empty equal-width bin: its range, item count, mean probability and accuracy."""
    p, y = _check_probabilities(probabilities, correct)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            out.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": int(mask.sum()),
                        "confidence": float(p[mask].mean()), "accuracy": float(y[mask].mean())})
    return out


def brier_score(probabilities: Any, correct: Any) -> float:
    """Mean squared difference between P(right) and the 0/1 outcome (Brier, 1950)."""
    p, y = _check_probabilities(probabilities, correct)
    if len(p) == 0:
        raise ValueError("Brier score of no items")
    return float(np.mean((p - y) ** 2))


def error_detection_auroc(scores: Any, correct: Any) -> float | None:
    """AUROC of finding the wrong labels by ranking items from the lowest score up (ties count half).

    1.0: every wrong label scores below every right one; 0.5: no better than chance. None when all labels
    are right or all wrong (the AUROC is undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = _check_correct(correct, len(s))
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a 1-D array of finite numbers")
    n_right, n_wrong = int(y.sum()), int((~y).sum())
    if n_right == 0 or n_wrong == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks: ties count half
    # Mann-Whitney U of the right labels' scores over the wrong ones' = P(right scores above wrong).
    u = ranks[y].sum() - n_right * (n_right + 1) / 2
    return float(u / (n_right * n_wrong))


def review_order(scores: Any, *, random_state: int | None = 0) -> np.ndarray:
    """Item indices, lowest score first: the order a reviewer should see them. Ties are broken at random
    (seeded) so that input order cannot make one tied item look better than another."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a 1-D array of finite numbers")
    tie = np.random.default_rng(random_state).random(len(s))
    return np.lexsort((tie, s))


def effort_curve(scores: Any, correct: Any, *, fractions: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
                 random_state: int | None = 0) -> dict[float, float]:
    """Dataset accuracy after a human reviews (and corrects) the ``x`` share of items with the lowest
    scores, for each ``x`` in ``fractions``: round(x * n) items are reviewed."""
    y = _check_correct(correct, len(np.asarray(scores)))
    if len(y) == 0:
        raise ValueError("effort curve of no items")
    order = review_order(scores, random_state=random_state)
    out = {}
    for x in fractions:
        if not 0 <= x <= 1:
            raise ValueError(f"review fractions must lie in [0, 1], got {x}")
        fixed = y.copy()
        fixed[order[: int(round(x * len(y)))]] = True
        out[float(x)] = float(fixed.mean())
    return out


def random_review_accuracy(correct: Any, *, fractions: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3)
                           ) -> dict[float, float]:
    """Expected dataset accuracy after reviewing a random ``x`` share: acc + x (1 - acc)."""
    y = _check_correct(correct, len(np.asarray(correct)))
    acc = float(y.mean()) if len(y) else 0.0
    return {float(x): acc + x * (1 - acc) for x in fractions}


def selective_accuracy(scores: Any, correct: Any, *, coverage: float, random_state: int | None = 0) -> float:
    """Accuracy of the ``coverage`` share of items with the highest scores."""
    y = _check_correct(correct, len(np.asarray(scores)))
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    order = review_order(scores, random_state=random_state)[::-1]
    top = order[: max(1, int(round(coverage * len(y))))]
    return float(y[top].mean())


# -- the review threshold ----------------------------------------------------------------------------------


def threshold_for_precision(probabilities: Any, target_precision: float) -> float:
    """The lowest threshold t such that the items with P(right) >= t have expected precision (mean
    P(right)) >= ``target_precision``: flag ``P < t`` for review, accept the rest.

    With calibrated probabilities the expected share of right labels among the accepted items is their
    mean probability, so this accepts as many items as the target allows; tied items are accepted or
    flagged together. Returns 1.0 (flag everything below certainty) when no set of items reaches the
    target or there are no items, and the lowest probability when every item may be accepted.
    """
    if isinstance(target_precision, bool) or not isinstance(target_precision, (int, float)) or not (
        0 < target_precision <= 1
    ):
        raise ValueError(f"target_precision must be a number in (0, 1], got {target_precision!r}")
    p, _ = _check_probabilities(probabilities)
    if len(p) == 0:
        return 1.0
    desc = np.sort(p)[::-1]
    # The mean of a descending prefix only falls as it grows, so the accepted set is the longest prefix
    # meeting the target; it may only end where the next item scores strictly lower (ties go together).
    running = np.cumsum(desc) / np.arange(1, len(desc) + 1)
    ends = np.flatnonzero(np.append(desc[1:] < desc[:-1], True))
    ok = ends[running[ends] >= target_precision - 1e-12]
    return float(desc[ok[-1]]) if len(ok) else 1.0


def plot_reliability(probabilities: Any, correct: Any, path: str | Path, *, n_bins: int = 10,
                     title: str | None = None) -> Path:
    """Save a reliability diagram (accuracy against mean P(right) per bin, with the item share per bin)
    as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, y = _check_probabilities(probabilities, correct)
    if len(p) == 0:
        raise ValueError("a reliability diagram needs at least one labelled item")
    table = reliability_table(p, y, n_bins=n_bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    width = 1 / n_bins
    top.bar([b["low"] for b in table], [b["accuracy"] for b in table], width=width, align="edge",
            edgecolor="black", color="#4c72b0", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], "o", color="#dd8452",
             label="mean P(right) per bin")
    ece = expected_calibration_error(p, y, n_bins=n_bins)
    top.set_title(title or f"Reliability, {len(p)} items, ECE {ece:.3f}", fontsize=9)
    top.set_ylabel("share of labels right")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([b["low"] for b in table], [b["n"] / len(p) for b in table], width=width, align="edge",
               edgecolor="black", color="#999999")
    bottom.set_xlabel("calibrated P(label is right)")
    bottom.set_ylabel("share of items")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
