"""The calibrator, its fallback, the review threshold and the metrics.

Pairs are simulated from a known truth: each item's P(right) is the prior's probability moved by a chosen
shift and by a signal the prior ignores, and its outcome is drawn from it. So a test can say what a good
calibrator must recover without fixing any number the code computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from backend.confidence.calibration import (
    Calibrator,
    brier_score,
    effort_curve,
    error_detection_auroc,
    expected_calibration_error,
    fit_calibrator,
    log_loss,
    plot_reliability,
    prior_log_odds,
    random_review_accuracy,
    reliability_table,
    reviewed_pairs,
    selective_accuracy,
    threshold_for_precision,
)

NAMES = ["encoder_logit", "anchor_similarity", "backs_zero_shot"]


def simulate(n: int, *, shift: float = 0.0, extra: float = 0.0, seed: int = 0):
    """Signals, outcomes and true P(right): logit P = prior + shift + extra * (+1 if backed else -1)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(1.2, 1.5, n), rng.uniform(0.4, 0.95, n), rng.random(n) < 0.6]).astype(float)
    truth = expit(prior_log_odds(X, NAMES) + shift + extra * (2 * X[:, 2] - 1))
    return X, rng.random(n) < truth, truth


def prior_probability(X: np.ndarray) -> np.ndarray:
    return expit(prior_log_odds(X, NAMES))


# -- fallback ----------------------------------------------------------------------------------------------


def test_no_pairs_gives_the_prior_and_says_so() -> None:
    X, _, _ = simulate(50)
    cal = Calibrator().fit(np.zeros((0, 3)), [], feature_names=NAMES)
    assert cal.fallback_ and cal.method_ == "prior"
    assert "no reviewed items" in cal.message_
    assert cal.predict_proba(X) == pytest.approx(np.clip(prior_probability(X), 1e-4, 1 - 1e-4))


def test_few_pairs_shift_the_prior_towards_the_reviews() -> None:
    X, y, _ = simulate(12, shift=3.0, seed=1)  # a world where labels are right far more often than the prior says
    held, _, _ = simulate(200, seed=2)
    cal = Calibrator().fit(X, y, feature_names=NAMES)
    assert cal.fallback_ and "12 reviewed items" in cal.message_
    moved, prior = cal.predict_proba(held), prior_probability(held)
    assert np.all(moved >= prior - 1e-12) and moved.mean() > prior.mean()
    # Ranking is the prior's: the shift is the same for every item.
    assert np.array_equal(np.argsort(moved, kind="stable"), np.argsort(prior, kind="stable"))


@pytest.mark.parametrize("outcome", [True, False])
def test_a_single_class_among_the_pairs_falls_back_without_nan(outcome: bool) -> None:
    X, _, _ = simulate(40, seed=3)
    cal = Calibrator().fit(X, [outcome] * 40, feature_names=NAMES)
    word = "right" if outcome else "wrong"
    assert cal.fallback_ and f"all 40 reviewed labels were {word}" in cal.message_
    p = cal.predict_proba(X)
    assert np.all((p > 0) & (p < 1))
    assert (p.mean() > prior_probability(X).mean()) == outcome


def test_too_few_of_one_class_falls_back() -> None:
    X, _, _ = simulate(40, seed=4)
    y = np.ones(40, bool)
    y[:2] = False
    cal = Calibrator(min_per_class=3).fit(X, y, feature_names=NAMES)
    assert cal.fallback_ and "only 2 of 40 reviewed labels were wrong" in cal.message_


# -- learning from enough pairs ----------------------------------------------------------------------------


def test_a_miscalibrated_prior_is_corrected_by_enough_pairs() -> None:
    X, y, _ = simulate(400, shift=-1.5, seed=5)
    held_X, held_y, truth = simulate(6000, shift=-1.5, seed=6)
    cal = Calibrator().fit(X, y, feature_names=NAMES)
    assert not cal.fallback_ and set(cal.cv_log_loss_) == {"prior", "platt", "isotonic", "logistic(C=0.1)",
                                                             "logistic(C=1)"}
    p = cal.predict_proba(held_X)
    prior = prior_probability(held_X)
    assert expected_calibration_error(p, held_y) < expected_calibration_error(prior, held_y) / 2
    assert log_loss(p, held_y) < log_loss(prior, held_y)
    assert np.abs(p - truth).mean() < 0.05
    assert cal.oof_ is not None and len(cal.oof_) == 400


