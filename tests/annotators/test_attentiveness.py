"""The pairwise attentiveness EM (backend.annotators.attentiveness) on data drawn from its own model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, stats

from backend.annotators.attentiveness import IdentifiabilityWarning, PairwiseAttentiveness
from backend.annotators.simulation import simulate_comparisons


def fit_quietly(labels: pd.DataFrame, **options) -> PairwiseAttentiveness:
    judge = options.pop("judge", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdentifiabilityWarning)
        return PairwiseAttentiveness(**options).fit(labels, judge=judge)


def assert_finite(est: PairwiseAttentiveness) -> None:
    """No NaN or infinity anywhere in what the estimator reports."""
    for series in (est.eta_, est.eta_map_, est.eta_sd_, est.position_bias_):
        assert np.isfinite(series.to_numpy()).all()
        assert ((series >= 0) & (series <= 1)).all()
    assert np.isfinite(est.posteriors_.to_numpy()).all()
    assert np.isfinite(est.annotations_[["p_attentive", "p_correct"]].to_numpy()).all()
    assert np.isfinite(est.mu_) and 0 < est.mu_ < 1
    assert np.isfinite(est.loss_history_).all()


def picked_a_counts(labels: pd.DataFrame, workers: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    picked = np.where(labels["choice"] == "left", labels["model_left"], labels["model_right"]) == "A"
    k = pd.Series(picked, index=labels["worker_id"]).groupby(level=0).sum().reindex(workers).to_numpy()
    n = labels["worker_id"].value_counts().reindex(workers).to_numpy()
    return k, n


def exact_posterior(k: int, n: int, mu: float, a: float = 8.0, b: float = 2.0) -> tuple[float, float]:
    """Posterior mean and mode of eta for k choices of A out of n, one annotation per item, mu known."""
    d = mu - 0.5

    def log_density(eta: float) -> float:
        return (a - 1) * np.log(eta) + (b - 1) * np.log1p(-eta) + k * np.log(0.5 + eta * d) + (n - k) * np.log(
            0.5 - eta * d)

    mode = optimize.minimize_scalar(lambda e: -log_density(e), bounds=(1e-9, 1 - 1e-9), method="bounded",
                                    options={"xatol": 1e-10}).x
    peak = log_density(mode)
    mass = integrate.quad(lambda e: np.exp(log_density(e) - peak), 0, 1, epsabs=1e-13, limit=200)[0]
    first = integrate.quad(lambda e: e * np.exp(log_density(e) - peak), 0, 1, epsabs=1e-13, limit=200)[0]
    return first / mass, mode


# -- the EM itself ---------------------------------------------------------------------------------------
def test_penalised_loglik_never_decreases_in_every_regime() -> None:
    sim = simulate_comparisons(40, 30, mu=0.7, population="mix", overlap_share=0.3, judge_signal=1.0, seed=1)
    for options in ({}, {"mu": 0.7}, {"judge": sim.judge_left}, {"estimate_position_bias": True}):
        est = fit_quietly(sim.labels, **options)
        history = np.asarray(est.loss_history_)
        assert len(history) >= 3
        assert (np.diff(history) >= -1e-9 * np.abs(history[:-1])).all(), options
        assert est.converged_
        assert_finite(est)


def test_posterior_mean_is_the_exact_bayes_posterior_when_mu_is_known() -> None:
    mu = 0.7
    sim = simulate_comparisons(40, 25, mu=mu, seed=2)
    est = fit_quietly(sim.labels, mu=mu)
    assert est.identifiability_ == "mu_fixed"
    k, n = picked_a_counts(sim.labels, est.eta_.index)
    exact = np.array([exact_posterior(int(ki), int(ni), mu) for ki, ni in zip(k, n, strict=True)])
    # eta_ is the posterior mean by quadrature; eta_map_ the EM's MAP, which must be the posterior's mode.
    np.testing.assert_allclose(est.eta_.to_numpy(), exact[:, 0], atol=1e-5)
    np.testing.assert_allclose(est.eta_map_.to_numpy(), exact[:, 1], atol=1e-4)
    truth = sim.eta.reindex(est.eta_.index).to_numpy()
    mae_em, mae_exact = np.abs(est.eta_ - truth).mean(), np.abs(exact[:, 0] - truth).mean()
    assert mae_em <= 1.10 * mae_exact


def test_posterior_mean_beats_the_map_where_labels_are_few() -> None:
    sim = simulate_comparisons(300, 10, mu=0.9, seed=3)
    est = fit_quietly(sim.labels, mu=0.9)
    truth = sim.eta.reindex(est.eta_.index)
    assert np.abs(est.eta_ - truth).mean() < np.abs(est.eta_map_ - truth).mean()


@pytest.mark.parametrize("mu", [0.7, 0.9])
def test_mu_within_two_percent_at_200_users_by_200_comparisons(mu: float) -> None:
    sim = simulate_comparisons(200, 200, mu=mu, seed=4)
    with pytest.warns(IdentifiabilityWarning, match="only eta_u"):
        est = PairwiseAttentiveness().fit(sim.labels)
    assert est.identifiability_ == "product_only"
    assert abs(est.mu_ - mu) / mu < 0.02
    assert stats.spearmanr(est.eta_, sim.eta.reindex(est.eta_.index)).statistic > 0.5


# -- identifiability regimes -----------------------------------------------------------------------------------
def test_one_annotation_per_item_identifies_only_the_product() -> None:
    """With mu free, changing the prior of eta moves mu and eta but not their product (nor the fit)."""
    sim = simulate_comparisons(100, 60, mu=0.8, seed=5)
    fits = [fit_quietly(sim.labels, a=a, b=b) for a, b in ((8, 2), (3, 3))]
    mus = [f.mu_ for f in fits]
    assert abs(mus[0] - mus[1]) > 0.03  # the prior decides mu ...
    products = [(f.eta_map_.mean()) * (f.mu_ - 0.5) for f in fits]
    assert products[0] == pytest.approx(products[1], rel=0.05)  # ... but not eta (mu - 1/2)


def test_mu_fixed_judge_or_overlap_each_identify_the_parameters() -> None:
    regimes = {
        "mu_fixed": (simulate_comparisons(60, 30, mu=0.7, seed=6), {"mu": 0.7}),
        "judge": (sim := simulate_comparisons(60, 30, mu=0.7, judge_signal=1.0, seed=6), {"judge": sim.judge_left}),
        "overlap": (simulate_comparisons(60, 30, mu=0.7, overlap_share=0.5, seed=6), {}),
    }
    for regime, (data, options) in regimes.items():
        judge = options.pop("judge", None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", IdentifiabilityWarning)  # none of these may warn
            est = PairwiseAttentiveness(**options).fit(data.labels, judge=judge)
        assert est.identifiability_ == regime
        assert est.warnings_ == []
        assert_finite(est)


def test_a_judge_prior_and_overlap_improve_recovery_over_counts_alone() -> None:
    base = dict(n_users=150, n_per_user=40, mu=0.7, population="mix")
    alone = simulate_comparisons(**base, judge_signal=1.5, seed=7)
    overlap = simulate_comparisons(**base, overlap_share=1.0, seed=7)

    def mae(est, sim) -> float:
        return float(np.abs(est.eta_ - sim.eta.reindex(est.eta_.index)).mean())

    counts_only = mae(fit_quietly(alone.labels), alone)
    with_judge = mae(fit_quietly(alone.labels, judge=alone.judge_left), alone)
    three_each = mae(fit_quietly(overlap.labels), overlap)
    assert with_judge < 0.8 * counts_only
    assert three_each < 0.8 * counts_only


def test_overlap_finds_the_better_side_more_often_than_a_majority() -> None:
    sim = simulate_comparisons(60, 50, mu=0.6, population="mix", overlap_share=1.0, seed=8)
    est = fit_quietly(sim.labels)
    majority = sim.labels.assign(left=sim.labels["choice"] == "left").groupby("item_id")["left"].mean()
    majority_side = pd.Series(np.where(majority > 0.5, "left", "right"), index=majority.index)
    truth = sim.truth.reindex(est.labels_.index)
    assert (est.labels_ == truth).mean() > (majority_side.reindex(truth.index) == truth).mean()


@pytest.mark.parametrize("n_users, per_user", [(50, 10), (7, 11)])
def test_every_item_shared_works_when_the_choices_do_not_split_into_groups(n_users: int, per_user: int) -> None:
    # 500 choices in groups of 3 used to ask for 501 shared slots and fail in a reshape.
    sim = simulate_comparisons(n_users, per_user, overlap_share=1.0, overlap_size=3, seed=0)
    per_worker = sim.labels["worker_id"].value_counts()
    per_item = sim.labels.groupby("item_id")["worker_id"].agg(["size", "nunique"])
    assert len(sim.labels) == n_users * per_user and (per_worker == per_user).all()
    assert (per_item["size"] == per_item["nunique"]).all()  # nobody twice on an item
    assert (per_item["size"] == 3).sum() == (n_users * per_user) // 3


# -- the reference model and position bias ----------------------------------------------------------------------
def test_reference_is_the_model_with_the_higher_win_rate_unless_given() -> None:
    sim = simulate_comparisons(30, 20, mu=0.8, seed=9)
    assert fit_quietly(sim.labels).reference_ == "A"
    flipped = fit_quietly(sim.labels, reference="B")
    assert flipped.reference_ == "B" and flipped.mu_ < 0.5
    with pytest.raises(ValueError, match="reference model 'C' is not shown"):
        PairwiseAttentiveness(reference="C").fit(sim.labels)


def test_position_bias_catches_an_always_left_clicker() -> None:
    n_users = 40
    bias = np.full(n_users, 0.5)
    bias[:4] = 1.0
    sim = simulate_comparisons(n_users, 40, mu=0.8, overlap_share=0.5, position_bias=bias, seed=10)
    labels = sim.labels.copy()
    clickers = [f"u{i}" for i in range(4)]
    labels.loc[labels["worker_id"].isin(clickers), "choice"] = "left"  # attentive or not, always left
    est = fit_quietly(labels, estimate_position_bias=True)
    assert (est.position_bias_[clickers] > 0.9).all()
    others = est.eta_.drop(clickers)
    assert est.eta_[clickers].max() < others.median()
    assert_finite(est)


# -- bad input -------------------------------------------------------------------------------------------------
def small_table() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": ["t1", "t1", "t2", "t3", "t4", "t5", "t6", "", "t7"],
        "worker_id": ["u1", "u2", "u1", "u2", "u3", "u1", "u2", "u1", None],
        "choice": ["left", "RIGHT", "tie", "B", "", "left", "skip", "left", "left"],
        "model_left": ["A", "A", "A", "A", "A", "", "B", "A", "A"],
        "model_right": ["B", "B", "B", "B", "B", "B", "A", "B", "B"],
    })


def test_ties_skips_missing_ids_and_model_names_are_reported_not_fatal() -> None:
    est = fit_quietly(small_table())
    problems = " | ".join(est.problems_)
    assert "rows without item_id dropped (rows 7)" in problems
    assert "rows without worker_id dropped (rows 8)" in problems
    assert "rows skipped, field 'choice': tie or skip (rows 2, 6" in problems
    assert "rows skipped, field 'choice': empty choice (rows 4)" in problems
    assert "items without model_left/model_right: prior 1/2" in problems
    # "B" names the right-hand model of t3; a model name is a valid choice
    assert est.annotations_.loc[3, "choice"] == "right"
    assert set(est.posteriors_.index) == {"t1", "t3", "t5"}
    assert est.items_.loc["t5", "prior_source"] == "flat"
    assert_finite(est)


def test_repeated_choice_keeps_the_last_and_single_label_annotators_keep_the_prior() -> None:
    table = pd.DataFrame({"item_id": ["t1", "t1", "t2"], "worker_id": ["u1", "u1", "u2"],
                          "choice": ["left", "right", "left"], "model_left": "A", "model_right": "B"})
    est = fit_quietly(table, mu=0.7)
    assert list(est.annotations_.index) == [1, 2]
    assert any("repeated (item, annotator)" in p for p in est.problems_)
    # one label each: the posterior hardly leaves the Beta(8, 2) prior (mean 0.8)
    assert np.abs(est.eta_ - 0.8).max() < 0.03
    assert_finite(est)


def test_single_annotator_and_no_model_names_warn_and_stay_finite() -> None:
    table = pd.DataFrame({"item_id": [f"t{i}" for i in range(20)], "worker_id": "solo",
                          "choice": ["left"] * 15 + ["right"] * 5})
    with pytest.warns(IdentifiabilityWarning) as caught:
        est = PairwiseAttentiveness().fit(table)
    messages = " | ".join(str(w.message) for w in caught)
    assert "single annotator" in messages and "no item shows the reference model" in messages
    assert est.reference_ is None and est.mu_ == 0.5
    assert_finite(est)


def test_unusable_input_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"missing \['choice'\]"):
        PairwiseAttentiveness().fit(pd.DataFrame({"item_id": ["t"], "worker_id": ["u"]}))
    with pytest.raises(ValueError, match="every row was dropped"):
        PairwiseAttentiveness().fit(pd.DataFrame({"item_id": ["t"], "worker_id": ["u"], "choice": ["tie"]}))
    with pytest.raises(ValueError, match="a >= 1 and b >= 1"):
        PairwiseAttentiveness(a=0.5)
    with pytest.raises(ValueError, match="mu must be in"):
        PairwiseAttentiveness(mu=1.0)


def test_judge_entries_for_unknown_items_are_ignored_and_bad_values_refused() -> None:
    sim = simulate_comparisons(10, 10, mu=0.7, judge_signal=1.0, seed=11)
    judge = {**sim.judge_left.to_dict(), "nope": 0.9, "t0": None}
    est = fit_quietly(sim.labels, judge=judge)
    assert any("judge probabilities for 1 unknown items ignored (nope)" in p for p in est.problems_)
    assert est.items_.loc["t0", "prior_source"] == "mu"  # no probability for t0: it keeps mu
    with pytest.raises(ValueError, match="items t1 have 1.5"):
        PairwiseAttentiveness().fit(sim.labels, judge={"t1": 1.5})
    with pytest.raises(ValueError, match="items t1 have high"):
        PairwiseAttentiveness().fit(sim.labels, judge={"t1": "high"})
