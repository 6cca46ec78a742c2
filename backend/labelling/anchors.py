"""Anchor index: human-labelled reference vectors, class-cluster scores and k-NN majority voting.

Vectors are L2-normalised, so inner product = cosine similarity. Labels are integer class indices into
a label list owned by the caller; ``-1`` never enters an index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

CLASSIFIERS = ("topk_mean", "centroid", "ensemble")
#: The classifier chosen per anchor set by :func:`choose_classifier`.
AUTO = "auto"
#: What ``auto`` chooses among, the first being kept unless another proves better. ``topk_mean`` alone is
#: not a candidate: near-duplicate anchors flatter it out of fold (Banking77 10%, five draws: +0.7 to +3.4
#: points on the anchors, -1.4 on the test split's mean), while the ensemble, half centroid, held up there.
AUTO_CANDIDATES = ("centroid", "ensemble")
#: Standard errors of the anchors' paired gain that choosing another classifier than the first needs.
CHOICE_Z = 2.0
#: Anchors the choice reads at most (a stable sample beyond): the top-k score of every fold is a product
#: of anchors by anchors.
CHOICE_MAX_ANCHORS = 3000
_CHUNK = 4096  # query rows per similarity block: bounds memory at 4096 x n_anchors floats


@dataclass
class ClassScores:
    """Result of the class-cluster classifier for a batch of queries."""

    scores: np.ndarray  # (n, n_classes) similarity per class; -inf for a class with no anchors
    labels: np.ndarray  # (n,) argmax class, -1 when no class has anchors
    margins: np.ndarray  # (n,) best minus second-best score (0 when fewer than two classes score)

    @classmethod
    def of(cls, scores: np.ndarray) -> ClassScores:
        """Labels and margins of an ``(n, n_classes)`` score matrix (a row where no class scores: -1)."""
        if not len(scores):  # argmax of no rows is an error
            return cls(scores=scores, labels=np.zeros(0, np.int64), margins=_margins(scores))
        labels = np.where(np.isfinite(scores).any(axis=1), scores.argmax(axis=1), -1)
        return cls(scores=scores, labels=labels.astype(np.int64), margins=_margins(scores))


@dataclass
class Vote:
    """Result of a k-NN majority vote for a batch of queries."""

    labels: np.ndarray  # (n,) winning class, -1 when the reference set is empty
    shares: np.ndarray  # (n,) share of the vote weight that went to the winner
    neighbours: np.ndarray  # (n, k) positions in the reference set, -1 padded


def _ensure_2d(vectors: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    return arr


def _margins(scores: np.ndarray) -> np.ndarray:
    if scores.shape[1] < 2:
        return np.zeros(scores.shape[0], dtype=np.float32)
    top2 = -np.partition(-scores, 1, axis=1)[:, :2]
    with np.errstate(invalid="ignore"):  # -inf - -inf (no class scores) is nan, mapped to 0 below
        margin = top2[:, 0] - top2[:, 1]
    return np.where(np.isfinite(margin), margin, 0.0).astype(np.float32)


def class_scores(
    queries: np.ndarray,
    anchors: np.ndarray,
    anchor_labels: np.ndarray,
    n_classes: int,
    *,
    k: int = 3,
    method: str = "topk_mean",
) -> ClassScores:
    """Score every query against every class of anchors.

    ``topk_mean`` is the HCC paper's AS(e, C_j): the mean cosine of the ``k`` most similar anchors of
    class j (all of them when the class has fewer). ``centroid`` is the cosine to the normalised class
    mean. ``ensemble`` averages the two. Classes without anchors score ``-inf``.
    """
    if method not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {method!r}; choose one of {', '.join(CLASSIFIERS)}")
    queries = _ensure_2d(queries)
    anchors = _ensure_2d(anchors) if len(anchors) else np.zeros((0, queries.shape[1]), np.float32)
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    if len(anchor_labels) != len(anchors):
        raise ValueError(f"{len(anchors)} anchor vectors but {len(anchor_labels)} anchor labels")
    n = queries.shape[0]
    scores = np.full((n, n_classes), -np.inf, dtype=np.float32)
    present = [c for c in range(n_classes) if np.any(anchor_labels == c)]
    if n and present:
        if method in ("topk_mean", "ensemble"):
            topk = _topk_mean_scores(queries, anchors, anchor_labels, present, k)
        if method in ("centroid", "ensemble"):
            cent = _centroid_scores(queries, anchors, anchor_labels, present)
        block = topk if method == "topk_mean" else cent if method == "centroid" else (topk + cent) / 2
        scores[:, present] = block
    return ClassScores.of(scores)


def with_prototypes(scored: ClassScores, queries: np.ndarray, prototypes: np.ndarray) -> ClassScores:
    """Fill the classes that have no anchor (``-inf`` in every row) with the cosine to a prototype vector of
    the class (e.g. its embedded name); labels and margins are recomputed. Classes with anchors are left as
    they are."""
    scores = scored.scores.copy()
    missing = ~np.isfinite(scores).any(axis=0) if len(scores) else np.zeros(scores.shape[1], bool)
    if not missing.any():
        return scored
    queries = _ensure_2d(queries)
    scores[:, missing] = queries @ _ensure_2d(prototypes)[missing].T
    return ClassScores.of(scores)


def _topk_mean_scores(queries, anchors, anchor_labels, present, k) -> np.ndarray:
    order = np.argsort(anchor_labels, kind="stable")
    sorted_labels = anchor_labels[order]
    sorted_anchors = anchors[order]
    bounds = [np.searchsorted(sorted_labels, [c, c + 1]) for c in present]
    out = np.empty((queries.shape[0], len(present)), dtype=np.float32)
    for start in range(0, queries.shape[0], _CHUNK):
        sims = queries[start : start + _CHUNK] @ sorted_anchors.T
        for j, (lo, hi) in enumerate(bounds):
            block = sims[:, lo:hi]
            kk = min(k, hi - lo)
            if kk < block.shape[1]:
                block = np.partition(block, block.shape[1] - kk, axis=1)[:, -kk:]
            out[start : start + _CHUNK, j] = block.mean(axis=1)
    return out


def _centroid_scores(queries, anchors, anchor_labels, present) -> np.ndarray:
    centroids = np.stack([anchors[anchor_labels == c].mean(axis=0) for c in present])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return queries @ centroids.T.astype(np.float32)


def nearest_of_label(
    queries: np.ndarray, anchors: np.ndarray, anchor_labels: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Cosine of each query to its nearest anchor that carries ``labels[i]``; ``-inf`` when none does.

    A label backed by a close human example is more often right than one backed only by a class mean.
    """
    queries = _ensure_2d(queries)
    labels = np.asarray(labels, dtype=np.int64)
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    if len(labels) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(labels)} labels")
    out = np.full(len(queries), -np.inf, dtype=np.float32)
    if len(anchor_labels) == 0 or len(queries) == 0:
        return out
    anchors = _ensure_2d(anchors)
    for start in range(0, len(queries), _CHUNK):
        sims = queries[start : start + _CHUNK] @ anchors.T
        same = anchor_labels[None, :] == labels[start : start + _CHUNK, None]
        out[start : start + _CHUNK] = np.where(same, sims, -np.inf).max(axis=1)
    return out


