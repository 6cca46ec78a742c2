"""Combining the views by what the anchors prove: a log-linear opinion pool fitted on labelled items.

Each view ``v`` gives every candidate label ``c`` of an item a probability ``p_v(c)``; the pool is

    P(y = c | x) = exp(sum_v w_v log p_v(c | x)) / sum_{c' in C(x)} exp(sum_v w_v log p_v(c' | x))

over the item's candidate set ``C(x)``: the logarithmic opinion pool (Genest and Zidek, "Combining
Probability Distributions: A Critique and an Annotated Bibliography", Statistical Science 1986), whose
weights are fitted here by conditional maximum likelihood on items whose label a human gave (a conditional
logit, McFadden 1974). A weight is the evidence that a view is worth listening to on *this* data: a view
whose answers do not predict the human labels gets a weight near 0 and stops moving labels; a view that is
more often right than the encoder outweighs it. Weights are kept >= 0 (a view is never trusted in reverse)
and shrunk toward ``prior_weights`` by an L2 penalty, so a handful of anchors cannot swing them far.

Why written here rather than taken from scikit-learn: its multinomial logistic regression learns one weight
vector per class; the pool needs weights shared by all classes over a candidate set that differs per item,
which is a few lines of scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

#: Probability a view is taken to give a candidate it did not score (an LLM that never saw it, a
#: probability of 0): log(0) would let one view veto a label outright.
FLOOR = 1e-3


def floored_log(probabilities: np.ndarray, *, floor: float = FLOOR) -> np.ndarray:
    """``log`` of probabilities over each row's candidates, NaN (not scored) and tiny values lifted to
    ``floor``, renormalised so each row sums to one again."""
    p = np.asarray(probabilities, dtype=np.float64)
    p = np.where(np.isfinite(p), np.maximum(p, floor), floor)
    return np.log(p / p.sum(axis=-1, keepdims=True))


@dataclass
class PoolFit:
    """What :func:`compare_pools` found: whether the extra views earned a place, and why."""

    adopted: bool
    weights: np.ndarray  # of the pool that will be used
    gain: float  # mean out-of-fold log-likelihood gain per item of the full pool over the base one
    standard_error: float
    items: int
    message: str


class LogLinearPool:
    """The logarithmic opinion pool of the module docstring, with weights fitted by penalised conditional
    maximum likelihood.

    ``features`` passed to :meth:`fit` and :meth:`predict_proba` are ``(n, K, V)`` arrays: per item, per
    candidate slot, each view's log-probability of that candidate (use :func:`floored_log`); slots that hold
    no candidate are ``-inf`` in every view. ``target`` is the slot of the true label, ``-1`` when the true
    label is not among the candidates (such items say nothing about the weights and are left out).

    Parameters
    ----------
    prior_weights : the weights the penalty shrinks toward (default: 1 for the first view, 0 for the rest:
        trust the encoder, make every other view prove itself).
    l2 : strength of that penalty, in units of one item's log-likelihood.

    Attributes
    ----------
    weights_ : (V,) fitted weights, all >= 0.
    n_items_ : number of items the fit used.
    """

    def __init__(self, *, prior_weights: np.ndarray | None = None, l2: float = 1.0) -> None:
        self.prior_weights = prior_weights
        self.l2 = l2

    def _prior(self, n_views: int) -> np.ndarray:
        if self.prior_weights is not None:
            return np.asarray(self.prior_weights, dtype=np.float64)
        return np.r_[1.0, np.zeros(n_views - 1)]

    def fit(self, features: np.ndarray, target: np.ndarray) -> LogLinearPool:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 3:
            raise ValueError(f"features must be (items, candidates, views), got shape {x.shape}")
        y = np.asarray(target, dtype=np.int64)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} items but {len(y)} targets")
        keep = y >= 0
        x, y = x[keep], y[keep]
        prior = self._prior(x.shape[2])
        self.n_items_ = int(len(y))
        if len(y) == 0:
            self.weights_ = prior.copy()
            return self
        valid = np.isfinite(x).all(axis=2)
        x = np.where(valid[..., None], x, 0.0)
        chosen = x[np.arange(len(y)), y]  # (n, V)

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            logits = np.where(valid, x @ w, -np.inf)
            log_norm = logsumexp(logits, axis=1)
            p = np.exp(logits - log_norm[:, None])
            nll = float(np.sum(log_norm - chosen @ w)) + 0.5 * self.l2 * float(np.sum((w - prior) ** 2))
            grad = np.einsum("nk,nkv->v", p, x) - chosen.sum(axis=0) + self.l2 * (w - prior)
            return nll, grad

        start = np.maximum(prior, 0.0)
        result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * len(prior))
        self.weights_ = np.asarray(result.x, dtype=np.float64)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, K) pooled probability of each candidate slot (0 for empty slots)."""
        x = np.asarray(features, dtype=np.float64)
        valid = np.isfinite(x).all(axis=2)
        logits = np.where(valid, np.where(valid[..., None], x, 0.0) @ self.weights_, -np.inf)
        all_empty = ~valid.any(axis=1)
        logits[all_empty] = 0.0  # no candidate at all: a uniform row rather than NaN
        return softmax(logits, axis=1)


