"""Class centroids refined on the unlabelled items, adopted only where the anchors show that it helps.

The items a team imports are evidence about its classes too: a class's texts cluster around a point that a
handful of anchors only estimates. The refinement is semi-supervised soft k-means with the anchors clamped
(seeded k-means, Basu, Banerjee and Mooney, ICML 2002, with the soft assignments of EM): starting from the
anchors' centroids ``mu_c``, every round gives each unlabelled item ``i`` a soft assignment

    q_ic = softmax_c( cos(e_i, mu_c) / T )

and moves each centroid to

    mu_c = normalise( sum_{anchors a of c} e_a + w * sum_i q_ic e_i ),   w = min(1, n_anchors / n_items)

so an unlabelled item never counts more than a labelled one, and all items together at most as much as
all anchors: the anchors keep the classes where the team put them. Labels without anchors keep their
prototype (their embedded name) and are not moved; an item the plain centroids give to such a label keeps
that label (:func:`claimed_scores`).

Why a gate: on a set whose classes are compact and balanced the refinement gains several points; on one
with skewed classes the large classes absorb the small ones' items and it loses many (bench/transductive.py,
docs/benchmarks.md). The anchors can tell the two apart: each anchor is classified out of fold twice, by
the other folds' centroids and by those centroids refined on the items plus the held-out fold, and the
refinement is adopted only when the mean per-anchor gain in accuracy exceeds :data:`GATE_Z` standard
errors. Written here rather than taken from scikit-learn: its ``KMeans`` cannot clamp labelled points or
keep classes fixed, and its ``LabelSpreading`` works on a k-NN graph, not on class centroids in an
encoder's cosine geometry, which is what the rest of the pipeline scores with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.labelling.anchors import ClassScores, CrossCheck, cross_check_anchors, paired_gain

#: Softmax temperature of the soft assignments, in cosine units: a cosine 0.05 higher is e^2.5 ~ 12x the
#: weight, sharp enough that an item counts for its nearest classes only. Set once from MiniLM's cosine
#: spread on Banking77 (bench/transductive.py), not tuned per data set.
TEMPERATURE = 0.02
ROUNDS = 5  # assignment / update rounds; the centroids move little after the third
#: Standard errors of the anchors' gain that adoption needs: a step that can lose 20 points on one data set
#: must prove more than the one standard error a pooled view needs.
GATE_Z = 2.0
#: Unlabelled items the refinement reads at most (a stable sample beyond): centroids of 20,000 items are as
#: good as of 100,000, and the gate's folds stay a few seconds of matrix products.
MAX_ITEMS = 20_000
#: Items below which a batch is not used to fit a refinement (a /predict batch of a few tasks says nothing
#: about the classes); such batches reuse the refinement of the last large run on the same anchors.
MIN_ITEMS = 50


def refine_centroids(anchors: np.ndarray, anchor_labels: np.ndarray, n_classes: int, items: np.ndarray, *,
                     prototypes: np.ndarray | None = None, temperature: float = TEMPERATURE,
                     rounds: int = ROUNDS) -> np.ndarray:
    """``(n_classes, d)`` unit centroids refined on ``items`` (module docstring); rows of classes without
    anchors are the ``prototypes`` (zeros without them, which then score 0 and are never moved)."""
    anchors = np.asarray(anchors, dtype=np.float32)
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    items = np.asarray(items, dtype=np.float32).reshape(-1, anchors.shape[1] if anchors.ndim == 2 else 0)
    dim = anchors.shape[1]
    anchor_sums = np.zeros((n_classes, dim), np.float64)
    np.add.at(anchor_sums, anchor_labels, anchors)
    present = np.bincount(anchor_labels, minlength=n_classes) > 0
    fixed = np.zeros((n_classes, dim), np.float32) if prototypes is None else np.asarray(prototypes, np.float32)
    centroids = np.where(present[:, None], _unit(anchor_sums), fixed).astype(np.float32)
    if len(items) == 0 or not present.any():
        return centroids
    weight = min(1.0, len(anchor_labels) / len(items))
    for _ in range(rounds):
        logits = (items @ centroids.T) / temperature
        if prototypes is None:
            logits[:, ~present] = -np.inf
        soft = np.exp(logits - logits.max(axis=1, keepdims=True))
        soft /= soft.sum(axis=1, keepdims=True)
        moved = _unit(anchor_sums + weight * (soft.T @ items))
        centroids = np.where(present[:, None], moved, fixed).astype(np.float32)
    return centroids


def plain_centroids(anchors: np.ndarray, anchor_labels: np.ndarray, n_classes: int, *,
                    prototypes: np.ndarray | None = None) -> np.ndarray:
    """The anchors' own unit centroids (no item read), on the same footing as the refined ones."""
    return refine_centroids(anchors, anchor_labels, n_classes, np.zeros((0, np.shape(anchors)[1]), np.float32),
                            prototypes=prototypes)


def centroid_scores(queries: np.ndarray, centroids: np.ndarray, present: np.ndarray) -> ClassScores:
    """Cosine of each query to each class centroid; classes not ``present`` score ``-inf`` (the pipeline
    fills them from their prototypes, as it does for the plain centroids)."""
    queries = np.asarray(queries, dtype=np.float32)
    scores = np.full((len(queries), len(centroids)), -np.inf, np.float32)
    if len(queries) and present.any():
        scores[:, present] = queries @ centroids[present].T
    return ClassScores.of(scores)


