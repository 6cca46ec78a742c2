"""HCC: heterogeneous views of each item (an encoder over the team's anchors, an LLM) and how they combine.

The default (``combine="pool"``) makes every view earn its place on the anchors. Each anchor is classified
by the anchors of the other folds, which fits the encoder's temperature (on the anchors a trained encoder
never saw, when there are enough of them); the LLM is asked about the anchors
the encoder is unsure of, to choose among their best out-of-fold candidates; a log-linear pool of the views
(:mod:`backend.labelling.combination`) is fitted on those answers and kept only if it predicts the held-out
anchors' labels better than the encoder alone. Unlabelled items are then asked only where the encoder is
unsure, and only if the LLM was kept; each gets the pooled label and the probability that it is right.
Items where the views agree are ``consistent``, where they disagree ``combined``, the rest ``encoder_only``.

The paper's recipe (``combine="dcca"``): Chen et al., "Verification and Co-Alignment via Heterogeneous
Consistency for Preference-Aligned LLM Annotations", ICLR 2026. Each item gets
labels from annotators that fail differently: the encoder's class-cluster label (k-NN over human
anchors) and the LLM's zero-shot and hinted labels. Items where all agree form the consistent set C, the
rest the inconsistent set I; CAI = |C| / (|I| + eps) is a reference-free reliability signal. DCCA
relabels I by rounds of MV-VTES (k-NN majority voting): round 1 votes over C u H (H = human anchors);
an item whose vote equals one of its own labels is resolved (C_I), the rest vote again over
C u C_I u H. Items still unresolved after the last round keep the last vote (or the encoder's label)
and are the first a human should review.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import log_softmax

from backend.confidence.prior import PriorMapping, fit_elicited, fit_prior, prior_features
from backend.config import LLM_VIEWS
from backend.labelling.anchors import (
    AUTO,
    CLASSIFIERS,
    ClassifierChoice,
    ClassScores,
    CrossCheck,
    Vote,
    choose_classifier,
    class_scores,
    cross_check_anchors,
    knn_vote,
    nearest_of_label,
    with_prototypes,
)
from backend.labelling.combination import (
    MIN_POOL_ANCHORS,
    LogLinearPool,
    PoolFit,
    candidate_features,
    compare_pools,
    top_candidates,
)
from backend.labelling.encoder import text_key
from backend.labelling.llm import LLMAnswer
from backend.labelling.transductive import GATE_Z, MIN_ITEMS, Refinement, fit_refinement

log = logging.getLogger(__name__)

INVALID = -1
_NO_ANSWER = LLMAnswer(label=None, valid=False)  # a view that was not asked, in a DCCA re-vote
UNRESOLVED_POLICIES = ("vote", "encoder", "llm")
#: How the views' labels become one: ``pool`` weighs each view by what the anchors prove
#: (:mod:`backend.labelling.combination`); ``dcca`` is the paper's consistency split and DCCA re-vote.
COMBINERS = ("pool", "dcca")
VOTE_METHODS = ("knn", *CLASSIFIERS)


def consistent_mask(view_labels: np.ndarray) -> np.ndarray:
    """Items whose views all gave the same valid label. ``view_labels`` is ``(n, n_views)``."""
    view_labels = np.asarray(view_labels)
    if view_labels.ndim != 2 or view_labels.shape[1] == 0:
        raise ValueError("view_labels must be (n_items, n_views) with at least one view")
    valid = (view_labels != INVALID).all(axis=1)
    same = (view_labels == view_labels[:, :1]).all(axis=1)
    return valid & same


def cai(n_consistent: int, n_inconsistent: int, eps: float = 1e-6) -> float:
    """Consistency-agreement index CAI = |C| / (|I| + eps)."""
    return float(n_consistent) / (float(n_inconsistent) + eps)


@dataclass
class DCCAResult:
    labels: np.ndarray  # (n,) final class per item
    stages: list[str]  # "consistent", "round1".."roundR", "unresolved"
    votes: np.ndarray  # (rounds, n) vote per round, -1 where the item did not vote
    shares: np.ndarray  # (rounds, n) winner's share of the vote


def dcca(
    embeddings: np.ndarray,
    view_labels: np.ndarray,
    anchor_vectors: np.ndarray,
    anchor_labels: np.ndarray,
    *,
    k: int = 5,
    rounds: int = 2,
    weighted: bool = False,
    unresolved: str = "vote",
    vote_method: str = "knn",
    n_classes: int | None = None,
) -> DCCAResult:
    """Relabel the inconsistent items by rounds of k-NN voting over the growing reference set.

    ``vote_method='knn'`` is the paper's MV-VTES (majority of the ``k`` nearest references). A class
    classifier name (``centroid``, ``topk_mean``, ``ensemble``) instead scores each class over the whole
    reference set, which uses every consistent item rather than ``k`` of them; the vote's share is then
    still the share of the ``k`` nearest references that carry the winning label.

    ``view_labels[:, 0]`` is the encoder's label and ``view_labels[:, -1]`` the last LLM view's. Items no
    round resolves take the last vote (``unresolved='vote'``), the encoder's label (``'encoder'``) or the
    last view's label (``'llm'``); an invalid choice falls back to the vote, then the encoder.
    """
    if unresolved not in UNRESOLVED_POLICIES:
        raise ValueError(f"unresolved must be one of {UNRESOLVED_POLICIES}")
    if vote_method not in VOTE_METHODS:
        raise ValueError(f"vote_method must be one of {VOTE_METHODS}, got {vote_method!r}")
    n = len(view_labels)
    agree = consistent_mask(view_labels) if n else np.zeros(0, bool)
    labels = np.where(agree, view_labels[:, 0], INVALID).astype(np.int64) if n else np.zeros(0, np.int64)
    stages = ["consistent" if a else "unresolved" for a in agree]
    votes = np.full((rounds, n), INVALID, np.int64)
    shares = np.zeros((rounds, n), np.float32)
    resolved = agree.copy()
    pending = np.flatnonzero(~agree)
    for r in range(rounds):
        if len(pending) == 0:
            break
        ref_items = np.flatnonzero(resolved)
        ref_vecs = np.vstack([anchor_vectors, embeddings[ref_items]]) if len(ref_items) else anchor_vectors
        ref_labels = np.concatenate([anchor_labels, labels[ref_items]])
        vote = _round_vote(embeddings[pending], ref_vecs, ref_labels, method=vote_method, k=k,
                           weighted=weighted, n_classes=n_classes)
        votes[r, pending] = vote.labels
        shares[r, pending] = vote.shares
        own = (view_labels[pending] == vote.labels[:, None]) & (vote.labels[:, None] != INVALID)
        hit = own.any(axis=1)
        newly = pending[hit]
        labels[newly] = vote.labels[hit]
        resolved[newly] = True  # C_I joins the reference set of the next round
        for i in newly:
            stages[i] = f"round{r + 1}"
        pending = pending[~hit]
    for i in pending:
        last = next((votes[r, i] for r in range(rounds - 1, -1, -1) if votes[r, i] != INVALID), INVALID)
        preferred = {"vote": last, "encoder": view_labels[i, 0], "llm": view_labels[i, -1]}[unresolved]
        for choice in (preferred, last, view_labels[i, 0]):
            if choice != INVALID:
                labels[i] = choice
                break
    return DCCAResult(labels=labels, stages=stages, votes=votes, shares=shares)


def _round_vote(queries, ref_vecs, ref_labels, *, method, k, weighted, n_classes) -> Vote:
    neighbourhood = knn_vote(queries, ref_vecs, ref_labels, k=k, weighted=weighted)
    if method == "knn":
        return neighbourhood
    n_classes = n_classes or int(ref_labels.max()) + 1
    scored = class_scores(queries, ref_vecs, ref_labels, n_classes, k=k, method=method)
    near = np.where(neighbourhood.neighbours >= 0, ref_labels[neighbourhood.neighbours], INVALID)
    valid = (neighbourhood.neighbours >= 0).sum(axis=1)
    shares = ((near == scored.labels[:, None]).sum(axis=1) / np.maximum(valid, 1)).astype(np.float32)
    return Vote(scored.labels, shares, neighbourhood.neighbours)


def stored_answers(records: Sequence[dict[str, Any]], views: Iterable[str]) -> dict[str, list[LLMAnswer]]:
    """Rebuild each view's LLM answers from stored records, so a re-vote needs no LLM call."""
    answers: dict[str, list[LLMAnswer]] = {}
    for view in views:
        answers[view] = [
            LLMAnswer(label=r.get(f"llm_{view}"), valid=r.get(f"llm_{view}") is not None,
                      raw=r.get(f"llm_{view}_raw", ""), probability=r.get(f"llm_{view}_probability"),
                      error=r.get(f"llm_{view}_error"), cached=True,
                      distribution=r.get(f"llm_{view}_distribution"))
            if f"llm_{view}" in r or f"llm_{view}_error" in r else None  # None: the view was not asked
            for r in records
        ]
    return answers


