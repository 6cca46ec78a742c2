"""Consensus labels and annotator quality for categorical crowd labels (``<Choices>`` projects).

Input: a long table ``item_id, worker_id, label``; several annotators per item make quality estimable.
Three models of how annotator u produces label ``l`` for an item whose true class is ``k``, each fitted
by EM to its maximum a posteriori (the penalised log-likelihood never decreases, ``loss_history_``):

* ``one_coin`` -- the attentive / inattentive model of :mod:`backend.annotators.attentiveness` for K classes:
  with probability ``eta_u`` ~ Beta(a, b) the annotator is attentive and gives ``k``; otherwise they click
  from their own distribution ``pi_u`` over the K classes (Dirichlet prior):
  ``P(l | k) = eta_u [l = k] + (1 - eta_u) pi_u(l)``. K parameters per annotator; an annotator who
  clicks "yes" by default is caught by ``pi_u``. (Cai and Li, "Users as Annotators", 2025, for the
  pairwise case.)
* ``dawid_skene`` -- a full confusion matrix per annotator, ``P(l | k) = Pi_u[k, l]``, with a Dirichlet
  prior on each row (Dawid and Skene, "Maximum likelihood estimation of observer error-rates using the
  EM algorithm", Applied Statistics 28(1), 1979). K(K-1) parameters per annotator: it captures errors
  that depend on the class (an annotator who confuses 2 with 3 but never 1), and overfits annotators
  with few labels.
* ``shrunk`` -- Dawid-Skene whose rows have a Dirichlet prior centred on the annotator's fitted one-coin
  matrix, with ``shrinkage`` pseudo-labels per row: the MAP row is ``(N_u[k] + lambda C_u[k]) /
  (n_u[k] + lambda)``, where ``N_u[k]`` counts the labels u gave to items of class k (in expectation) and
  ``C_u`` is the one-coin matrix. An annotator with few labels keeps the one-coin matrix, one with many
  gets a full confusion matrix. ``shrinkage=0`` is ``dawid_skene``, a very large one is ``one_coin``.
* ``auto`` picks the shrinkage per data set from a grid by held-out likelihood, and keeps the full
  Dawid-Skene matrix unless a more restricted candidate predicts held-out labels clearly better. Every
  label of an item with at least 3 labels is hidden once (``folds`` folds, each hiding about a
  ``1/folds`` share of every item's labels, so the item keeps labels to infer its class from); each
  candidate is fitted on the rest and scores ``log sum_k P(k | other labels) Pi_u[k, l]`` for each hidden
  label ``l`` of annotator ``u`` (with too few such items, the least-shrunk candidate is kept). With
  ``d_i`` the per-label score of a candidate minus that of the least-shrunk one, the candidate with the
  best mean is taken only when ``mean(d) > z * se(d)``, where ``se`` is the standard error of the mean
  clustered by item (labels of one item share its posterior): ``se = sqrt(n_items * var_t(sum of d over
  item t)) / n_labels``, ``z = selection_z``. No gold is used.
  Why not the plain maximum: on small sets (a hundred items) the differences between candidates are within
  their noise, while the cost of a wrong pick is not symmetric. A one-coin matrix (and a matrix shrunk
  towards it) that is wrong for class-biased annotators costs 5 to 25 points of consensus accuracy on the
  sets measured, and still predicts held-out labels about as well, because most labels are on items whose
  class every model gets right; the full matrix, when the one-coin one is right, costs 0 to 3.3 points
  (``docs/comparison-mode.md``, "Model choice").

Every model reports ``eta_``: for the one-coin model its ``eta``; for a confusion matrix the same
quantity read off it, ``sum_l rho_l (Pi[l, l] - mean_{j != l} Pi[j, l])`` (how much more often the
annotator gives l when it is true than when it is not; Youden's J for two classes), which equals
``eta`` exactly when the matrix has the one-coin form. ``accuracy_`` is ``sum_k rho_k Pi[k, k]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from backend.annotators.attentiveness import IdentifiabilityWarning, _examples, clean_text, repeated_pairs

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("item_id", "worker_id", "label")
MODELS = ("one_coin", "dawid_skene", "shrunk", "auto")
SHRINKAGE_GRID = (0.0, 2.0, 8.0, 32.0, np.inf)
_CLIP = 1e-9


@dataclass
class LabelData:
    """Categorical annotations coded as integers; one entry per kept (item, annotator) pair."""

    items: pd.Index
    workers: pd.Index
    classes: pd.Index  # sorted class names
    item: np.ndarray
    worker: np.ndarray
    label: np.ndarray
    rows: pd.Index
    problems: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def prepare_labels(df: pd.DataFrame, *, classes: Sequence[str] | None = None) -> LabelData:
    """Check and code a long table ``item_id, worker_id, label``.

    Rows without an item id, an annotator id or a label are dropped, as are labels outside ``classes``
    when it is given; problem messages name the rows. When an annotator labelled one item twice, the
    last row counts.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"labels need the columns {list(REQUIRED_COLUMNS)}; missing {missing}, "
                         f"found {list(df.columns)}")
    problems: list[str] = []
    columns = {c: clean_text(df[c]) for c in REQUIRED_COLUMNS}
    keep = np.ones(len(df), dtype=bool)
    for field, values in columns.items():
        empty = (values == "").to_numpy()
        if empty.any():
            problems.append(f"{int(empty.sum())} rows without {field} dropped (rows {_examples(df.index[empty])})")
        keep &= ~empty
    if classes is not None:
        unknown = keep & ~columns["label"].isin([str(c) for c in classes]).to_numpy()
        if unknown.any():
            problems.append(f"{int(unknown.sum())} rows with a label outside the label set dropped, field 'label' "
                            f"(rows {_examples(df.index[unknown])}; values "
                            f"{_examples(pd.unique(columns['label'][unknown]))})")
        keep &= ~unknown
    item_codes, items = pd.factorize(columns["item_id"][keep])
    worker_codes, workers = pd.factorize(columns["worker_id"][keep])
    class_names = sorted({str(c) for c in classes}) if classes is not None else None
    label_codes, label_names = pd.factorize(columns["label"][keep], sort=True)
    if class_names is not None:
        label_codes = pd.Index(class_names).get_indexer(label_names)[label_codes]
        label_names = pd.Index(class_names)
    rows = df.index[keep]
    repeated = repeated_pairs(item_codes, worker_codes, len(workers), rows, problems, what="labels")
    kept = ~repeated
    return LabelData(items=pd.Index(items, name="item_id"), workers=pd.Index(workers, name="worker_id"),
                     classes=pd.Index(label_names, name="label"), item=item_codes[kept].astype(np.int64),
                     worker=worker_codes[kept].astype(np.int64), label=label_codes[kept].astype(np.int64),
                     rows=rows[kept], problems=problems)