@dataclass
class CrossCheck:
    """Each anchor classified by the anchors of the other folds (:func:`cross_check_anchors`)."""

    scores: ClassScores  # of every anchor, from the other folds' anchors
    nearest: np.ndarray  # (n,) cosine to the nearest other-fold anchor carrying the predicted label
    usable: np.ndarray  # (n,) bool: the anchor's own class kept an anchor in the other folds


def cross_check_anchors(
    anchors: np.ndarray,
    anchor_labels: np.ndarray,
    n_classes: int,
    *,
    method: str = "topk_mean",
    k: int = 3,
    folds: int = 20,
    seed: int = 0,
    predicted: np.ndarray | None = None,
    scorer: Callable[[np.ndarray, np.ndarray], ClassScores] | None = None,
) -> CrossCheck:
    """Classify every anchor with :func:`class_scores` over the anchors of the other ``folds`` folds.

    Folds are a seeded random partition (``folds`` is capped at the number of anchors, so small sets are
    left-one-out). An anchor whose class has no anchor in the other folds cannot be classified right by
    construction, a situation a real item of a class with anchors never meets: ``usable`` is False there.
    ``predicted`` (one label per anchor, e.g. another encoder's cross-checked labels) replaces this
    classifier's own label in ``nearest``; the same ``folds`` and ``seed`` give the same partition.
    ``scorer(held, rest)`` (boolean masks over the anchors) replaces :func:`class_scores` for each fold, e.g.
    centroids refined on unlabelled items (:mod:`backend.labelling.transductive`).
    """
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    n = len(anchor_labels)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    scores = np.full((n, n_classes), -np.inf, dtype=np.float32)
    nearest = np.full(n, -np.inf, dtype=np.float32)
    usable = np.zeros(n, dtype=bool)
    if n >= 2:
        anchors = _ensure_2d(anchors)
        fold = np.random.default_rng(seed).permutation(n) % min(folds, n)
        for f in np.unique(fold):
            held, rest = fold == f, fold != f
            scored = (scorer(held, rest) if scorer is not None else
                      class_scores(anchors[held], anchors[rest], anchor_labels[rest], n_classes, k=k, method=method))
            scores[held] = scored.scores
            label = scored.labels if predicted is None else np.asarray(predicted, dtype=np.int64)[held]
            nearest[held] = nearest_of_label(anchors[held], anchors[rest], anchor_labels[rest], label)
            usable[held] = np.isin(anchor_labels[held], anchor_labels[rest])
    labels = np.where(np.isfinite(scores).any(axis=1), scores.argmax(axis=1), -1) if n else np.zeros(0, int)
    return CrossCheck(ClassScores(scores, labels.astype(np.int64), _margins(scores)), nearest, usable)