def test_a_signal_the_prior_ignores_is_learnt_by_the_logistic_model() -> None:
    X, y, _ = simulate(600, extra=1.5, seed=7)
    held_X, held_y, _ = simulate(6000, extra=1.5, seed=8)
    cal = Calibrator().fit(X, y, feature_names=NAMES)
    assert cal.method_.startswith("logistic")
    p = cal.predict_proba(held_X)
    assert error_detection_auroc(p, held_y) > error_detection_auroc(prior_probability(held_X), held_y) + 0.03


def test_constant_columns_are_ignored() -> None:
    X, y, _ = simulate(300, extra=1.0, seed=9)
    X_const = np.column_stack([X, np.ones(len(X))])
    cal = Calibrator(methods=["logistic"]).fit(X_const, y, feature_names=[*NAMES, "llm_zero_shot_p_missing"])
    assert "llm_zero_shot_p_missing" not in cal.params_["features"]
    assert np.isfinite(cal.predict_proba(X_const)).all()


def test_the_runs_own_prior_is_the_base_and_not_a_second_feature() -> None:
    X, y, _ = simulate(300, extra=1.0, seed=12)
    own = -1.0 + 0.5 * X[:, :1]  # the prior_logit column: some run's rescaled mapping
    names = ["prior_logit", *NAMES]
    X_own = np.column_stack([own, X])
    assert prior_log_odds(X_own, names) == pytest.approx(own[:, 0])
    cal = Calibrator(methods=["logistic"]).fit(X_own, y, feature_names=names)
    assert "prior_logit" not in cal.params_["features"]
    fallback = Calibrator().fit(X_own[:5], y[:5], feature_names=names)
    assert fallback.fallback_
    assert fallback.predict_proba(X_own[:3]) == pytest.approx(expit(own[:3, 0] + fallback.params_["shift"]), abs=1e-4)


def test_state_round_trips_through_json() -> None:
    X, y, _ = simulate(300, extra=1.0, seed=10)
    cal = Calibrator().fit(X, y, feature_names=NAMES)
    again = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.predict_proba(X) == pytest.approx(cal.predict_proba(X))
    assert again.method_ == cal.method_ and again.message_ == cal.message_


# -- records -----------------------------------------------------------------------------------------------


def records_for(X: np.ndarray, y: np.ndarray) -> tuple[list[dict], list[str | None]]:
    records = [{"text": f"t{i}", "label": "a", "stage": "encoder_only", "encoder_label": "a",
                "encoder_probability": float(expit(x[0])), "anchor_similarity": float(x[1])}
               for i, x in enumerate(X)]
    return records, ["a" if ok else "b" for ok in y]


def test_fit_and_score_records_with_unreviewed_and_skipped_rows() -> None:
    X, y, _ = simulate(60, seed=11)
    records, human = records_for(X, y)
    human[:10] = [None] * 10  # not reviewed
    records.append({"text": "", "label": None, "stage": "skipped"})
    human.append("a")  # a human label for a skipped row cannot say whether a prediction was right
    rows, correct = reviewed_pairs(records, human)
    assert rows.tolist() == list(range(10, 60)) and correct.tolist() == y[10:].tolist()
    cal = fit_calibrator(records, human)
    assert cal.n_pairs_ == 50
    scores = cal.predict_records(records)
    assert scores[-1] == 0.0 and np.all((scores[:-1] > 0) & (scores[:-1] < 1))