@dataclass
class HCCConfig:
    """Settings of the pipeline. The default pools the encoder with the LLM's choice among the encoder's top
    candidates, each weighed by what the anchors prove (``combine="pool"``, docs/benchmarks.md). The paper's
    recipe is ``HCCConfig(combine="dcca", llm_views=("zero_shot", "hinted"), classifier="topk_mean",
    vote_method="knn", unresolved="vote")``; the DCCA settings (``vote_*``, ``rounds``, ``unresolved``) are
    the Banking77 ablation's winners and apply to ``combine="dcca"`` only."""

    k: int = 3  # anchors per class in the class-cluster score AS(e, C_j)
    # auto: centroid or ensemble, whichever the anchors prove (anchors.choose_classifier); or one of them,
    # or topk_mean (the paper's AS)
    classifier: str = AUTO
    vote_k: int = 5  # neighbours in each MV-VTES round
    vote_method: str = "centroid"  # class centroids over anchors + resolved items; knn = the paper's MV-VTES
    rounds: int = 2
    weighted_vote: bool = False
    unresolved: str = "encoder"  # label of items no round resolves: encoder, vote or llm
    llm_views: tuple[str, ...] = ("choice",)
    few_shot_examples: int = 8  # retrieved anchors shown in the few-shot view
    candidates: int = 0  # >0: the few-shot view may only answer one of the encoder's top classes
    adapt_prior: bool = True  # rescale the prior mapping on cross-checked anchors (backend/confidence/prior.py)
    eps: float = 1e-6
    combine: str = "pool"  # pool: views weighed by the anchors' evidence; dcca: the paper's consistency + DCCA
    choice_candidates: int = 5  # pool: the encoder's top classes the choice view chooses among
    llm_gate: float = 0.95  # pool: ask the LLM only where the encoder's calibrated P(top label) is below this
    anchor_llm_cap: int = 100  # pool: at most this many anchors are asked to weigh the views
    pool_l2: float = 1.0  # pool: L2 pull of the view weights toward (encoder 1, LLM views 0)
    choice_examples: bool = False  # pool: show each candidate by its anchor nearest to the text
    label_prototypes: bool = True  # a label without anchors is scored by its embedded name (and description)
    # Centroids refined on the unlabelled items of a large run, where the anchors show that it helps
    # (backend/labelling/transductive.py); the centroid classifier only.
    transductive: bool = True
    # The label-free stage of the prior (backend/confidence/prior.py: fit_elicited): off, because over five
    # anchor draws of the four ClusterLLM sets it did not beat the packaged mapping (docs/calibration.md).
    label_free_prior: bool = False

    def validate(self) -> None:
        for view in self.llm_views:
            if view not in LLM_VIEWS:
                raise ValueError(f"unknown LLM view {view!r}; choose from {', '.join(LLM_VIEWS)}")
        if self.k < 1 or self.vote_k < 1 or self.rounds < 0:
            raise ValueError("k and vote_k must be >= 1 and rounds >= 0")
        # Fail when the pipeline is built: a bad `unresolved` would otherwise surface after every LLM call.
        if self.classifier not in (AUTO, *CLASSIFIERS):
            raise ValueError(f"unknown classifier {self.classifier!r}; choose from {AUTO}, {', '.join(CLASSIFIERS)}")
        if self.unresolved not in UNRESOLVED_POLICIES:
            raise ValueError(f"unresolved must be one of {', '.join(UNRESOLVED_POLICIES)}")
        if self.vote_method not in VOTE_METHODS:
            raise ValueError(f"vote_method must be one of {', '.join(VOTE_METHODS)}")
        if self.combine not in COMBINERS:
            raise ValueError(f"combine must be one of {', '.join(COMBINERS)}, got {self.combine!r}")
        if self.combine == "dcca" and "choice" in self.llm_views:
            raise ValueError("the choice view needs combine='pool'")
        if self.combine == "pool" and "few_shot" in self.llm_views:
            raise ValueError("the few_shot view cannot be pooled; use choice, zero_shot or hinted")
        if self.choice_candidates < 2 or not 0.0 <= self.llm_gate <= 1.0:
            raise ValueError("choice_candidates must be >= 2 and llm_gate in [0, 1]")
        check_anchor_llm_cap(self.anchor_llm_cap)


def check_anchor_llm_cap(cap: int, name: str = "anchor_llm_cap") -> None:
    """Refuse a cap on the anchors asked that could never weigh the LLM views (``name``: as the user set it)."""
    if not (cap == 0 or cap >= MIN_POOL_ANCHORS):
        # fewer anchors than the pool needs would spend LLM calls that can never earn the view a weight
        raise ValueError(f"{name} must be 0 (never weigh the LLM views) or at least {MIN_POOL_ANCHORS} "
                         f"(the anchors needed to weigh them), got {cap}")


@dataclass
class HCCResult:
    records: list[dict[str, Any]]
    report: dict[str, Any]
    final_labels: np.ndarray = field(repr=False, default=None)