def claimed_scores(queries: np.ndarray, refined: np.ndarray, plain: np.ndarray, present: np.ndarray,
                   prototypes: np.ndarray | None = None) -> ClassScores:
    """Scores by the ``refined`` centroids, except for a query the ``plain`` ones give to a label without
    anchors: its name claimed it, and the refinement, which only moves the labels that have anchors, knows
    nothing to overrule it with (without this, measured at 1% Banking77 anchors, the refined centroids drew
    10-13% of those labels' items away). Labels without anchors score their ``prototypes`` (or ``-inf``)."""
    new = centroid_scores(queries, refined, present)
    if prototypes is None or present.all() or len(new.scores) == 0:
        return new
    old = centroid_scores(queries, plain, present)
    absent = ~present
    names = np.asarray(queries, np.float32) @ np.asarray(prototypes, np.float32)[absent].T
    new.scores[:, absent] = names
    old.scores[:, absent] = names
    claimed = absent[old.scores.argmax(axis=1)]
    return ClassScores.of(np.where(claimed[:, None], old.scores, new.scores))


@dataclass
class Refinement:
    """What :func:`fit_refinement` found. ``centroids`` (when adopted) score the items; ``cross_check`` is
    the anchors' out-of-fold classification with refined centroids, which then replaces the plain one
    wherever the pipeline learns from the anchors (the encoder's temperature, the views' pool, the prior)."""

    adopted: bool
    gain: float  # mean per-anchor gain in out-of-fold accuracy (refined right - plain right)
    standard_error: float
    anchors: int  # anchors the gain rests on
    items: int  # unlabelled items the refinement read
    message: str
    centroids: np.ndarray | None = None
    present: np.ndarray | None = None
    cross_check: CrossCheck | None = None
    plain_centroids: np.ndarray | None = None
    prototypes: np.ndarray | None = None

    def scores(self, queries: np.ndarray) -> ClassScores:
        """The adopted refinement's class scores of ``queries`` (:func:`claimed_scores`)."""
        return claimed_scores(queries, self.centroids, self.plain_centroids, self.present, self.prototypes)

    def as_dict(self) -> dict[str, Any]:
        return {"adopted": self.adopted, "gain": round(self.gain, 4), "standard_error": round(self.standard_error, 4),
                "anchors": self.anchors, "items": self.items, "message": self.message}


def fit_refinement(anchors: np.ndarray, anchor_labels: np.ndarray, n_classes: int, items: np.ndarray, *,
                   plain: CrossCheck, complete: Callable[[ClassScores, np.ndarray], ClassScores],
                   prototypes: np.ndarray | None = None, z: float = GATE_Z, seed: int = 0) -> Refinement:
    """Refine the centroids on ``items`` and decide, on the anchors, whether to use them (module docstring).

    ``plain`` is the anchors' plain out-of-fold classification (:func:`cross_check_anchors` with the centroid
    classifier and its default folds), against which the refined one is compared fold for fold;
    ``complete`` fills classes without anchors the way the pipeline scores them.
    """
    anchors = np.asarray(anchors, dtype=np.float32)
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    items = _sample(np.asarray(items, dtype=np.float32), MAX_ITEMS, seed)
    n = len(anchor_labels)
    if n < 2 or len(items) == 0:
        return Refinement(False, 0.0, 0.0, n, len(items), "too few anchors or items to refine the centroids on")

    def refined_scorer(held: np.ndarray, rest: np.ndarray) -> ClassScores:
        pool = np.vstack([items, anchors[held]])
        centroids = refine_centroids(anchors[rest], anchor_labels[rest], n_classes, pool, prototypes=prototypes)
        start = plain_centroids(anchors[rest], anchor_labels[rest], n_classes, prototypes=prototypes)
        present = np.bincount(anchor_labels[rest], minlength=n_classes) > 0
        return claimed_scores(anchors[held], centroids, start, present, prototypes)

    refined = cross_check_anchors(anchors, anchor_labels, n_classes, method="centroid", scorer=refined_scorer)
    rows = np.flatnonzero(plain.usable)
    truth = anchor_labels[rows]
    before = complete(plain.scores, anchors).labels[rows] == truth
    after = complete(refined.scores, anchors).labels[rows] == truth
    if len(rows) < 2:
        return Refinement(False, 0.0, 0.0, len(rows), len(items), "too few cross-checked anchors to judge a refinement")
    gain, se = paired_gain(before, after)
    summary = (f"{100 * gain:+.1f} points on {len(rows)} anchors out of fold (standard error {100 * se:.1f}), "
               f"refined on {len(items)} items")
    if gain <= 0 or gain <= z * se:
        return Refinement(False, gain, se, len(rows), len(items),
                          f"centroids not refined on the items: {summary}, below {z:g} standard errors")
    present = np.bincount(anchor_labels, minlength=n_classes) > 0
    centroids = refine_centroids(anchors, anchor_labels, n_classes, items, prototypes=prototypes)
    start = plain_centroids(anchors, anchor_labels, n_classes, prototypes=prototypes)
    return Refinement(True, gain, se, len(rows), len(items), f"centroids refined on the items: {summary}",
                      centroids=centroids, present=present, cross_check=refined, plain_centroids=start,
                      prototypes=prototypes)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _sample(items: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(items) <= limit:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return items[keep]