def vote_shares(data: LabelData) -> np.ndarray:
    """(n_items, K) share of each item's labels that went to each class."""
    counts = np.zeros((len(data.items), data.n_classes))
    np.add.at(counts, (data.item, data.label), 1.0)
    return counts / counts.sum(axis=1, keepdims=True)


def break_ties(shares: np.ndarray, class_frequency: np.ndarray) -> np.ndarray:
    """The class with the largest share per row; a tie goes to the class that is more frequent overall,
    then to the first class in sort order. Deterministic, unlike breaking ties by row order."""
    top = shares >= shares.max(axis=1, keepdims=True) - 1e-12
    # Rank classes by overall frequency (descending), then by position; pick the best-ranked tied class.
    rank = np.lexsort((np.arange(len(class_frequency)), -class_frequency))
    order = np.empty_like(rank)
    order[rank] = np.arange(len(rank))
    return np.where(top, order[None, :], len(rank)).argmin(axis=1)


class MajorityVote:
    """The most frequent label per item, ties broken deterministically (:func:`break_ties`).

    Learned: ``labels_``, ``posteriors_`` (vote shares), ``eta_`` (each annotator's agreement with the
    consensus), ``n_labels_``, ``problems_``.
    """

    def fit(self, df: pd.DataFrame) -> MajorityVote:
        data = prepare_labels(df)
        _require_rows(data)
        self.problems_ = data.problems
        shares = vote_shares(data)
        frequency = np.bincount(data.label, minlength=data.n_classes).astype(float)
        winner = break_ties(shares, frequency)
        self.classes_ = data.classes
        self.posteriors_ = pd.DataFrame(shares, index=data.items, columns=data.classes)
        self.labels_ = pd.Series(data.classes[winner], index=data.items, name="label")
        agree = (data.label == winner[data.item]).astype(float)
        n = np.bincount(data.worker, minlength=len(data.workers)).astype(float)
        self.n_labels_ = pd.Series(n.astype(np.int64), index=data.workers, name="n_labels")
        self.eta_ = pd.Series(np.bincount(data.worker, weights=agree, minlength=len(data.workers)) / n,
                              index=data.workers, name="eta")
        return self

    def fit_predict(self, df: pd.DataFrame) -> pd.Series:
        return self.fit(df).labels_