def knn_vote(
    queries: np.ndarray,
    references: np.ndarray,
    reference_labels: np.ndarray,
    *,
    k: int = 5,
    weighted: bool = False,
    exclude_self: np.ndarray | None = None,
) -> Vote:
    """MV-VTES: majority vote over the ``k`` nearest references (faiss inner-product search).

    Uniform votes as in the paper; ``weighted=True`` weighs each neighbour by its cosine. Ties go to
    the tied class with the larger summed similarity, then the nearer neighbour, then the smaller class
    index, so the result does not depend on input order. ``exclude_self`` gives, per query, a reference
    position to skip (an item never votes for itself).
    """
    queries = _ensure_2d(queries)
    n = queries.shape[0]
    reference_labels = np.asarray(reference_labels, dtype=np.int64)
    m = len(reference_labels)
    if n == 0 or m == 0:
        return Vote(np.full(n, -1, np.int64), np.zeros(n, np.float32), np.full((n, k), -1, np.int64))
    references = _ensure_2d(references)
    index = faiss.IndexFlatIP(references.shape[1])
    index.add(references)
    extra = 1 if exclude_self is not None else 0
    sims, idx = index.search(queries, min(k + extra, m))
    if exclude_self is not None:
        sims, idx = _drop_self(sims, idx, np.asarray(exclude_self), k)
    labels = np.full(n, -1, np.int64)
    shares = np.zeros(n, np.float32)
    for row in range(n):
        labels[row], shares[row] = _tally(idx[row], sims[row], reference_labels, weighted)
    pad = np.full((n, max(0, k - idx.shape[1])), -1, np.int64)
    return Vote(labels, shares, np.hstack([idx[:, :k], pad]))