class HCCPipeline:
    """Encoder + LLM views -> pooled by the anchors' evidence (or consistency split -> DCCA), over plain texts
    and labels. ``llm=None`` runs the encoder alone (stage ``encoder_only``). ``descriptions`` (label ->
    text) join the labels' names wherever a label is embedded or shown; default: the LLM annotator's.
    """

    def __init__(self, encoder, labels: Sequence[str], *, llm=None, config: HCCConfig | None = None,
                 second_encoder=None, descriptions: dict[str, str] | None = None) -> None:
        self.encoder = encoder
        self.labels = list(labels)
        self.index_of = {label: i for i, label in enumerate(self.labels)}
        self.llm = llm
        self.config = config or HCCConfig()
        self.config.validate()
        self.anchor_texts: list[str] = []
        self.anchor_vectors = np.zeros((0, 0), np.float32)
        self.anchor_labels = np.zeros(0, np.int64)
        self.anchor_cross_check = np.zeros(0, bool)
        self.second_encoder = second_encoder
        self.anchor_vectors2 = np.zeros((0, 0), np.float32)
        self._prior: PriorMapping | None = None
        self._elicited: PriorMapping | None = None  # the label-free estimator, kept across anchor changes
        self.descriptions = dict(descriptions if descriptions is not None else getattr(llm, "descriptions", {}) or {})
        self._check: CrossCheck | None = None
        self._evidence: Evidence | None = None
        self._last_pool: PoolFit | None = None  # kept across anchor changes for re-votes that may not call
        self._refinement: Refinement | None = None  # fitted on the first large run after the anchors changed
        self._choice: ClassifierChoice | None = None  # classifier="auto": made once per anchor set

    def set_anchors(self, texts: Sequence[str], labels: Sequence[str], *,
                    cross_check: Sequence[bool] | None = None) -> None:
        """Replace the anchors. ``cross_check`` marks the anchors the prior mapping may be fitted on (default
        all): leave out those a human labelled *because* the review order put them first, a sample of hard
        items that the calibrator already learns from as (prediction, human label) pairs."""
        if cross_check is not None and len(cross_check) != len(texts):
            raise ValueError(f"{len(texts)} anchors but {len(cross_check)} cross_check flags")
        unknown = sorted({lab for lab in labels if lab not in self.index_of})
        if unknown:
            raise ValueError(f"anchor labels not in the label set: {unknown[:5]}")
        self.anchor_texts = list(texts)
        self.anchor_vectors = self.encoder.encode(self.anchor_texts)
        if self.second_encoder is not None:
            self.anchor_vectors2 = self.second_encoder.encode(self.anchor_texts)
        self.anchor_labels = np.array([self.index_of[lab] for lab in labels], dtype=np.int64)
        self.anchor_cross_check = np.ones(len(texts), bool) if cross_check is None else np.array(cross_check, bool)
        self._prior = None  # refitted on the new anchors when next needed
        self._check = None
        self._evidence = None
        self._refinement = None
        self._choice = None

    # -- the class-cluster classifier --------------------------------------------------------------------
    @property
    def classifier(self) -> str:
        """The classifier in use: the configured one, or the one the anchors chose (``auto``)."""
        if self.config.classifier != AUTO:
            return self.config.classifier
        return self.classifier_choice().method

    def classifier_choice(self) -> ClassifierChoice:
        """``auto``'s choice for the current anchors (:func:`~backend.labelling.anchors.choose_classifier`),
        made once per anchor set; with a configured classifier, that one, unmeasured."""
        if self.config.classifier != AUTO:
            return ClassifierChoice(self.config.classifier, {}, 0.0, 0.0, len(self.anchor_labels),
                                    f"classifier {self.config.classifier} (configured)")
        if self._choice is None:
            if len(self.anchor_labels) < 2:
                return ClassifierChoice("centroid", {}, 0.0, 0.0, len(self.anchor_labels),
                                        "classifier centroid: too few anchors to choose")
            self._choice = choose_classifier(self.anchor_vectors, self.anchor_labels, len(self.labels),
                                             complete=self._complete, k=self.config.k)
            log.info("%s", self._choice.message)
        return self._choice

    @property
    def choice_made(self) -> ClassifierChoice | None:
        """``auto``'s choice if it was made for the current anchors, else None (nothing is computed)."""
        return self._choice

    def use_classifier_choice(self, choice: ClassifierChoice | None) -> None:
        """Classify by ``choice``, made by :meth:`classifier_choice` over these very anchors and encoder (e.g.
        by the pipeline this one stands in for while its LLM is down), instead of making it again. Ignored once
        this pipeline made its own: what it derived from that choice stays consistent."""
        if self._choice is None and choice is not None:
            self._choice = choice

    def prior(self) -> PriorMapping:
        """The prior mapping of P(right) from the encoder's signals, rescaled on these anchors when that
        fits them better than the packaged one (see :mod:`backend.confidence.prior`); computed once per anchor set."""
        if self._prior is None:
            if not self.config.adapt_prior:
                features = ["encoder_logit", "anchor_similarity"]
                features += ["encoder2_logit", "encoder2_anchor_similarity"] if self.second_encoder else []
                self._prior = PriorMapping.packaged(features, message="packaged prior mapping (adapt_prior is off)")
            else:
                self._prior = self._anchor_prior()
        return self._prior

    def cross_check(self) -> CrossCheck:
        """Every anchor classified by the anchors of the other folds (computed once per anchor set), by
        refined centroids when a refinement was adopted."""
        refinement = self._refinement
        if refinement is not None and refinement.adopted and refinement.cross_check is not None:
            return refinement.cross_check
        return self._plain_check()

    def _plain_check(self) -> CrossCheck:
        if self._check is None:
            method = self.classifier
            chosen = self._choice.cross_check if self._choice is not None else None
            self._check = chosen if chosen is not None else cross_check_anchors(
                self.anchor_vectors, self.anchor_labels, len(self.labels), method=method, k=self.config.k)
        return self._check

    # -- centroids refined on the unlabelled items -------------------------------------------------------
    def refinement(self) -> Refinement | None:
        """The refinement of the current anchor set (None before a large enough run fitted one)."""
        return self._refinement

    def refine(self, vectors: np.ndarray, *, z: float = GATE_Z) -> Refinement:
        """Fit the transductive refinement on these unlabelled items' embeddings (e.g. all of a project's
        tasks, before annotating a part of them) and keep it for this anchor set; adopted when the anchors'
        gain exceeds ``z`` standard errors (:mod:`backend.labelling.transductive`). What was learnt from the
        plain anchors (prior mapping, views' evidence) is then redone."""
        prototypes = self._prototypes() if self.config.label_prototypes else None
        refinement = fit_refinement(self.anchor_vectors, self.anchor_labels, len(self.labels), vectors,
                                    plain=self._plain_check(), complete=self._complete, prototypes=prototypes,
                                    z=z)
        log.info("%s", refinement.message)
        self.use_refinement(refinement)
        return refinement

    def refine_on(self, texts: Sequence[str]) -> Refinement | None:
        """:meth:`refine` on these unlabelled texts (e.g. a sample of a project's tasks, before labelling all
        of them chunk by chunk with that one refinement) where the configuration refines at all; else None."""
        if not self._transductive_applies() or not len(texts):
            return None
        return self.refine(self.encoder.encode(list(texts)))

    def use_refinement(self, refinement: Refinement | None) -> None:
        """Score with ``refinement``, fitted over these very anchors and encoder (by :meth:`refine` here or
        in a pipeline sharing them, e.g. the LLM-less fallback of a project). What was learnt from the
        anchors' cross-check (prior mapping, views' evidence) is redone when the cross-check changes."""
        before = self._refinement
        if refinement is before:
            return
        self._refinement = refinement
        if any(r is not None and r.adopted for r in (before, refinement)):
            self._prior = None
            self._evidence = None

    def _transductive_applies(self) -> bool:
        return self.config.transductive and len(self.anchor_labels) >= 2 and self.classifier == "centroid"

    def _anchor_prior(self) -> PriorMapping:
        check = self.cross_check()
        rows = np.flatnonzero(check.usable & self.anchor_cross_check)
        predicted = check.scores.labels[rows]
        take = np.arange(len(rows)), predicted
        second: tuple[np.ndarray, np.ndarray] | tuple[None, None] = (None, None)
        if self.second_encoder is not None:
            # The same folds in the second encoder's space, about the first encoder's held-out label.
            check2 = cross_check_anchors(self.anchor_vectors2, self.anchor_labels, len(self.labels),
                                         method=self.classifier, k=self.config.k,
                                         predicted=np.maximum(check.scores.labels, 0))
            second = encoder_probabilities(check2.scores.scores[rows])[take], check2.nearest[rows]
        features = prior_features(encoder_probabilities(check.scores.scores[rows])[take], check.nearest[rows],
                                  *second)
        base = self._elicited if self.config.label_free_prior else None
        return fit_prior(features, predicted == self.anchor_labels[rows], base=base)

    def _elicit(self, vectors: np.ndarray, scored: ClassScores) -> None:
        """The label-free stage: fit the estimator of each item's resampled-anchor consistency on this
        batch (when it is large enough to learn from) and let the prior mapping be rebuilt on it."""
        if not self.config.label_free_prior or len(vectors) == 0 or len(self.anchor_labels) < 2:
            return
        consistency = self._resampled_consistency(vectors, scored.labels)
        near = nearest_of_label(vectors, self.anchor_vectors, self.anchor_labels, np.maximum(scored.labels, 0))
        own = encoder_probabilities(scored.scores)[np.arange(len(vectors)), np.maximum(scored.labels, 0)]
        elicited = fit_elicited(prior_features(own, near), consistency)
        if elicited is not None and self.second_encoder is None:  # that prior's variant is not elicited
            self._elicited, self._prior = elicited, None

    def _resampled_consistency(self, vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Share of :data:`RESAMPLES` classifiers, each over a random half of the anchors, that give each
        item ``labels``: an unsure item changes label when its nearest anchors are left out. Needs no label."""
        rng = np.random.default_rng(0)
        agree = np.zeros(len(vectors))
        for _ in range(RESAMPLES):
            keep = rng.random(len(self.anchor_labels)) < 0.5
            half = class_scores(vectors, self.anchor_vectors[keep], self.anchor_labels[keep], len(self.labels),
                                k=self.config.k, method=self.classifier)
            agree += self._complete(half, vectors).labels == labels
        return agree / RESAMPLES

    def classes_without_anchors(self) -> list[str]:
        counts = np.bincount(self.anchor_labels, minlength=len(self.labels))
        return [label for label, count in zip(self.labels, counts, strict=True) if count == 0]

    # -- labels without anchors ------------------------------------------------------------------------
    def _prototypes(self) -> np.ndarray:
        """Each label's name (and description) embedded: the class's stand-in until it has anchors. Scored
        by its plain cosine, which is lower than an anchor centroid's, so a name wins only a text that is
        close to it (measured over anchor draws: see docs/benchmarks.md)."""
        texts = [label.replace("_", " ").replace("-", " ").strip() or label for label in self.labels]
        texts = [f"{t}: {self.descriptions[lab]}" if self.descriptions.get(lab) else t
                 for t, lab in zip(texts, self.labels, strict=True)]
        return self.encoder.encode(texts)

    def _complete(self, scored: ClassScores, vectors: np.ndarray) -> ClassScores:
        """Class scores with every label scored: labels without anchors by their prototypes."""
        if not self.config.label_prototypes or len(vectors) == 0 or np.isfinite(scored.scores).any(axis=0).all():
            return scored
        return with_prototypes(scored, vectors, self._prototypes())

    def _class_scores(self, vectors: np.ndarray) -> ClassScores:
        refinement = self._refinement
        if refinement is not None and refinement.adopted and self._transductive_applies():
            return self._complete(refinement.scores(vectors), vectors)
        scored = class_scores(vectors, self.anchor_vectors, self.anchor_labels, len(self.labels),
                              k=self.config.k, method=self.classifier)
        return self._complete(scored, vectors)

    # -- the views' evidence (combine="pool") ------------------------------------------------------------
    def encoder_log_probs(self, scores: np.ndarray) -> np.ndarray:
        """The encoder's calibrated log-probability of every class: a softmax of its scores at the
        temperature the anchors' own cross-check fits (see :meth:`evidence`)."""
        return _scaled_log_probs(scores, self.evidence(allow_llm=False).encoder_weight)

    def evidence(self, *, allow_llm: bool = True, progress: bool | Callable[[str, int], None] = False) -> Evidence:
        """What the anchors prove about the views, once per anchor set (module :mod:`.combination`).

        1. The encoder's temperature: a one-view pool over all classes fitted on each anchor's out-of-fold
           scores; over an encoder fine-tuned on some of the anchors, on the others only when at least
           :data:`MIN_UNSEEN_ANCHORS` are usable (:meth:`temperature_rows`). 2. The LLM views, asked on the
           anchors the encoder is unsure of (at most ``anchor_llm_cap``, chosen by a hash of their text so
           that a new anchor does not reshuffle them), with candidates from the out-of-fold scores;
           :func:`compare_pools` adopts them only when they improve the out-of-fold likelihood of the
           anchors' labels. With ``allow_llm=False`` (re-votes must not call the LLM) the last adopted pool
           is kept.
        """
        cfg = self.config
        if self._evidence is not None and (self._evidence.complete or not allow_llm):
            return self._evidence
        check = self.cross_check()
        rows = np.flatnonzero(check.usable)
        oof = self._complete(check.scores, self.anchor_vectors)
        scores, truth = oof.scores[rows], self.anchor_labels[rows]
        fit = self.temperature_rows(rows)
        temperature_pool = LogLinearPool(prior_weights=np.ones(1), l2=cfg.pool_l2)
        temperature_pool.fit(_finite_or_neg_inf(scores[fit] / ENCODER_TEMPERATURE)[:, :, None], truth[fit])
        weight = float(temperature_pool.weights_[0]) if len(fit) >= 5 else 1.0
        evidence = Evidence(encoder_weight=weight, anchors=len(rows), temperature_anchors=len(fit))
        if cfg.combine != "pool" or not cfg.llm_views:
            evidence.complete = True
        elif not allow_llm or self.llm is None:  # a re-vote of stored answers: the last weights, if any
            evidence.pool = self._last_pool
            evidence.complete = self.llm is None
        else:
            log_probs = _scaled_log_probs(scores, weight)
            confident = np.exp(log_probs.max(axis=1)) if len(rows) else np.zeros(0)
            gated = np.flatnonzero(confident < cfg.llm_gate)
            asked = self._anchors_to_ask(rows, gated, confident)
            candidates = top_candidates(scores, cfg.choice_candidates)
            if len(gated):
                evidence.recall = float(np.mean([truth[i] in candidates[i] for i in gated]))
            texts = [self.anchor_texts[rows[i]] for i in asked]
            answers = self._ask(texts, candidates[asked], scores[asked], progress, "anchors",
                                vectors=self.anchor_vectors[rows[asked]], own=rows[asked])
            features = candidate_features(candidates[asked], log_probs[asked],
                                          [self._view_probs(answers[v]) for v in cfg.llm_views])
            target = np.array([_slot(candidates[i], truth[i]) for i in asked], dtype=np.int64)
            evidence.pool = compare_pools(features, target, l2=cfg.pool_l2)
            if cfg.anchor_llm_cap == 0:  # the views were not asked: say why, not "0 anchors answered"
                evidence.pool = replace(evidence.pool, message="the LLM views are never weighed, so never asked: "
                                                               "the cap on the anchors asked about them is 0")
            evidence.anchor_calls = len(asked) * len(cfg.llm_views)
            evidence.complete = True
            self._last_pool = evidence.pool
            log.info("%s", evidence.pool.message)
        self._evidence = evidence
        return evidence

    def temperature_rows(self, rows: np.ndarray) -> np.ndarray:
        """Positions (into ``rows``, the usable cross-checked anchors) the encoder's temperature is fitted on.

        An encoder fine-tuned on some anchors pulls them to their labels, so their out-of-fold scores are
        more confident than a new text's and a temperature fitted on them makes the score over-confident
        (measured: 2.7-6.5 points above the accuracy on four intent sets, docs/calibration.md). The anchors
        it never saw (the held-out part of its training, and every anchor added since) are a fair sample
        of what it will label; when at least :data:`MIN_UNSEEN_ANCHORS` of them are usable they alone fit
        it. Fewer: all of them, as over a frozen encoder."""
        every = np.arange(len(rows))
        seen = getattr(self.encoder, "trained_on", frozenset())  # duck-typed encoders: none
        if not seen:
            return every
        unseen = np.array([text_key(self.anchor_texts[r]) not in seen for r in rows], dtype=bool)
        return every[unseen] if unseen.sum() >= MIN_UNSEEN_ANCHORS else every

    def pool_state(self) -> dict[str, Any] | None:
        """The views' weights of the last run that could ask the LLM, as plain data (None before one): what a
        restarted process needs so that its re-votes, which never ask, combine the views as before."""
        pool = self._last_pool
        if pool is None:
            return None
        return {"adopted": pool.adopted, "weights": [float(w) for w in pool.weights], "gain": pool.gain,
                "standard_error": pool.standard_error, "items": pool.items, "message": pool.message}

    def restore_pool(self, state: dict[str, Any] | None) -> None:
        """Take back :meth:`pool_state` (a state of another view set is ignored)."""
        if not state or len(state.get("weights", ())) != 1 + len(self.config.llm_views):
            return
        self._last_pool = PoolFit(bool(state["adopted"]), np.asarray(state["weights"], dtype=np.float64),
                                  float(state.get("gain", 0.0)), float(state.get("standard_error", 0.0)),
                                  int(state.get("items", 0)), str(state.get("message", "")))
        if self._evidence is not None and (self.llm is None or not self._evidence.complete):
            self._evidence = None  # it was built without these weights (a run that asked keeps its own)

    def _anchors_to_ask(self, rows: np.ndarray, gated: np.ndarray, confident: np.ndarray) -> np.ndarray:
        """Positions (into ``rows``) of the anchors the LLM is asked about: the gated ones, a stable sample of
        ``anchor_llm_cap`` when there are more; topped up with the least confident when there are too few
        to weigh the views."""
        cap = self.config.anchor_llm_cap
        if len(gated) > cap:
            order = sorted(gated, key=lambda i: _stable_hash(self.anchor_texts[rows[i]]))
            return np.sort(np.array(order[:cap], dtype=np.int64))
        floor = min(cap, MIN_POOL_ANCHORS, len(rows))
        if len(gated) >= floor:
            return gated
        return np.sort(np.argsort(confident, kind="stable")[:floor])

    def _ask(self, texts: list[str], candidates: np.ndarray, scores: np.ndarray, progress, what: str, *,
             vectors: np.ndarray | None = None, own: np.ndarray | None = None) -> dict[str, list]:
        """Each LLM view's answers for ``texts`` (``candidates``: their candidate classes; ``vectors``: their
        embeddings, for the choice view's examples; ``own``: for anchors, their own position, never shown
        as their own example)."""
        out: dict[str, list] = {}
        for view in self.config.llm_views:
            bar, tick = _ticker(progress, f"{view} ({what})", len(texts))
            if view == "choice":
                # Only asked for when on: an annotator without examples support keeps working.
                extra = ({"examples": self._choice_examples(vectors, candidates, own)}
                         if self.config.choice_examples and vectors is not None else {})
                out[view] = self.llm.choose(texts, [[self.labels[c] for c in row if c >= 0] for row in candidates],
                                            progress=tick, **extra)
            elif view == "zero_shot":
                out[view] = self.llm.zero_shot(texts, progress=tick)
            elif view == "hinted":
                hints = [self.labels[int(np.argmax(row))] for row in scores]
                out[view] = self.llm.hinted(texts, hints, progress=tick)
            else:
                raise ValueError(f"the {view!r} view cannot be pooled; use choice, zero_shot or hinted")
            if bar:
                bar.close()
        return out

    def _choice_examples(self, vectors: np.ndarray, candidates: np.ndarray, own: np.ndarray | None
                         ) -> list[dict[str, str]]:
        """Per text, each candidate label's anchor nearest to it (label -> anchor text): the team's own use of
        the label, which a small LLM reads more easily than a bare name. An anchor is never its own example,
        nor is a copy of the text (cosine ~1)."""
        if len(vectors) == 0 or len(self.anchor_labels) == 0:
            return [{} for _ in range(len(vectors))]
        sims = vectors @ self.anchor_vectors.T
        sims[sims > 1.0 - 1e-4] = -np.inf
        if own is not None:
            sims[np.arange(len(vectors)), own] = -np.inf
        out = []
        for i, row in enumerate(candidates):
            shown: dict[str, str] = {}
            for c in row[row >= 0]:
                of_label = np.flatnonzero(self.anchor_labels == c)
                if len(of_label):
                    best = of_label[np.argmax(sims[i, of_label])]
                    if np.isfinite(sims[i, best]):
                        shown[self.labels[c]] = self.anchor_texts[best]
            out.append(shown)
        return out

    def _view_probs(self, answers: Sequence) -> list[dict[int, float] | None]:
        """Class index -> probability per answer: the choice view's distribution, else the label alone."""
        out: list[dict[int, float] | None] = []
        for answer in answers:
            if answer is None or answer.error or not answer.valid:
                out.append(None)
            elif answer.distribution:
                out.append({self.index_of[k]: float(v) for k, v in answer.distribution.items() if k in self.index_of})
            else:
                out.append({self.index_of[answer.label]: 1.0} if answer.label in self.index_of else None)
        return out

    def _pool_run(self, work, vectors, scored, progress, timings, answers) -> PoolOutcome:
        """Label the items by the pooled views: the LLM is asked only where the encoder is unsure and only
        when the anchors showed that it helps (or, with stored ``answers``, where it answered before)."""
        cfg = self.config
        t0 = time.perf_counter()
        evidence = self.evidence(allow_llm=answers is None and self.llm is not None, progress=progress)
        timings["evidence"] = time.perf_counter() - t0
        log_probs = _scaled_log_probs(scored.scores, evidence.encoder_weight)
        n = len(work)
        outcome = PoolOutcome(labels=scored.labels.copy(), stages=["encoder_only"] * n,
                              probability=np.exp(log_probs.max(axis=1)) if n else np.zeros(0),
                              candidates=np.full((n, 0), -1, np.int64), views={}, asked=np.zeros(n, bool))
        pool = evidence.pool
        if pool is None or not pool.adopted or n == 0:
            return outcome
        t0 = time.perf_counter()
        candidates = top_candidates(scored.scores, cfg.choice_candidates)
        if answers is not None:
            views = {v: list(answers[v]) for v in cfg.llm_views}
            asked = np.array([any(views[v][i] is not None for v in cfg.llm_views) for i in range(n)], bool)
        else:
            asked = outcome.probability < cfg.llm_gate
            idx = np.flatnonzero(asked)
            got = self._ask([work[i] for i in idx], candidates[idx], scored.scores[idx], progress, "items",
                            vectors=vectors[idx])
            views = {v: [None] * n for v in cfg.llm_views}
            for v in cfg.llm_views:
                for j, i in enumerate(idx):
                    views[v][i] = got[v][j]
        timings["llm"] = time.perf_counter() - t0
        idx = np.flatnonzero(asked)
        if len(idx):
            features = candidate_features(candidates[idx], log_probs[idx],
                                          [self._view_probs([views[v][i] for i in idx]) for v in cfg.llm_views])
            pooled = LogLinearPool()
            pooled.weights_ = pool.weights
            posterior = pooled.predict_proba(features)
            best = posterior.argmax(axis=1)
            for j, i in enumerate(idx):
                outcome.labels[i] = candidates[i, best[j]]
                outcome.probability[i] = posterior[j, best[j]] * evidence.recall
                said = {self._index(views[v][i].label) for v in cfg.llm_views if views[v][i] is not None}
                said.discard(INVALID)
                outcome.stages[i] = ("consistent" if said == {int(scored.labels[i])}
                                     else "combined" if said else "encoder_only")
        outcome.candidates, outcome.views, outcome.asked = candidates, views, asked
        return outcome

    # -- the run -------------------------------------------------------------------------------------
    def annotate(
        self,
        texts: Sequence[str],
        *,
        skip: Sequence[bool] | None = None,
        progress: bool | Callable[[str, int], None] = False,
        answers: dict[str, Sequence] | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        refine: bool | None = None,
    ) -> HCCResult:
        """Label ``texts``; ``skip`` marks items to leave out (stage ``skipped``).

        ``answers`` maps each LLM view to earlier answers (``LLMAnswer``-like, one per text) to reuse
        instead of asking the LLM: re-voting after the anchors changed then costs no call. ``reference``
        is ``(vectors, label indices)`` of items trusted from earlier runs (e.g. consistent items of
        previous batches); they join the DCCA reference set next to the anchors, not the class scores
        (``combine="dcca"`` only). A pooled re-vote with ``answers`` asks nothing: it keeps the views'
        weights of the last run that could ask (:meth:`evidence`). ``refine``: fit the transductive refinement
        on this batch (True), never (False), or when it has at least ``MIN_ITEMS`` items and the anchor set
        has none yet (None, the default; ``HCCConfig.transductive`` must be on either way).
        """
        cfg = self.config
        timings: dict[str, float] = {}
        skip_mask = np.asarray(skip if skip is not None else [False] * len(texts), dtype=bool)
        active = np.flatnonzero(~skip_mask)
        work = [texts[i] for i in active]

        t0 = time.perf_counter()
        vectors = self.encoder.encode(work)
        timings["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        automatic = refine is None and self._refinement is None and len(vectors) >= MIN_ITEMS
        if (refine or automatic) and self._transductive_applies() and len(vectors):
            self.refine(vectors)
        timings["refine"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = self._class_scores(vectors)
        self._elicit(vectors, scored)
        timings["classify"] = time.perf_counter() - t0
        if cfg.combine == "pool":
            replay = {v: [answers[v][i] for i in active] for v in cfg.llm_views} if answers is not None else None
            outcome = self._pool_run(work, vectors, scored, progress, timings, replay)
            return self._finish(texts, skip_mask, active, scored, vectors, outcome, timings)

        views: dict[str, list] = {}
        use_llm = self.llm is not None or answers is not None
        if answers is not None:
            views = {v: [answers[v][i] or _NO_ANSWER for i in active] for v in cfg.llm_views}
        elif self.llm is not None:
            views = self._llm_views(work, vectors, scored, progress, timings)
        view_matrix = np.column_stack(
            [scored.labels] + [[self._index(a.label) for a in views[v]] for v in cfg.llm_views]
        ) if use_llm else scored.labels[:, None]

        ref_vectors, ref_labels = self.anchor_vectors, self.anchor_labels
        if reference is not None and len(reference[1]):
            ref_vectors = np.vstack([self.anchor_vectors.reshape(-1, reference[0].shape[1]), reference[0]])
            ref_labels = np.concatenate([self.anchor_labels, np.asarray(reference[1], np.int64)])
        t0 = time.perf_counter()
        if use_llm:
            result = dcca(vectors, view_matrix, ref_vectors, ref_labels, k=cfg.vote_k,
                          rounds=cfg.rounds, weighted=cfg.weighted_vote, unresolved=cfg.unresolved,
                          vote_method=cfg.vote_method, n_classes=len(self.labels))
        else:
            result = DCCAResult(scored.labels.copy(), ["encoder_only"] * len(work),
                                np.full((0, len(work)), INVALID), np.zeros((0, len(work))))
        timings["dcca"] = time.perf_counter() - t0

        second = None
        if self.second_encoder is not None:
            t0 = time.perf_counter()
            second = self._second_opinion(work, result.labels)
            timings["encode2"] = time.perf_counter() - t0
        records = self._records(texts, skip_mask, active, scored, views, view_matrix, result, vectors=vectors,
                                second=second)
        _label_dcca_scores(records, agreement=use_llm)
        report = self._report(records, result, timings)
        final = np.full(len(texts), INVALID, np.int64)
        final[active] = result.labels
        return HCCResult(records=records, report=report, final_labels=final)

    def _finish(self, texts, skip_mask, active, scored, vectors, outcome: PoolOutcome, timings) -> HCCResult:
        """Records and report of a pooled run (``combine="pool"``)."""
        n = len(active)
        result = DCCAResult(outcome.labels, outcome.stages, np.full((0, n), INVALID), np.zeros((0, n)))
        second = None
        if self.second_encoder is not None:
            t0 = time.perf_counter()
            second = self._second_opinion([texts[i] for i in active], result.labels)
            timings["encode2"] = time.perf_counter() - t0
        views = outcome.views
        records = self._records(texts, skip_mask, active, scored, {}, scored.labels[:, None], result,
                                vectors=vectors, second=second)
        name = dict(enumerate(self.labels))
        for pos, i in enumerate(active):
            rec = records[i]
            rec["score"] = round(float(outcome.probability[pos]), 4)
            rec["score_kind"] = "probability"  # P(label is right) from the pool, not an agreement share
            if not outcome.asked[pos]:
                continue
            rec["candidates"] = [name[int(c)] for c in outcome.candidates[pos] if c >= 0]
            for view, answers in views.items():
                answer = answers[pos]
                if answer is None:
                    continue
                rec[f"llm_{view}"] = answer.label
                rec[f"llm_{view}_probability"] = answer.probability
                if answer.distribution:
                    rec[f"llm_{view}_distribution"] = {k: round(float(v), 5) for k, v in answer.distribution.items()}
                if not answer.valid:
                    rec[f"llm_{view}_raw"] = answer.raw
                if answer.error:
                    rec[f"llm_{view}_error"] = answer.error
        report = self._report(records, result, timings)
        evidence = self.evidence(allow_llm=False)
        report["combination"] = dict(evidence.as_dict(), items_asked=int(outcome.asked.sum()))
        final = np.full(len(texts), INVALID, np.int64)
        final[active] = result.labels
        return HCCResult(records=records, report=report, final_labels=final)

    def _index(self, label: str | None) -> int:
        return self.index_of.get(label, INVALID) if label is not None else INVALID

    def _llm_views(self, work, vectors, scored, progress, timings) -> dict[str, list]:
        cfg = self.config
        views: dict[str, list] = {}
        for view in cfg.llm_views:
            t0 = time.perf_counter()
            if callable(progress):  # a caller's hook, e.g. a job status: progress(view, n_done_since_last_call)
                bar, tick = None, (lambda n=1, _view=view: progress(_view, n))
            else:
                bar = _progress_bar(len(work), f"LLM {view}", progress)
                tick = bar.update if bar else None
            if view == "zero_shot":
                views[view] = self.llm.zero_shot(work, progress=tick)
            elif view == "hinted":
                hints = [self.labels[i] if i != INVALID else "none" for i in scored.labels]
                views[view] = self.llm.hinted(work, hints, progress=tick)
            else:
                examples = self._examples(vectors)
                cands = self._candidates(scored.scores) if cfg.candidates > 0 else None
                views[view] = self.llm.few_shot(work, examples, cands, progress=tick)
            if bar:
                bar.close()
            timings[f"llm_{view}"] = time.perf_counter() - t0
        return views

    def _examples(self, vectors: np.ndarray) -> list[list[tuple[str, str]]]:
        n_ex = min(self.config.few_shot_examples, len(self.anchor_labels))
        if n_ex == 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        sims = vectors @ self.anchor_vectors.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :n_ex]
        # Most similar last: the example nearest the text sits next to it in the prompt.
        return [
            [(self.anchor_texts[j], self.labels[self.anchor_labels[j]]) for j in row[::-1]] for row in top
        ]

    def _candidates(self, scores: np.ndarray) -> list[list[str]]:
        m = min(self.config.candidates, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :m]
        # Alphabetical, so the prompt does not reveal which candidate the encoder ranks first.
        return [
            sorted(self.labels[j] for j in row if np.isfinite(scores[r, j])) for r, row in enumerate(top)
        ]

    def _second_opinion(self, work: Sequence[str], final: np.ndarray) -> dict[str, np.ndarray]:
        """The second encoder's label of each item, and its probability of and nearest anchor to the final
        label: a confidence signal only, it takes no part in the consistency split."""
        vectors2 = self.second_encoder.encode(work)
        scored2 = class_scores(vectors2, self.anchor_vectors2, self.anchor_labels, len(self.labels),
                               k=self.config.k, method=self.classifier)
        label = np.maximum(final, 0)
        probability = encoder_probabilities(scored2.scores)
        return {"label": scored2.labels,
                "probability": probability[np.arange(len(work)), label] if len(work) else np.zeros(0),
                "near": (nearest_of_label(vectors2, self.anchor_vectors2, self.anchor_labels, label)
                         if len(work) and len(self.anchor_labels) else np.full(len(work), -np.inf))}

    def _records(self, texts, skip_mask, active, scored, views, view_matrix, result, *, vectors=None, second=None
                 ) -> list[dict[str, Any]]:
        name = {i: label for i, label in enumerate(self.labels)}
        # Confidence signals of the final label (backend/confidence/signals.py turns them into calibrator features).
        probs = encoder_probabilities(scored.scores)
        near = (nearest_of_label(vectors, self.anchor_vectors, self.anchor_labels, result.labels)
                if vectors is not None and len(active) and len(self.anchor_labels) else np.full(len(active), -np.inf))
        final_probs = probs[np.arange(len(active)), np.maximum(result.labels, 0)] if len(active) else np.zeros(0)
        features = prior_features(final_probs, near, *((second["probability"], second["near"]) if second else ()))
        prior = self.prior().probability(features) if len(active) else np.zeros(0)
        records: list[dict[str, Any]] = [
            {"text": texts[i], "label": None, "stage": "skipped", "score": 0.0} for i in range(len(texts))
        ]
        for pos, i in enumerate(active):
            final = int(result.labels[pos])
            row = view_matrix[pos]
            rec: dict[str, Any] = {
                "text": texts[i],
                "label": name.get(final),
                "stage": result.stages[pos],
                "encoder_label": name.get(int(scored.labels[pos])),
                "encoder_score": _finite(scored.scores[pos, final]) if final != INVALID else None,
                "encoder_margin": round(float(scored.margins[pos]), 6),
                "encoder_probability": round(float(probs[pos, final]), 6) if final != INVALID else 0.0,
                "anchor_similarity": _finite(near[pos]),
                "prior_probability": round(float(prior[pos]), 6) if final != INVALID else 0.0,
            }
            if second is not None:
                rec["encoder2_label"] = name.get(int(second["label"][pos]))
                rec["encoder2_probability"] = round(float(second["probability"][pos]), 6) if final != INVALID else 0.0
                rec["encoder2_anchor_similarity"] = _finite(second["near"][pos])
            for view in self.config.llm_views if views else ():
                answer = views[view][pos]
                rec[f"llm_{view}"] = answer.label
                rec[f"llm_{view}_probability"] = answer.probability
                if not answer.valid:
                    rec[f"llm_{view}_raw"] = answer.raw
                if answer.error:
                    rec[f"llm_{view}_error"] = answer.error
            for r in range(result.votes.shape[0]):
                if result.votes[r, pos] != INVALID:
                    rec[f"vote_round{r + 1}"] = name.get(int(result.votes[r, pos]))
                    rec[f"vote_round{r + 1}_share"] = round(float(result.shares[r, pos]), 4)
            rec["score"] = _agreement_score(row, final, result, pos)
            records[i] = rec
        return records

    def _report(self, records, result, timings) -> dict[str, Any]:
        cfg = self.config
        stages: dict[str, int] = {}
        for rec in records:
            stages[rec["stage"]] = stages.get(rec["stage"], 0) + 1
        n_cons = stages.get("consistent", 0)
        n_unres = stages.get("unresolved", 0)
        n_active = len(result.labels)
        report: dict[str, Any] = {
            "items": len(records),
            "stages": stages,
            "anchors": int(len(self.anchor_labels)),
            "prior": self.prior().as_dict(),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        }
        report["classifier"] = self.classifier_choice().as_dict()
        if self._refinement is not None and self._transductive_applies():
            report["transductive"] = self._refinement.as_dict()
        if cfg.combine == "pool":
            answered = n_cons + stages.get("combined", 0)
            if answered:  # CAI over the items both the encoder and the LLM labelled
                report["cai"] = round(cai(n_cons, answered - n_cons, cfg.eps), 6)
            if self.llm is not None:
                report["llm"] = self.llm.stats.as_dict()
        elif "encoder_only" not in stages:
            # The paper's CAI: consistent / inconsistent items. The share DCCA settled is another quantity
            # (settled / unresolved: 1/eps when nothing is left), so it has its own name and no 1/eps.
            report["cai"] = round(cai(n_cons, n_active - n_cons, cfg.eps), 6)
            report["resolved_ratio"] = round((n_active - n_unres) / n_unres, 6) if n_unres else None
            if self.llm is not None:
                report["llm"] = self.llm.stats.as_dict()
        return report


#: Temperature of the softmax that turns cosine class scores into ``encoder_probability``. 0.04 had the
#: lowest log loss of the encoder's own correctness on 2,000 Banking77 train items that are not anchors
#: (MiniLM, centroid classifier; 0.03: 0.450, 0.04: 0.405, 0.05: 0.418); see docs/calibration.md.
ENCODER_TEMPERATURE = 0.04


def encoder_probabilities(scores: np.ndarray, temperature: float = ENCODER_TEMPERATURE) -> np.ndarray:
    """Softmax of class scores / ``temperature`` per row; classes without anchors (-inf) get 0."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        return np.zeros(scores.shape[:1] + (0,))
    top = np.max(scores, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(np.isfinite(scores), np.exp((scores - top) / temperature), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _label_dcca_scores(records: list[dict[str, Any]], *, agreement: bool) -> None:
    """Say what a DCCA record's ``score`` is. With the LLM's views it is the agreement share (``score_kind``
    ``agreement``: not a probability). Without them the encoder is the only annotator, so every label would
    have agreement 1.0, a number that says nothing: the score is then the prior's P(label is right)."""
    for rec in records:
        if rec.get("label") is None:
            continue
        if agreement:
            rec["score_kind"] = "agreement"
        else:
            rec["score"], rec["score_kind"] = round(float(rec["prior_probability"]), 4), "probability"


def _agreement_score(views_row: np.ndarray, final: int, result: DCCAResult, pos: int) -> float:
    """Uncalibrated confidence: the share of the views and of the last vote that back the final label."""
    support = [float(v == final) for v in views_row]
    voted = [r for r in range(result.votes.shape[0]) if result.votes[r, pos] != INVALID]
    if voted:
        last = voted[-1]
        support.append(float(result.shares[last, pos]) if result.votes[last, pos] == final else 0.0)
    return round(float(np.mean(support)), 4) if support else 0.0


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)


#: Usable anchors a trained encoder never saw below which its temperature is fitted on all of them: one
#: parameter, but fewer than ~20 outcomes leave its log-likelihood flat (set before measuring, not tuned).
MIN_UNSEEN_ANCHORS = 20
#: Half-samples of the anchors behind the label-free stage's consistency target: 8 gives shares in steps of
#: 1/8, enough for a regression target; more only adds classification passes (not tuned on any data set).
RESAMPLES = 8


@dataclass
class Evidence:
    """What the anchors proved about the views (:meth:`HCCPipeline.evidence`)."""

    encoder_weight: float  # temperature scaling of the encoder's scores (1 = ENCODER_TEMPERATURE)
    anchors: int  # cross-checked anchors it rests on
    temperature_anchors: int = 0  # ... of which the encoder's temperature was fitted on
    pool: PoolFit | None = None  # the views' weights, and whether the LLM views earned a place
    recall: float = 1.0  # share of the anchors the LLM is asked about whose label is among the candidates
    anchor_calls: int = 0
    complete: bool = False  # False: fitted without asking the LLM, to be redone by a run that may

    @property
    def unseen_only(self) -> bool:
        """The temperature rests on the anchors a trained encoder never saw (:meth:`HCCPipeline.temperature_rows`
        takes either those or all of them)."""
        return self.temperature_anchors < self.anchors

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoder_weight": round(self.encoder_weight, 4), "anchors": self.anchors,
                               "temperature_anchors": self.temperature_anchors, "unseen_only": self.unseen_only,
                               "candidate_recall": round(self.recall, 4), "anchor_llm_questions": self.anchor_calls}
        if self.pool is not None:
            out.update(llm_adopted=self.pool.adopted, weights=[round(float(w), 4) for w in self.pool.weights],
                       gain=round(self.pool.gain, 4), standard_error=round(self.pool.standard_error, 4),
                       anchors_asked=self.pool.items, message=self.pool.message)
        return out


