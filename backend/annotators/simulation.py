"""Synthetic comparison data drawn from the attentiveness model, for tests and benchmarks.

The design follows the simulations of Cai and Li (2025): ``n_users`` annotators make ``n_per_user``
comparisons each between a reference model A and a model B; A's response is really better with
probability ``mu``; annotator u is attentive with probability ``eta_u``; an inattentive click lands on
the left with probability ``beta_u`` (1/2 unless ``position_bias`` is given). A's side is drawn per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

POPULATIONS = ("beta", "mix")


@dataclass
class SimulatedComparisons:
    labels: pd.DataFrame  # item_id, worker_id, choice, model_left, model_right
    eta: pd.Series  # true attentiveness by worker_id
    truth: pd.Series  # by item_id: "left" / "right", the really better side
    judge_left: pd.Series | None  # by item_id: the simulated judge's P(left better), when asked for


def draw_eta(rng: np.random.Generator, n_users: int, population: str, *, a: float = 8.0, b: float = 2.0,
             random_share: float = 0.2) -> np.ndarray:
    """``beta``: eta ~ Beta(a, b); ``mix``: the same, but a ``random_share`` of users click at random (eta=0)."""
    if population not in POPULATIONS:
        raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
    eta = rng.beta(a, b, n_users)
    if population == "mix":
        eta[rng.random(n_users) < random_share] = 0.0
    return eta


def _assignments(rng: np.random.Generator, n_users: int, n_per_user: int,
                 overlap_share: float, overlap_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(item, user) pairs: each user makes exactly ``n_per_user`` choices; ``overlap_share`` of the items
    get ``overlap_size`` distinct users, the rest one."""
    total = n_users * n_per_user
    n_items = int(round(total / (1 + overlap_share * (overlap_size - 1))))
    n_shared = int(round(overlap_share * n_items)) if n_users >= overlap_size and overlap_size > 1 else 0
    # Rounding can ask for more shared slots than there are choices (e.g. every item shared, 500 choices in
    # groups of 3): keep whole groups only; the choices left over are items with one annotator.
    n_shared = min(n_shared, total // max(overlap_size, 1))
    slots = rng.permutation(np.repeat(np.arange(n_users), n_per_user))
    shared = n_shared * overlap_size
    for _ in range(1000):  # swap a member of each group with a repeated user elsewhere until none is left
        groups = np.sort(slots[:shared].reshape(-1, overlap_size), axis=1)
        bad = np.flatnonzero((groups[:, 1:] == groups[:, :-1]).any(axis=1))
        if len(bad) == 0:
            break
        here = bad * overlap_size + rng.integers(0, overlap_size, len(bad))
        there = rng.integers(0, total, len(bad))
        for i, j in zip(here, there, strict=True):  # one swap at a time: a vectorised swap with repeated
            slots[i], slots[j] = slots[j], slots[i]  # positions is not a permutation (choices get lost)
    item = np.concatenate([np.repeat(np.arange(n_shared), overlap_size),
                           np.arange(n_shared, n_shared + total - shared)])
    return item, slots


def simulate_comparisons(
    n_users: int,
    n_per_user: int,
    *,
    mu: float = 0.7,
    population: str = "beta",
    overlap_share: float = 0.0,
    overlap_size: int = 3,
    judge_signal: float | None = None,
    position_bias: np.ndarray | None = None,
    seed: int = 0,
) -> SimulatedComparisons:
    """Draw comparisons from the model.

    ``judge_signal``: when given, a weak judge sees ``x ~ N(+signal, 1)`` when A is better and
    ``N(-signal, 1)`` otherwise and reports its calibrated ``P(A better | x)`` (1.0 is right ~84% of the
    time), turned into P(left better).
    """
    rng = np.random.default_rng(seed)
    eta = draw_eta(rng, n_users, population)
    item, user = _assignments(rng, n_users, n_per_user, overlap_share, overlap_size)
    n_items = int(item.max()) + 1
    a_better = rng.random(n_items) < mu
    a_left = rng.random(n_items) < 0.5
    truth_left = a_better == a_left
    beta = np.full(n_users, 0.5) if position_bias is None else np.asarray(position_bias, dtype=float)
    attentive = rng.random(len(item)) < eta[user]
    left = np.where(attentive, truth_left[item], rng.random(len(item)) < beta[user])
    names = np.array(["A", "B"])
    labels = pd.DataFrame({
        "item_id": [f"t{i}" for i in item],
        "worker_id": [f"u{u}" for u in user],
        "choice": np.where(left, "left", "right"),
        "model_left": names[np.where(a_left, 0, 1)][item],
        "model_right": names[np.where(a_left, 1, 0)][item],
    })
    item_ids = [f"t{i}" for i in range(n_items)]
    judge = None
    if judge_signal is not None:
        x = rng.normal(np.where(a_better, judge_signal, -judge_signal), 1.0)
        log_odds = np.log(mu / (1 - mu)) + 2 * judge_signal * x  # the likelihood ratio of the two normals
        p_a = 1 / (1 + np.exp(-log_odds))
        judge = pd.Series(np.where(a_left, p_a, 1 - p_a), index=item_ids, name="judge_left")
    return SimulatedComparisons(
        labels=labels,
        eta=pd.Series(eta, index=[f"u{u}" for u in range(n_users)], name="eta"),
        truth=pd.Series(np.where(truth_left, "left", "right"), index=item_ids, name="truth"),
        judge_left=judge,
    )


@dataclass
class SimulatedLabels:
    labels: pd.DataFrame  # item_id, worker_id, label
    truth: pd.Series  # by item_id
    accuracy: pd.Series  # each worker's expected accuracy, by worker_id


def simulate_crowd(
    n_items: int,
    n_workers: int,
    labels_per_item: int,
    *,
    n_classes: int = 3,
    kind: str = "one_coin",
    confuser_share: float = 0.6,
    seed: int = 0,
) -> SimulatedLabels:
    """Categorical crowd labels with ``labels_per_item`` distinct workers per item.

    ``one_coin``: worker u is attentive with eta_u ~ Beta(8, 2) and otherwise clicks from its own random
    distribution over the classes. ``class_biased``: a ``confuser_share`` of the workers answer class 1
    when the truth is 0 (probability 0.7) and are right otherwise (0.95); the others are right with
    probability 0.85 and err uniformly. Class frequencies are uniform.
    """
    if labels_per_item > n_workers:
        raise ValueError("labels_per_item cannot exceed n_workers")
    rng = np.random.default_rng(seed)
    k = n_classes
    truth = rng.integers(0, k, n_items)
    confusion = np.empty((n_workers, k, k))
    if kind == "one_coin":
        eta = rng.beta(8, 2, n_workers)
        click = rng.dirichlet(np.ones(k), n_workers)
        confusion[:] = eta[:, None, None] * np.eye(k) + (1 - eta)[:, None, None] * click[:, None, :]
    elif kind == "class_biased":
        honest = np.full((k, k), 0.15 / (k - 1)) + np.eye(k) * (0.85 - 0.15 / (k - 1))
        confuser = np.full((k, k), 0.05 / (k - 1)) + np.eye(k) * (0.95 - 0.05 / (k - 1))
        confuser[0] = 0.0
        confuser[0, 0], confuser[0, 1] = 0.3, 0.7
        confused = rng.random(n_workers) < confuser_share
        confusion[:] = np.where(confused[:, None, None], confuser[None], honest[None])
    else:
        raise ValueError(f"kind must be one_coin or class_biased, got {kind!r}")
    workers = np.argsort(rng.random((n_items, n_workers)), axis=1)[:, :labels_per_item]
    item = np.repeat(np.arange(n_items), labels_per_item)
    worker = workers.ravel()
    cumulative = confusion[worker, truth[item]].cumsum(axis=1)
    label = (rng.random(len(item))[:, None] > cumulative).sum(axis=1)
    class_share = np.full(k, 1 / k)
    accuracy = np.einsum("k,wkk->w", class_share, confusion)
    return SimulatedLabels(
        labels=pd.DataFrame({"item_id": [f"i{i}" for i in item], "worker_id": [f"w{w}" for w in worker],
                             "label": [f"c{c}" for c in label]}),
        truth=pd.Series([f"c{c}" for c in truth], index=[f"i{i}" for i in range(n_items)], name="truth"),
        accuracy=pd.Series(accuracy, index=[f"w{w}" for w in range(n_workers)], name="accuracy"),
    )


def simulate_detection(
    n_items: int,
    n_workers: int,
    labels_per_item: int | None = None,
    *,
    positive_share: float = 0.45,
    skill: tuple[float, float] = (0.1, 1.2),
    threshold: tuple[float, float] = (-1.0, 0.8),
    seed: int = 0,
) -> SimulatedLabels:
    """Binary labels from workers who threshold a noisy view of each item, in the manner of the
    signal-detection model of Welinder et al., "The multidimensional wisdom of crowds" (NeurIPS 2010).

    Item t has a signal ``s_t = +-g_t`` (sign = its class, ``g_t ~ Gamma(2, 0.7)``: some items are hard
    for everyone); worker u sees ``d_u s_t + N(0, 1)`` and says class 1 when it is above ``tau_u``, with
    skill ``d_u ~ U(skill)`` and threshold ``tau_u ~ N(threshold)``. The default thresholds lean to class
    1, so most workers are class-biased and majority vote is poor, as on small dense crowd sets of this
    kind (e.g. 108 items x 39 workers, every worker labelling every item). ``labels_per_item``: distinct
    workers per item (all of them by default). ``accuracy``: each worker's rate of agreeing with the
    truth in this draw.
    """
    per_item = n_workers if labels_per_item is None else labels_per_item
    if per_item > n_workers:
        raise ValueError("labels_per_item cannot exceed n_workers")
    rng = np.random.default_rng(seed)
    truth = (rng.random(n_items) < positive_share).astype(int)
    signal = rng.gamma(2.0, 0.7, n_items) * np.where(truth == 1, 1.0, -1.0)
    d = rng.uniform(*skill, n_workers)
    tau = rng.normal(*threshold, n_workers)
    seen = d[None, :] * signal[:, None] + rng.normal(0.0, 1.0, (n_items, n_workers))
    said = seen > tau[None, :]
    workers = np.argsort(rng.random((n_items, n_workers)), axis=1)[:, :per_item]
    item = np.repeat(np.arange(n_items), per_item)
    worker = workers.ravel()
    label = said[item, worker].astype(int)
    right = (label == truth[item]).astype(float)
    accuracy = np.bincount(worker, weights=right, minlength=n_workers) / np.maximum(
        np.bincount(worker, minlength=n_workers), 1)
    return SimulatedLabels(
        labels=pd.DataFrame({"item_id": [f"i{i}" for i in item], "worker_id": [f"w{w}" for w in worker],
                             "label": [f"c{c}" for c in label]}),
        truth=pd.Series([f"c{c}" for c in truth], index=[f"i{i}" for i in range(n_items)], name="truth"),
        accuracy=pd.Series(accuracy, index=[f"w{w}" for w in range(n_workers)], name="accuracy"),
    )