def _require_rows(data: LabelData) -> None:
    if len(data.item) == 0:
        raise ValueError("no usable label: every row was dropped (" + "; ".join(data.problems) + ")")


class CategoricalAttentiveness:
    """Consensus and annotator quality for K-class labels (module docstring: the models).

    Keyword-only parameters: ``model`` (``one_coin``, ``dawid_skene``, ``shrunk``, ``auto``); ``a``, ``b``
    the Beta prior of ``eta``; ``click_prior`` the Dirichlet pseudo-count per class of the inattentive click
    distribution; ``class_prior`` the Dirichlet pseudo-count per class of the class frequencies;
    ``confusion_prior`` = (diagonal, off-diagonal) pseudo-counts of each confusion row for
    ``dawid_skene`` (and under the shrinkage of ``shrunk``); ``shrinkage`` (pseudo-labels per row towards
    the one-coin matrix); ``shrinkage_grid``, ``folds``, ``selection_z`` (how many standard errors a
    candidate must beat the least-shrunk one by) and ``selection_items`` (a random sample of at most this
    many items is used to choose) for ``auto``; ``n_iter``, ``tol`` (on the penalised log-likelihood per
    label); ``seed`` (the folds and the sample).

    Learned: ``labels_``, ``posteriors_`` (items x classes), ``eta_``, ``accuracy_``, ``n_labels_``,
    ``confusion_`` (annotators x true x given), ``class_prior_``, ``model_`` and ``shrinkage_`` used,
    ``selection_`` (mean held-out log-likelihood per label, per shrinkage, for ``auto``), ``selection_se_``
    (per shrinkage: the standard error of its difference from the least-shrunk candidate), ``loss_history_``,
    ``n_iter_``, ``converged_``, ``problems_``, ``warnings_``.
    """

    def __init__(
        self,
        *,
        model: str = "auto",
        a: float = 8.0,
        b: float = 2.0,
        click_prior: float = 1.0,
        class_prior: float = 1.0,
        confusion_prior: tuple[float, float] = (1.0, 0.1),
        shrinkage: float = 8.0,
        shrinkage_grid: Sequence[float] = SHRINKAGE_GRID,
        folds: int = 5,
        selection_z: float = 3.0,
        selection_items: int = 20_000,
        n_iter: int = 500,
        tol: float = 1e-7,
        seed: int = 0,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if a < 1.0 or b < 1.0:
            raise ValueError(f"the Beta(a, b) prior of eta needs a >= 1 and b >= 1; got a={a}, b={b}")
        if click_prior < 0 or class_prior < 0 or min(confusion_prior) < 0 or shrinkage < 0:
            raise ValueError("prior pseudo-counts and shrinkage must be >= 0")
        if confusion_prior[1] <= 0:
            raise ValueError("the off-diagonal pseudo-count of confusion_prior must be > 0 (else log 0)")
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        if selection_z < 0:
            raise ValueError(f"selection_z must be >= 0, got {selection_z}")
        self.model = model
        self.a = a
        self.b = b
        self.click_prior = click_prior
        self.class_prior = class_prior
        self.confusion_prior = confusion_prior
        self.shrinkage = shrinkage
        self.shrinkage_grid = tuple(shrinkage_grid)
        self.folds = folds
        self.selection_z = selection_z
        self.selection_items = selection_items
        self.n_iter = n_iter
        self.tol = tol
        self.seed = seed

    # -- public API --------------------------------------------------------------------------------------
    def fit(self, df: pd.DataFrame, *, classes: Sequence[str] | None = None) -> CategoricalAttentiveness:
        data = prepare_labels(df, classes=classes)
        _require_rows(data)
        self.problems_ = list(data.problems)
        for problem in self.problems_:
            log.warning("%s", problem)
        self.warnings_ = self._check_identifiability(data)
        self.selection_: dict[float, float] = {}
        self.selection_se_: dict[float, float] = {}
        shrinkage = self._choose_shrinkage(data)
        fit = _fit(data, shrinkage, self._priors())
        self._store(data, fit, shrinkage)
        return self

    def fit_predict(self, df: pd.DataFrame, **kwargs) -> pd.Series:
        return self.fit(df, **kwargs).labels_

    def fit_predict_proba(self, df: pd.DataFrame, **kwargs) -> pd.DataFrame:
        return self.fit(df, **kwargs).posteriors_

    # -- model choice ------------------------------------------------------------------------------------
    def _priors(self) -> _Priors:
        return _Priors(a=self.a, b=self.b, click=self.click_prior, classes=self.class_prior,
                       diagonal=self.confusion_prior[0], off=self.confusion_prior[1], n_iter=self.n_iter,
                       tol=self.tol)

    def _choose_shrinkage(self, data: LabelData) -> float:
        fixed = {"one_coin": np.inf, "dawid_skene": 0.0, "shrunk": self.shrinkage}
        if self.model in fixed:
            return fixed[self.model]
        sample = _item_sample(data, self.selection_items, self.seed)
        folds = _held_out_folds(sample, self.folds, self.seed)
        reference = min(self.shrinkage_grid)  # the least restricted candidate, kept unless beaten clearly
        if folds is None:
            # No evidence either way: keep the candidate whose error is the smaller when it is the wrong one.
            log.warning("auto: too few items with 3 or more labels to compare models; using shrinkage %g",
                        reference)
            return reference
        # The comparison needs the ranking of the candidates, not converged digits: a looser tolerance.
        priors = self._priors()
        priors.tol = max(priors.tol, 1e-6)
        hidden = folds >= 0
        scores = {s: _held_out_scores(sample, folds, s, priors)[hidden] for s in self.shrinkage_grid}
        for shrinkage, score in scores.items():
            self.selection_[shrinkage] = float(score.mean())
            self.selection_se_[shrinkage] = _clustered_se(score - scores[reference], sample.item[hidden])
        best = max(self.selection_, key=lambda s: (self.selection_[s], s))
        gain = self.selection_[best] - self.selection_[reference]
        return best if gain > self.selection_z * self.selection_se_[best] else reference

    def _check_identifiability(self, data: LabelData) -> list[str]:
        per_item = np.bincount(data.item, minlength=len(data.items))
        messages = []
        if per_item.max() < 2:
            messages.append("every item has a single label: annotator quality is not identified (eta is the prior) "
                            "and the consensus is the label given")
        if len(data.workers) == 1:
            messages.append(f"a single annotator ({data.workers[0]!r}): nobody to compare with; eta is the prior")
        if data.n_classes == 1:
            messages.append(f"a single class ({data.classes[0]!r}) in the labels: nothing to estimate")
        for message in messages:
            warnings.warn(message, IdentifiabilityWarning, stacklevel=3)
        return messages

    # -- results -----------------------------------------------------------------------------------------
    def _store(self, data: LabelData, fit: _Fit, shrinkage: float) -> None:
        self.shrinkage_ = shrinkage
        self.model_ = "one_coin" if np.isinf(shrinkage) else ("dawid_skene" if shrinkage == 0 else "shrunk")
        self.classes_ = data.classes
        self.posteriors_ = pd.DataFrame(fit.posterior, index=data.items, columns=data.classes)
        frequency = np.bincount(data.label, minlength=data.n_classes).astype(float)
        self.labels_ = pd.Series(data.classes[break_ties(fit.posterior, frequency)], index=data.items, name="label")
        self.confusion_ = fit.confusion
        self.class_prior_ = pd.Series(fit.rho, index=data.classes, name="class_prior")
        self.n_labels_ = pd.Series(np.bincount(data.worker, minlength=len(data.workers)), index=data.workers,
                                   name="n_labels")
        eta = fit.eta if fit.eta is not None else _lift(fit.confusion, fit.rho)
        if data.n_classes == 1:
            eta = np.full(len(data.workers), self.a / (self.a + self.b))
        self.eta_ = pd.Series(np.clip(eta, 0.0, 1.0), index=data.workers, name="eta")
        accuracy = np.einsum("k,wkk->w", fit.rho, fit.confusion)
        self.accuracy_ = pd.Series(accuracy, index=data.workers, name="accuracy")
        self.loss_history_ = fit.history
        self.n_iter_ = len(fit.history)
        self.converged_ = fit.converged


def _lift(confusion: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """sum_l rho_l (Pi[l, l] - mean_{j != l} Pi[j, l]) per annotator: the one-coin eta of a confusion matrix."""
    k = confusion.shape[1]
    if k == 1:
        return np.zeros(confusion.shape[0])
    diagonal = np.einsum("wkk->wk", confusion)
    off_mean = (confusion.sum(axis=1) - diagonal) / (k - 1)  # column sums minus the diagonal
    return (diagonal - off_mean) @ rho


# -- EM ----------------------------------------------------------------------------------------------------
@dataclass
class _Priors:
    a: float
    b: float
    click: float
    classes: float
    diagonal: float
    off: float
    n_iter: int
    tol: float


@dataclass
class _Fit:
    posterior: np.ndarray  # (n_items, K)
    confusion: np.ndarray  # (n_workers, K, K): [true, given]
    rho: np.ndarray  # (K,)
    eta: np.ndarray | None  # one-coin eta when the model is one-coin
    history: list[float]
    converged: bool


class _Cells:
    """Annotations grouped by (annotator, given label): the likelihood of a label depends on nothing else."""

    def __init__(self, data: LabelData, mask: np.ndarray | None = None) -> None:
        keep = np.ones(len(data.item), bool) if mask is None else mask
        self.k = data.n_classes
        self.n_workers = len(data.workers)
        self.n_items = len(data.items)
        self.item = data.item[keep]
        self.label = data.label[keep]
        self.worker = data.worker[keep]
        self.cell = self.worker * self.k + self.label
        self.count = np.bincount(self.cell, minlength=self.n_workers * self.k).astype(float).reshape(-1, self.k)

    def item_log_likelihood(self, log_confusion: np.ndarray) -> np.ndarray:
        """(n_items, K): sum over each item's labels of log P(label | true class)."""
        # rows of the table: cell (worker, given) -> log P(given | true = k) for every k
        table = log_confusion.transpose(0, 2, 1).reshape(-1, self.k)
        per_label = table[self.cell]
        return np.stack([np.bincount(self.item, weights=per_label[:, k], minlength=self.n_items)
                         for k in range(self.k)], axis=1)

    def expected_counts(self, posterior: np.ndarray) -> np.ndarray:
        """(n_workers, K, K): expected number of labels ``given`` an annotator gave items of class ``true``."""
        per_label = posterior[self.item]
        by_cell = np.stack([np.bincount(self.cell, weights=per_label[:, k], minlength=self.n_workers * self.k)
                            for k in range(self.k)], axis=1)  # (cells, true)
        return by_cell.reshape(self.n_workers, self.k, self.k).transpose(0, 2, 1)


def _posterior(cells: _Cells, log_confusion: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, float]:
    joint = np.log(rho)[None, :] + cells.item_log_likelihood(log_confusion)
    norm = logsumexp(joint, axis=1)
    return np.exp(joint - norm[:, None]), float(norm.sum())


def _fit(data: LabelData, shrinkage: float, priors: _Priors, *, mask: np.ndarray | None = None) -> _Fit:
    """The one-coin fit, then (unless shrinkage is infinite) Dawid-Skene shrunk towards it."""
    cells = _Cells(data, mask)
    start = _start_posterior(cells)
    one_coin = _fit_one_coin(cells, start, priors)
    if np.isinf(shrinkage):
        return one_coin
    centre = one_coin.confusion if shrinkage > 0 else None
    return _fit_confusion(cells, one_coin.posterior if centre is not None else start, priors, shrinkage, centre)


def _start_posterior(cells: _Cells) -> np.ndarray:
    """Vote shares per item (uniform for items without labels in this subset)."""
    counts = np.zeros((cells.n_items, cells.k))
    np.add.at(counts, (cells.item, cells.label), 1.0)
    empty = counts.sum(axis=1) == 0
    counts[empty] = 1.0
    return counts / counts.sum(axis=1, keepdims=True)


def _class_prior(posterior: np.ndarray, strength: float) -> np.ndarray:
    return (posterior.sum(axis=0) + strength) / (len(posterior) + strength * posterior.shape[1])


def _one_coin_matrix(eta: np.ndarray, click: np.ndarray) -> np.ndarray:
    k = click.shape[1]
    return eta[:, None, None] * np.eye(k)[None] + (1 - eta)[:, None, None] * click[:, None, :]


def _fit_one_coin(cells: _Cells, posterior: np.ndarray, priors: _Priors) -> _Fit:
    k = cells.k
    n_per_worker = cells.count.sum(axis=1)
    history: list[float] = []
    converged = False
    for _ in range(priors.n_iter):
        # M-step
        rho = _class_prior(posterior, priors.classes)
        if len(history) == 0:
            eta = np.full(cells.n_workers, priors.a / (priors.a + priors.b))
            click = (cells.count + priors.click) / (n_per_worker[:, None] + priors.click * k)
        # The label l is attentive only if the truth is l: z = P(true = l) * eta / (eta + (1 - eta) pi(l)).
        same = np.bincount(cells.cell, weights=posterior[cells.item, cells.label],
                           minlength=cells.n_workers * k).reshape(-1, k)
        attentive = same * (eta[:, None] / (eta[:, None] + (1 - eta[:, None]) * click))
        eta = np.clip((attentive.sum(axis=1) + priors.a - 1) / (n_per_worker + priors.a + priors.b - 2),
                      _CLIP, 1 - _CLIP)
        inattentive = cells.count - attentive
        click = (inattentive + priors.click) / (inattentive.sum(axis=1, keepdims=True) + priors.click * k)
        # E-step and the penalised log-likelihood of these parameters
        confusion = _one_coin_matrix(eta, click)
        posterior, loglik = _posterior(cells, np.log(confusion), rho)
        penalty = ((priors.a - 1) * np.log(eta) + (priors.b - 1) * np.log1p(-eta)).sum()
        penalty += priors.click * np.log(click).sum() + priors.classes * np.log(rho).sum()
        history.append(loglik + float(penalty))
        if len(history) > 1 and (history[-1] - history[-2]) / max(len(cells.item), 1) < priors.tol:
            converged = True
            break
    return _Fit(posterior=posterior, confusion=confusion, rho=rho, eta=eta, history=history, converged=converged)


def _fit_confusion(cells: _Cells, posterior: np.ndarray, priors: _Priors, shrinkage: float,
                   centre: np.ndarray | None) -> _Fit:
    """Dawid-Skene MAP; row k of annotator u has Dirichlet pseudo-counts base + shrinkage * centre[u, k]."""
    k = cells.k
    pseudo = np.full((cells.n_workers, k, k), priors.off) + np.eye(k)[None] * priors.diagonal
    if centre is not None:
        pseudo = pseudo + shrinkage * centre
    history: list[float] = []
    converged = False
    for _ in range(priors.n_iter):
        rho = _class_prior(posterior, priors.classes)
        counts = cells.expected_counts(posterior) + pseudo
        confusion = counts / counts.sum(axis=2, keepdims=True)
        log_confusion = np.log(confusion)
        posterior, loglik = _posterior(cells, log_confusion, rho)
        penalty = (pseudo * log_confusion).sum() + priors.classes * np.log(rho).sum()
        history.append(loglik + float(penalty))
        if len(history) > 1 and (history[-1] - history[-2]) / max(len(cells.item), 1) < priors.tol:
            converged = True
            break
    return _Fit(posterior=posterior, confusion=confusion, rho=rho, eta=None, history=history, converged=converged)


# -- model choice by held-out likelihood ----------------------------------------------------------------------
def _held_out_folds(data: LabelData, folds: int, seed: int) -> np.ndarray | None:
    """Fold number per annotation (-1: never held out). Every label of an item with enough labels is held
    out once: the item's labels, in a random order, go to folds 0, 1, ..., folds - 1, 0, 1, ... An item
    is used when it keeps at least 2 labels while a fold is hidden (3 or more labels for 3 or more folds),
    so every hidden label is predicted from other labels of its item. Scoring every label, rather than one
    per item, is what keeps the comparison of models from being noise on a set of a hundred items."""
    per_item = np.bincount(data.item, minlength=len(data.items))
    eligible = (per_item - np.ceil(per_item / folds))[data.item] >= 2
    if eligible.sum() < 10 * folds:
        return None
    rng = np.random.default_rng(seed)
    # Within each item, number its labels in a random order; label j of an item goes to fold j mod folds.
    order = np.lexsort((rng.random(len(data.item)), data.item))
    rank = np.empty(len(order), dtype=np.int64)
    item_sorted = data.item[order]
    first = np.r_[0, np.flatnonzero(item_sorted[1:] != item_sorted[:-1]) + 1]
    starts = np.repeat(first, np.diff(np.r_[first, len(order)]))
    rank[order] = np.arange(len(order)) - starts
    return np.where(eligible, rank % folds, -1)


def _item_sample(data: LabelData, max_items: int, seed: int) -> LabelData:
    """At most ``max_items`` items (with all their labels), drawn at random, for choosing the model."""
    if len(data.items) <= max_items:
        return data
    chosen = np.zeros(len(data.items), bool)
    chosen[np.random.default_rng(seed).choice(len(data.items), max_items, replace=False)] = True
    keep = chosen[data.item]
    recode = np.cumsum(chosen) - 1
    return LabelData(items=data.items[chosen], workers=data.workers, classes=data.classes,
                     item=recode[data.item[keep]], worker=data.worker[keep], label=data.label[keep],
                     rows=data.rows[keep], problems=[])


def _held_out_scores(data: LabelData, folds: np.ndarray, shrinkage: float, priors: _Priors) -> np.ndarray:
    """Per annotation: the log-probability of its label under the fit on the other folds (NaN if never hidden)."""
    scores = np.full(len(data.item), np.nan)
    for fold in range(folds.max() + 1):
        hidden = folds == fold
        if not hidden.any():
            continue
        fit = _fit(data, shrinkage, priors, mask=~hidden)
        # P(label | the item's other labels) = sum_k P(k | others) Pi_u[k, label]
        predicted = np.einsum("nk,nk->n", fit.posterior[data.item[hidden]],
                              fit.confusion[data.worker[hidden], :, data.label[hidden]])
        scores[hidden] = np.log(np.maximum(predicted, 1e-300))
    return scores


def _clustered_se(difference: np.ndarray, item: np.ndarray) -> float:
    """Standard error of ``difference.mean()`` when labels of one item are dependent and items are not."""
    per_item = np.bincount(item, weights=difference)[np.bincount(item) > 0]
    if len(per_item) < 2:
        return float("inf")
    return float(per_item.std(ddof=1) * np.sqrt(len(per_item)) / len(difference))