def _drop_self(sims, idx, self_pos, k):
    keep_sims = np.full((idx.shape[0], k), -np.inf, np.float32)
    keep_idx = np.full((idx.shape[0], k), -1, np.int64)
    for row in range(idx.shape[0]):
        mask = (idx[row] != self_pos[row]) & (idx[row] >= 0)
        chosen = idx[row][mask][:k]
        keep_idx[row, : len(chosen)] = chosen
        keep_sims[row, : len(chosen)] = sims[row][mask][:k]
    return keep_sims, keep_idx


def _tally(neighbours, sims, reference_labels, weighted) -> tuple[int, float]:
    valid = neighbours >= 0
    if not valid.any():
        return -1, 0.0
    labels = reference_labels[neighbours[valid]]
    sims = sims[valid]
    weights = np.maximum(sims, 0.0) if weighted else np.ones_like(sims)
    best, best_key = -1, None
    for label in np.unique(labels):
        mask = labels == label
        # Rank: vote weight, then summed similarity, then the nearest member's similarity, then the smaller
        # class index. Compared by value, never by position: faiss orders exactly tied neighbours by
        # storage order, which would make the winner depend on the order of the references.
        key = (float(weights[mask].sum()), float(sims[mask].sum()), float(sims[mask].max()), -int(label))
        if best_key is None or key > best_key:
            best, best_key = int(label), key
    total = float(weights.sum())
    share = best_key[0] / total if total > 0 else 0.0
    return best, share


class AnchorIndex:
    """Human-labelled anchors kept in a faiss inner-product index, addressable by id.

    ``add`` with a known id replaces that anchor (a reviewer who changes a label); ``remove`` drops it.
    """

    def __init__(self, dimension: int, n_classes: int) -> None:
        self.dimension = dimension
        self.n_classes = n_classes
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._ids: dict[str, int] = {}  # external id -> faiss int id
        self._vectors: dict[int, np.ndarray] = {}
        self._labels: dict[int, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, anchor_id: object) -> bool:
        return anchor_id in self._ids

    def add(self, ids: Sequence[str], vectors: np.ndarray, labels: Sequence[int]) -> None:
        vectors = _ensure_2d(vectors)
        if not (len(ids) == len(vectors) == len(labels)):
            raise ValueError("ids, vectors and labels must have the same length")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate anchor ids in one add() call")
        for label in labels:
            if not 0 <= int(label) < self.n_classes:
                raise ValueError(f"anchor label {label} outside 0..{self.n_classes - 1}")
        self.remove([i for i in ids if i in self._ids])
        internal = np.arange(self._next, self._next + len(ids), dtype=np.int64)
        self._next += len(ids)
        self._index.add_with_ids(vectors, internal)
        for ext, iid, vec, label in zip(ids, internal, vectors, labels, strict=True):
            self._ids[ext] = int(iid)
            self._vectors[int(iid)] = vec
            self._labels[int(iid)] = int(label)

    def remove(self, ids: Sequence[str]) -> int:
        internal = [self._ids.pop(i) for i in ids if i in self._ids]
        if internal:
            self._index.remove_ids(np.asarray(internal, dtype=np.int64))
            for iid in internal:
                del self._vectors[iid], self._labels[iid]
        return len(internal)

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, vectors, labels) of the current anchors, in insertion order."""
        ids = list(self._ids)
        internal = [self._ids[i] for i in ids]
        if not internal:
            return [], np.zeros((0, self.dimension), np.float32), np.zeros(0, np.int64)
        vectors = np.stack([self._vectors[i] for i in internal])
        labels = np.array([self._labels[i] for i in internal], dtype=np.int64)
        return ids, vectors, labels

    def class_counts(self) -> np.ndarray:
        return np.bincount(np.fromiter(self._labels.values(), int), minlength=self.n_classes)

    def classify(self, queries: np.ndarray, *, k: int = 3, method: str = "topk_mean") -> ClassScores:
        _, vectors, labels = self.arrays()
        return class_scores(queries, vectors, labels, self.n_classes, k=k, method=method)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Nearest anchors by cosine: (similarities, external ids) per query."""
        queries = _ensure_2d(queries)
        if not self._ids:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in range(len(queries))]
        sims, idx = self._index.search(queries, min(k, len(self._ids)))
        by_internal = {v: k_ for k_, v in self._ids.items()}
        return sims, [[by_internal[int(i)] for i in row if i >= 0] for row in idx]


