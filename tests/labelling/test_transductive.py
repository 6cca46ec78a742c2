"""Centroids refined on unlabelled items (backend/labelling/transductive.py), on synthetic embeddings whose
class centres are known: the refinement must find the centres better than a few anchors do, and the gate
must refuse it when the unlabelled items carry no class structure."""

from __future__ import annotations

import numpy as np
import pytest

from backend.labelling.anchors import ClassScores, class_scores, cross_check_anchors
from backend.labelling.transductive import centroid_scores, claimed_scores, fit_refinement, refine_centroids

CLASSES, DIM = 20, 64


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clusters(seed: int, *, per_class: int, anchors_per_class: int, spread: float = 0.3):
    """(centres, items, item labels, anchors, anchor labels): isotropic clusters around random centres."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(CLASSES, DIM)))

    def around(labels: np.ndarray) -> np.ndarray:
        return unit(centres[labels] + spread * rng.normal(size=(len(labels), DIM)))

    item_labels = np.repeat(np.arange(CLASSES), per_class)
    anchor_labels = np.repeat(np.arange(CLASSES), anchors_per_class)
    return centres, around(item_labels), item_labels, around(anchor_labels), anchor_labels


def as_is(scored: ClassScores, _vectors: np.ndarray) -> ClassScores:
    return scored


def fit(anchors, anchor_labels, items):
    plain = cross_check_anchors(anchors, anchor_labels, CLASSES, method="centroid")
    return fit_refinement(anchors, anchor_labels, CLASSES, items, plain=plain, complete=as_is)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_refined_centroids_find_the_true_centres_and_the_anchors_vouch_for_them(seed: int) -> None:
    centres, items, truth, anchors, anchor_labels = clusters(seed, per_class=100, anchors_per_class=8)
    plain = class_scores(items, anchors, anchor_labels, CLASSES, method="centroid")
    refined = refine_centroids(anchors, anchor_labels, CLASSES, items)
    plain_centres = unit(np.stack([anchors[anchor_labels == c].mean(axis=0) for c in range(CLASSES)]))
    # Closer to the truth than the anchors' own means, class by class on average, and more items right.
    assert np.mean(np.sum(refined * centres, axis=1)) > np.mean(np.sum(plain_centres * centres, axis=1))
    assert (centroid_scores(items, refined, np.ones(CLASSES, bool)).labels == truth).mean() \
        > (plain.labels == truth).mean()
    refinement = fit(anchors, anchor_labels, items)
    assert refinement.adopted, refinement.message
    assert refinement.gain > 2 * refinement.standard_error > 0
    np.testing.assert_allclose(refinement.centroids, refined, atol=1e-6)
    assert refinement.cross_check is not None and len(refinement.cross_check.usable) == len(anchor_labels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_items_without_class_structure_are_not_adopted(seed: int) -> None:
    _, _, _, anchors, anchor_labels = clusters(seed, per_class=0, anchors_per_class=8)
    noise = unit(np.random.default_rng(100 + seed).normal(size=(2000, DIM)))
    refinement = fit(anchors, anchor_labels, noise)
    assert not refinement.adopted
    assert refinement.centroids is None and "not refined" in refinement.message


def test_an_unlabelled_item_never_outweighs_an_anchor() -> None:
    """Two anchors of class 0 at e1, ten thousand items at e2 all assigned to it: the centroid may move
    toward the items by at most as much weight as the anchors have (angle <= 45 degrees)."""
    anchors = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1])
    items = np.tile(np.array([[0.6, 0.8]], np.float32), (10_000, 1))
    centroid = refine_centroids(anchors, labels, 2, items)[0]
    assert centroid[0] >= centroid[1] > 0  # moved, but not past the diagonal


def test_a_label_without_anchors_keeps_its_prototype() -> None:
    _, items, _, anchors, anchor_labels = clusters(4, per_class=50, anchors_per_class=5)
    keep = anchor_labels != 3
    prototypes = unit(np.random.default_rng(7).normal(size=(CLASSES, DIM)))
    refined = refine_centroids(anchors[keep], anchor_labels[keep], CLASSES, items, prototypes=prototypes)
    np.testing.assert_allclose(refined[3], prototypes[3], atol=1e-6)
    assert not np.allclose(refined[0], prototypes[0])
    scored = centroid_scores(items, refined, np.arange(CLASSES) != 3)
    assert np.isneginf(scored.scores[:, 3]).all()  # left for the pipeline's prototype scoring


def test_no_items_are_refused_with_a_reason() -> None:
    _, items, _, anchors, anchor_labels = clusters(5, per_class=20, anchors_per_class=3)
    refused = fit(anchors, anchor_labels, items[:0])
    assert not refused.adopted and "too few" in refused.message


def test_an_item_the_name_of_a_label_without_anchors_claims_keeps_that_label() -> None:
    """Refined centroids only move the labels that have anchors; an item the plain scores give to a label
    scored by its name keeps it (measured on Banking77 at 1% anchors: without this rule the refinement drew
    10-13% of such labels' items away)."""
    present = np.array([True, False])
    plain = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    prototypes = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)
    claimed, other = unit(np.array([[0.3, 0.95]])), unit(np.array([[0.9, 0.43]]))
    refined = np.vstack([claimed, [[0.0, 0.0]]]).astype(np.float32)  # moved right onto the claimed item
    queries = np.vstack([claimed, other]).astype(np.float32)
    scored = claimed_scores(queries, refined, plain, present, prototypes)
    assert scored.labels.tolist() == [1, 0]
    assert centroid_scores(queries, refined, present).labels.tolist() == [0, 0]  # what it would have become
    np.testing.assert_allclose(scored.scores[1], [float(other[0] @ refined[0]), float(other[0, 1])], rtol=1e-6)