@dataclass
class PoolOutcome:
    labels: np.ndarray
    stages: list[str]
    probability: np.ndarray  # P(label right): pooled posterior x candidate recall, or the encoder's own
    candidates: np.ndarray  # (n, K) candidate classes (-1 padded); (n, 0) when the LLM was not used
    views: dict[str, list]  # view -> answer per item (None where not asked)
    asked: np.ndarray  # (n,) bool


def _finite_or_neg_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, -np.inf)


def _scaled_log_probs(scores: np.ndarray, weight: float) -> np.ndarray:
    """log softmax(weight * scores / ENCODER_TEMPERATURE) per row; classes scored -inf get -inf."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        return np.zeros(scores.shape if scores.ndim == 2 else (0, 0))
    logits = _finite_or_neg_inf(weight * scores / ENCODER_TEMPERATURE)
    empty = ~np.isfinite(logits).any(axis=1)
    logits[empty] = 0.0
    return log_softmax(logits, axis=1)


def _slot(candidates: np.ndarray, label: int) -> int:
    hits = np.flatnonzero(candidates == label)
    return int(hits[0]) if len(hits) else -1


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def _ticker(progress, desc: str, total: int):
    """(bar to close, tick callable) for a progress flag or a caller's hook ``progress(what, n)``."""
    if callable(progress):
        return None, (lambda n=1: progress(desc, n))
    bar = _progress_bar(total, f"LLM {desc}", progress)
    return bar, (bar.update if bar else None)
