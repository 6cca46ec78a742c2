"""The log-linear pool (backend.labelling.combination) on synthetic views whose reliability is known."""

from __future__ import annotations

import numpy as np
import pytest

from backend.labelling.combination import (
    FLOOR,
    LogLinearPool,
    candidate_features,
    compare_pools,
    floored_log,
    top_candidates,
)


def simulated_views(n: int, k: int, accuracies: tuple[float, ...], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items with ``k`` candidates; view ``v`` puts most of its mass on the true slot with probability
    ``accuracies[v]``, else on a random wrong slot. Returns (features (n, k, V), true slots)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    features = np.empty((n, k, len(accuracies)))
    for v, acc in enumerate(accuracies):
        right = rng.random(n) < acc
        wrong = (truth + rng.integers(1, k, n)) % k
        picked = np.where(right, truth, wrong)
        probs = np.full((n, k), 0.3 / (k - 1))
        probs[np.arange(n), picked] = 0.7
        features[:, :, v] = floored_log(probs)
    return features, truth


def pooled_accuracy(pool: LogLinearPool, features: np.ndarray, truth: np.ndarray) -> float:
    return float((pool.predict_proba(features).argmax(axis=1) == truth).mean())


def test_a_view_at_chance_is_weighed_out_and_a_strong_one_is_followed() -> None:
    # encoder right 70% of the time; view 1 at chance (1 in 5); view 2 right 90%
    x, y = simulated_views(3000, 5, (0.7, 0.2, 0.9), seed=0)
    pool = LogLinearPool().fit(x, y)
    assert pool.weights_[1] < 0.1  # the useless view stops moving labels
    assert pool.weights_[2] > pool.weights_[0]  # the strong view outweighs the encoder
    test_x, test_y = simulated_views(3000, 5, (0.7, 0.2, 0.9), seed=1)
    assert pooled_accuracy(pool, test_x, test_y) >= 0.88


def test_the_pool_never_trusts_a_view_in_reverse() -> None:
    # view 1 is right far less often than chance: its weight is held at 0, not made negative
    x, y = simulated_views(2000, 4, (0.7, 0.02), seed=2)
    pool = LogLinearPool().fit(x, y)
    assert pool.weights_[1] == pytest.approx(0.0, abs=1e-9)


def test_compare_pools_rejects_a_useless_view_and_adopts_a_useful_one() -> None:
    x_bad, y_bad = simulated_views(400, 5, (0.7, 0.2), seed=3)
    rejected = compare_pools(x_bad, y_bad)
    assert not rejected.adopted and rejected.weights[1] == 0.0
    assert "did not earn" in rejected.message
    x_good, y_good = simulated_views(400, 5, (0.7, 0.85), seed=4)
    adopted = compare_pools(x_good, y_good)
    assert adopted.adopted and adopted.weights[1] > 0.5 and adopted.gain > adopted.standard_error


def test_compare_pools_needs_enough_anchors() -> None:
    x, y = simulated_views(10, 5, (0.7, 0.95), seed=5)
    fit = compare_pools(x, y, min_items=20)
    assert not fit.adopted and "fewer than the 20" in fit.message


def test_items_whose_label_is_not_a_candidate_are_left_out_of_the_fit() -> None:
    x, y = simulated_views(500, 5, (0.7, 0.9), seed=6)
    with_outside = np.r_[y[:400], np.full(100, -1)]
    pool = LogLinearPool().fit(x, with_outside)
    assert pool.n_items_ == 400


def test_empty_slots_get_no_probability() -> None:
    features = np.array([[[0.0, np.log(0.5)], [-1.0, np.log(0.5)], [-np.inf, -np.inf]]])
    pool = LogLinearPool()
    pool.weights_ = np.array([1.0, 1.0])
    p = pool.predict_proba(features)
    assert p[0, 2] == 0.0 and p[0].sum() == pytest.approx(1.0)
    assert p[0, 0] > p[0, 1]


def test_top_candidates_are_in_class_order_not_rank_order() -> None:
    scores = np.array([[0.1, 0.9, 0.5, -np.inf], [0.3, 0.2, 0.1, 0.0]])
    assert top_candidates(scores, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert top_candidates(np.array([[0.2, -np.inf, -np.inf]]), 2).tolist() == [[0, -1]]


def test_candidate_features_floor_unscored_candidates_and_ignore_missing_answers() -> None:
    candidates = np.array([[0, 2, 3], [1, 2, -1]])
    encoder = np.log(np.array([[0.5, 0.1, 0.3, 0.1], [0.1, 0.6, 0.2, 0.1]]))
    feats = candidate_features(candidates, encoder, [[{2: 0.9, 0: 0.1}, None]])
    assert feats.shape == (2, 3, 2)
    assert np.exp(feats[0, :, 1]).sum() == pytest.approx(1.0)
    assert np.exp(feats[0, 2, 1]) == pytest.approx(FLOOR / (1 + FLOOR), rel=1e-6)  # class 3 was not scored
    assert feats[1, 0, 1] == feats[1, 1, 1]  # no answer: uniform, it moves nothing
    assert np.isneginf(feats[1, 2]).all()  # an empty slot