def test_record_inputs_are_checked() -> None:
    X, y, _ = simulate(5)
    records, human = records_for(X, y)
    with pytest.raises(ValueError, match="5 records but 4 human labels"):
        fit_calibrator(records, human[:4])
    with pytest.raises(ValueError, match="row 2"):
        fit_calibrator(records, [*human[:2], 3, *human[3:]])


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.array([[1.0, np.nan, 0.0]]), [True], "'anchor_similarity' of row 0"),
        (np.zeros((2, 2)), [True, False], r"\(n_items, 3\)"),
        (np.zeros((2, 3)), [1, 2], "booleans"),
        (np.zeros((2, 3)), [True], "one value per row"),
    ],
)
def test_bad_arrays_are_refused_with_a_clear_message(X, y, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Calibrator().fit(X, y, feature_names=NAMES)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"methods": ["magic"]}, "methods"), ({"C": -1}, "C must"), ({"min_pairs": 1}, "min_pairs"),
     ({"shift_scale": 0}, "shift_scale"), ({"selection": "best"}, "selection")],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Calibrator(**options)


def test_an_unfitted_calibrator_says_so() -> None:
    with pytest.raises(ValueError, match="not fitted"):
        Calibrator().predict_proba(np.zeros((1, 3)))


# -- threshold ---------------------------------------------------------------------------------------------


def brute_force_threshold(p: np.ndarray, target: float) -> float:
    ok = [t for t in np.unique(p) if p[p >= t].mean() >= target - 1e-12]  # the same float tolerance
    return float(min(ok)) if ok else 1.0


@pytest.mark.parametrize("seed", range(5))
def test_threshold_matches_its_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.beta(4, 1.5, 300), 2)  # rounded: many ties
    for target in (0.6, 0.8, 0.9, 0.95, 0.99):
        assert threshold_for_precision(p, target) == brute_force_threshold(p, target)


def test_threshold_on_calibrated_scores_meets_the_precision_it_promises() -> None:
    _, y, truth = simulate(20000, seed=12)
    for target in (0.85, 0.95):
        t = threshold_for_precision(truth, target)
        accepted = truth >= t
        assert abs(y[accepted].mean() - target) < 0.02
        assert accepted.mean() > 0.05  # and it accepts something


def test_threshold_edge_cases() -> None:
    assert threshold_for_precision([0.5, 0.6], 0.99) == 1.0  # unreachable: flag everything
    assert threshold_for_precision([], 0.9) == 1.0
    assert threshold_for_precision([0.97, 0.99], 0.9) == 0.97  # everything may be accepted
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="target_precision"):
            threshold_for_precision([0.5], bad)
    with pytest.raises(ValueError, match="probabilities"):
        threshold_for_precision([0.5, float("nan")], 0.9)


# -- metrics -----------------------------------------------------------------------------------------------


def test_metrics_against_independent_computations() -> None:
    X, y, truth = simulate(3000, seed=13)
    p = np.clip(truth + np.random.default_rng(14).normal(0, 0.05, len(truth)), 0, 1)
    assert error_detection_auroc(p, y) == pytest.approx(roc_auc_score(y, p))
    assert brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2))
    ece = 0.0
    for b in range(10):
        in_bin = (p >= b / 10) & ((p < (b + 1) / 10) if b < 9 else (p <= 1))
        if in_bin.any():
            ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    assert expected_calibration_error(p, y) == pytest.approx(ece)
    assert sum(b["n"] for b in reliability_table(p, y)) == len(p)


def test_auroc_is_undefined_for_a_single_class() -> None:
    assert error_detection_auroc([0.2, 0.9], [True, True]) is None


def test_effort_curve_with_a_perfect_and_a_useless_order() -> None:
    y = np.array([True] * 80 + [False] * 20)
    perfect = effort_curve(y.astype(float), y)  # every wrong label scores lowest
    assert perfect == {x: pytest.approx(min(1.0, 0.8 + x)) for x in (0.0, 0.05, 0.1, 0.2, 0.3)}
    inverted = effort_curve((~y).astype(float), y)  # reviewers see only right labels first
    assert inverted[0.1] == pytest.approx(0.8)
    assert random_review_accuracy(y)[0.2] == pytest.approx(0.8 + 0.2 * 0.2)
    assert selective_accuracy(y.astype(float), y, coverage=0.5) == 1.0


def test_reliability_diagram_is_a_png(tmp_path: Path) -> None:
    _, y, truth = simulate(500, seed=15)
    path = plot_reliability(truth, y, tmp_path / "plots" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        plot_reliability([], [], tmp_path / "empty.png")
