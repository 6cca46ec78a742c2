"""The prior mapping: packaged, and rescaled on cross-checked anchors only when that clearly fits better."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from backend.confidence.prior import PRIOR, PriorMapping, fit_elicited, fit_prior, prior_features


def packaged_signals(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Prior features of encoder probabilities and anchor similarities spread like a real run's, and the
    packaged log-odds."""
    rng = np.random.default_rng(seed)
    features = prior_features(rng.beta(2, 1.2, n), rng.uniform(0.4, 0.95, n))
    return features, PriorMapping().log_odds(features)


def test_the_packaged_variant_is_the_first_whose_features_are_all_there():
    one = prior_features([0.5, 0.9], [0.8, 0.6])
    mapping = PriorMapping.packaged(one)
    intercept, weights = next((b, w) for b, w in PRIOR if set(w) == {"encoder_logit", "anchor_similarity"})
    expected = intercept + weights["encoder_logit"] * np.log([1.0, 9.0]) + weights["anchor_similarity"] * np.array(
        [0.8, 0.6])
    assert mapping.log_odds(one) == pytest.approx(expected)
    assert not mapping.adapted and PriorMapping().weights == weights
    two = prior_features([0.5, 0.9], [0.8, 0.6], [0.7, 0.2], [0.9, 0.5])
    assert set(PriorMapping.packaged(two).weights) == set(two)
    with pytest.raises(ValueError, match="no packaged prior mapping"):
        PriorMapping.packaged(["anchor_similarity"])
    with pytest.raises(ValueError, match="needs the features"):
        PriorMapping.packaged(two).log_odds(one)


def test_missing_similarity_counts_as_zero_and_extreme_probabilities_stay_finite():
    mapping = PriorMapping()
    z = mapping.log_odds(prior_features([0.0, 1.0, 0.5], [-np.inf, np.nan, 0.0]))
    assert np.all(np.isfinite(z))
    assert z[2] == pytest.approx(mapping.intercept)
    p = mapping.probability(prior_features([0.0, 1.0], [0.5, 0.5]))
    assert np.all((p > 0) & (p < 1))


def test_anchors_that_follow_the_packaged_mapping_keep_it():
    features, z = packaged_signals(600)
    right = np.random.default_rng(1).random(600) < expit(z)
    mapping = fit_prior(features, right)
    assert not mapping.adapted
    assert mapping.message.startswith("packaged prior mapping: rescaling it on 600")
    assert (mapping.pairs, mapping.right) == (600, int(right.sum()))


def test_anchors_the_packaged_mapping_misjudges_rescale_it():
    # The encoder barely beats a coin here: whatever the signals say, 55% are right.
    features, z = packaged_signals(300)
    right = np.random.default_rng(2).random(300) < 0.55
    mapping = fit_prior(features, right)
    assert mapping.adapted
    assert "rescaled on 300 cross-checked anchors" in mapping.message
    p = mapping.probability(features)
    # Near the base rate for every item, where the packaged mapping spreads them from sure-wrong to sure-right.
    assert abs(p.mean() - right.mean()) < 0.05
    assert np.abs(p - right.mean()).mean() < 0.06 < 0.15 < np.abs(expit(z) - right.mean()).mean()
    # A rescaling of the packaged log-odds: the same ranking.
    assert np.array_equal(np.argsort(p, kind="stable"), np.argsort(z, kind="stable"))


@pytest.mark.parametrize(("n", "n_right"), [(0, 0), (10, 5), (40, 40), (40, 0), (40, 37)])
def test_too_few_or_one_sided_anchors_keep_the_packaged_mapping(n, n_right):
    features, _ = packaged_signals(n)
    right = np.arange(n) < n_right
    mapping = fit_prior(features, right)
    assert not mapping.adapted
    assert "too few to rescale it" in mapping.message
    assert mapping.as_dict()["weights"] == PriorMapping().weights


def test_the_label_free_estimator_recovers_the_consistency_it_is_fitted_on_then_the_anchors_rescale_it():
    # A known truth: each item's consistency is sigmoid(-4 + 2 x encoder_logit + 3 x anchor_similarity).
    features, _ = packaged_signals(2000, seed=3)
    truth = {"encoder_logit": 2.0, "anchor_similarity": 3.0}
    consistency = expit(-4.0 + sum(w * features[k] for k, w in truth.items()))
    elicited = fit_elicited(features, consistency)
    assert elicited is not None and "2000 items" in elicited.message
    assert elicited.intercept == pytest.approx(-4.0, abs=0.3)
    assert elicited.weights == pytest.approx(truth, abs=0.3)
    # Consistency is not correctness: anchors right half the time whatever it says rescale it to their rate.
    anchors, _ = packaged_signals(300, seed=4)
    right = np.random.default_rng(5).random(300) < 0.5
    mapping = fit_prior(anchors, right, base=elicited)
    assert mapping.adapted and mapping.message.startswith("label-free prior mapping rescaled on 300")
    assert abs(mapping.probability(anchors).mean() - right.mean()) < 0.05
    # Too few items, or a target with nothing to learn: no estimator.
    few = {k: v[:49] for k, v in features.items()}
    assert fit_elicited(few, consistency[:49]) is None
    assert fit_elicited(features, np.ones(2000)) is None