def paired_gain(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean per-item gain of ``after`` over ``before`` (booleans: right or not) and its standard error."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if len(diff) < 2:
        return 0.0, math.inf
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


@dataclass
class ClassifierChoice:
    """What :func:`choose_classifier` found: the method, the out-of-fold accuracy of each candidate and why."""

    method: str
    accuracy: dict[str, float]  # candidate -> out-of-fold accuracy on the usable anchors
    gain: float  # of the chosen method over the first candidate (0 when that one was kept)
    standard_error: float
    anchors: int
    message: str
    cross_check: CrossCheck | None = None  # the chosen method's, when computed on every anchor

    def as_dict(self) -> dict:
        return {"method": self.method, "accuracy": {m: round(a, 4) for m, a in self.accuracy.items()},
                "gain": round(self.gain, 4), "standard_error": round(self.standard_error, 4),
                "anchors": self.anchors, "message": self.message}


def choose_classifier(anchors: np.ndarray, anchor_labels: np.ndarray, n_classes: int, *,
                      complete: Callable[[ClassScores, np.ndarray], ClassScores] | None = None,
                      candidates: Sequence[str] = AUTO_CANDIDATES, k: int = 3, z: float = CHOICE_Z,
                      max_anchors: int = CHOICE_MAX_ANCHORS, seed: int = 0) -> ClassifierChoice:
    """The class-cluster classifier that these anchors, each classified out of fold, show to be best.

    Which classifier fits depends on the data: a class that is one tight topic suits its centroid, one that
    gathers several sub-topics (a "scenario" of many intents) suits the mean of its nearest anchors
    (measured over five draws on the four ClusterLLM sets, docs/benchmarks.md: the ensemble gains 3.7-5.0
    points on MASSIVE-scenario at 5-10% and loses 0.7-1.6 on CLINC). Every candidate classifies the same
    folds; the first is kept unless another's paired gain in accuracy exceeds ``z`` standard errors.
    ``complete`` fills labels without anchors as the pipeline scores them.
    """
    anchors = np.asarray(anchors, np.float32)
    anchor_labels = np.asarray(anchor_labels, np.int64)
    full = len(anchor_labels) <= max_anchors
    if not full:  # the choice on a stable sample; the pipeline's own check reads all
        keep = np.sort(np.random.default_rng(seed).choice(len(anchor_labels), max_anchors, replace=False))
        anchors, anchor_labels = anchors[keep], anchor_labels[keep]
    checks = {m: cross_check_anchors(anchors, anchor_labels, n_classes, method=m, k=k, seed=seed)
              for m in candidates}
    usable = checks[candidates[0]].usable
    right = {}
    for method, check in checks.items():
        scores = complete(check.scores, anchors) if complete is not None else check.scores
        right[method] = (scores.labels == anchor_labels)[usable]
    accuracy = {m: float(r.mean()) if len(r) else 0.0 for m, r in right.items()}
    first, n = candidates[0], int(usable.sum())
    gains = {m: paired_gain(right[first], right[m]) for m in candidates[1:]}
    best = max(gains, key=lambda m: gains[m][0], default=None)
    summary = ", ".join(f"{m} {100 * a:.1f}%" for m, a in accuracy.items())
    if best is None or not (gains[best][0] > 0 and gains[best][0] > z * gains[best][1]):
        return ClassifierChoice(first, accuracy, 0.0, 0.0, n,
                                f"classifier {first}: out of fold on {n} anchors {summary}; no other gains "
                                f"{z:g} standard errors", checks[first] if full else None)
    gain, se = gains[best]
    return ClassifierChoice(best, accuracy, gain, se, n,
                            f"classifier {best}: out of fold on {n} anchors {summary} ({100 * gain:+.1f} points, "
                            f"standard error {100 * se:.1f})", checks[best] if full else None)