def item_log_likelihood(pool: LogLinearPool, features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Log-probability the pool gives each item's true slot (items with ``target`` -1 are dropped)."""
    keep = np.asarray(target) >= 0
    p = pool.predict_proba(np.asarray(features)[keep])
    return np.log(np.maximum(p[np.arange(int(keep.sum())), np.asarray(target)[keep]], 1e-12))


MIN_POOL_ANCHORS = 20  # anchors answered by every view below which the views are not weighed


def compare_pools(features: np.ndarray, target: np.ndarray, *, base_views: int = 1, folds: int = 5,
                  l2: float = 1.0, seed: int = 0, min_items: int = MIN_POOL_ANCHORS) -> PoolFit:
    """Does pooling all views beat pooling the first ``base_views`` alone on these labelled items?

    Both pools are fitted on ``folds - 1`` folds and scored on the held-out one; the full pool is adopted
    when its mean out-of-fold log-likelihood gain per item exceeds one standard error of that gain (the same
    rule as the prior mapping's rescaling, :mod:`backend.confidence.prior`). Either way the returned weights
    are fitted on all items; a rejected view's weights are 0.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.int64)
    keep = y >= 0
    x, y = x[keep], y[keep]
    n, n_views = len(y), x.shape[2]
    base = LogLinearPool(l2=l2).fit(x[:, :, :base_views], y)
    rejected = np.r_[base.weights_, np.zeros(n_views - base_views)]
    if n < min_items:
        return PoolFit(False, rejected, 0.0, 0.0, n,
                       f"{n} anchors answered by every view, fewer than the {min_items} needed to weigh the views")
    order = np.random.default_rng(seed).permutation(n) % min(folds, n)
    gain = np.empty(n)
    for f in range(min(folds, n)):
        test, train = order == f, order != f
        full_pool = LogLinearPool(l2=l2).fit(x[train], y[train])
        base_pool = LogLinearPool(l2=l2).fit(x[train][:, :, :base_views], y[train])
        gain[test] = (item_log_likelihood(full_pool, x[test], y[test])
                      - item_log_likelihood(base_pool, x[test][:, :, :base_views], y[test]))
    mean, se = float(gain.mean()), float(gain.std(ddof=1) / math.sqrt(n))
    full = LogLinearPool(l2=l2).fit(x, y)
    weights = ", ".join(f"{w:.2f}" for w in full.weights_)
    if mean > se:
        return PoolFit(True, full.weights_, mean, se, n,
                       f"views pooled with weights [{weights}]: {mean:+.3f} nats per anchor out of fold "
                       f"(standard error {se:.3f}, {n} anchors)")
    return PoolFit(False, rejected, mean, se, n,
                   f"the extra views did not earn a place: {mean:+.3f} nats per anchor out of fold, within one "
                   f"standard error ({se:.3f}, {n} anchors); pooled weights would have been [{weights}]")


def top_candidates(scores: np.ndarray, size: int) -> np.ndarray:
    """(n, size) class indices: each row's ``size`` best-scored classes with a finite score, in class-index
    order (so the order shown to an LLM says nothing of the ranking); -1 pads rows with fewer."""
    scores = np.asarray(scores, dtype=np.float64)
    size = min(size, scores.shape[1]) if scores.ndim == 2 else 0
    out = np.full((len(scores), size), -1, np.int64)
    if size == 0 or len(scores) == 0:
        return out
    top = np.argsort(-scores, axis=1, kind="stable")[:, :size]
    for row, classes in enumerate(top):
        chosen = np.sort(classes[np.isfinite(scores[row, classes])])
        out[row, : len(chosen)] = chosen
    return out


def candidate_features(candidates: np.ndarray, encoder_log_probs: np.ndarray,
                       view_probs: list[list[dict[int, float] | None]]) -> np.ndarray:
    """The pool's ``(n, K, 1 + V)`` features: the encoder's log-probability of each candidate, then each
    view's floored log-probability (:func:`floored_log`). ``view_probs[v][i]`` maps class index -> probability
    for item ``i`` (None: the view did not answer, so it is uniform and moves nothing). Empty slots are -inf.
    """
    n, k = candidates.shape
    out = np.full((n, k, 1 + len(view_probs)), -np.inf)
    filled = candidates >= 0
    rows = np.arange(n)[:, None]
    out[..., 0] = np.where(filled, encoder_log_probs[rows, np.maximum(candidates, 0)], -np.inf)
    for v, per_item in enumerate(view_probs):
        for i in range(n):
            slots = filled[i]
            known = per_item[i] or {}
            probs = np.array([known.get(int(c), np.nan) for c in candidates[i, slots]])
            if not np.isfinite(probs).any():
                probs = np.ones(len(probs))  # no answer: a uniform view
            out[i, slots, 1 + v] = floored_log(probs)
    return out
