"""Class-cluster scores, k-NN voting and the anchor index on hand-made unit vectors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from backend.labelling import anchors as anchors_mod
from backend.labelling.anchors import AnchorIndex, class_scores, knn_vote


def unit(degrees: float) -> np.ndarray:
    """A 2-D unit vector at the given angle; the cosine between two of them is cos(angle difference)."""
    rad = math.radians(degrees)
    return np.array([math.cos(rad), math.sin(rad)], dtype=np.float32)


def units(*degrees: float) -> np.ndarray:
    return np.stack([unit(d) for d in degrees])


def cosd(degrees: float) -> float:
    return math.cos(math.radians(degrees))


# -- class_scores ------------------------------------------------------------------------------------

# Class 0 has four anchors, class 1 two (fewer than k=3), class 2 none.
ANCHORS = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
ANCHOR_LABELS = np.array([0, 0, 0, 0, 1, 1])
QUERIES = np.array([[1, 0], [0, 1], [-0.6, -0.8]], dtype=np.float32)


def test_topk_mean_is_mean_of_the_k_best_cosines_per_class():
    out = class_scores(QUERIES, ANCHORS, ANCHOR_LABELS, 3, k=3, method="topk_mean")
    # q=(1,0): class 0 cosines 1, .8, .6, 0 -> top 3 mean .8; class 1 has two anchors: mean(-1, 0).
    # q=(0,1): class 0 cosines 0, .6, .8, 1 -> .8; class 1: mean(0, -1).
    # q=(-.6,-.8): class 0 cosines -.6, -.96, -1, -.8 -> mean(-.6, -.8, -.96); class 1: mean(.6, .8).
    expected = np.array(
        [
            [0.8, -0.5, -np.inf],
            [0.8, -0.5, -np.inf],
            [(-0.6 - 0.8 - 0.96) / 3, 0.7, -np.inf],
        ]
    )
    np.testing.assert_allclose(out.scores, expected, atol=1e-6)
    assert out.scores.shape == (3, 3)
    assert out.labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(out.margins, [1.3, 1.3, 0.7 + 2.36 / 3], atol=1e-6)


def test_topk_mean_with_k_larger_than_every_class_uses_all_anchors():
    out = class_scores(QUERIES[:1], ANCHORS, ANCHOR_LABELS, 3, k=10)
    np.testing.assert_allclose(out.scores[0, :2], [(1 + 0.8 + 0.6 + 0) / 4, -0.5], atol=1e-6)


def test_topk_mean_with_k_one_is_the_nearest_anchor_of_each_class():
    out = class_scores(QUERIES, ANCHORS, ANCHOR_LABELS, 3, k=1)
    np.testing.assert_allclose(out.scores[:, :2], [[1, 0], [1, 0], [-0.6, 0.8]], atol=1e-6)


def test_centroid_and_ensemble_scores():
    cent = class_scores(QUERIES[:1], ANCHORS, ANCHOR_LABELS, 3, method="centroid")
    # Class 0 mean (.6, .6) normalises to 45 degrees; class 1 mean (-.5, -.5) to 225 degrees.
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(cent.scores, [[r, -r, -np.inf]], atol=1e-6)
    ens = class_scores(QUERIES[:1], ANCHORS, ANCHOR_LABELS, 3, k=3, method="ensemble")
    np.testing.assert_allclose(ens.scores, [[(0.8 + r) / 2, (-0.5 - r) / 2, -np.inf]], atol=1e-6)


def test_methods_disagree_where_the_geometry_says_they_should():
    # Class 0: one anchor right on the query, two behind it (its centroid points away from the query).
    # Class 1: two anchors at +-53 degrees (its centroid points at the query).
    anchors = np.array([[1, 0], [-0.6, 0.8], [-0.6, -0.8], [0.6, 0.8], [0.6, -0.8]], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    query = np.array([[1, 0]], dtype=np.float32)
    top1 = class_scores(query, anchors, labels, 2, k=1, method="topk_mean")
    np.testing.assert_allclose(top1.scores, [[1.0, 0.6]], atol=1e-6)
    assert top1.labels.tolist() == [0]
    cent = class_scores(query, anchors, labels, 2, method="centroid")
    np.testing.assert_allclose(cent.scores, [[-1.0, 1.0]], atol=1e-6)
    assert cent.labels.tolist() == [1]
    ens = class_scores(query, anchors, labels, 2, k=1, method="ensemble")
    np.testing.assert_allclose(ens.scores, [[0.0, 0.8]], atol=1e-6)
    assert ens.labels.tolist() == [1]
    np.testing.assert_allclose(ens.margins, [0.8], atol=1e-6)


def test_three_dimensional_anchors():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    anchors = np.stack([e1, e3, e2])
    labels = np.array([0, 0, 1])
    query = ((e1 + e2) / math.sqrt(2)).astype(np.float32)[None]
    out = class_scores(query, anchors, labels, 2, k=2)
    # Class 0: mean(cos 45, cos 90); class 1: cos 45.
    np.testing.assert_allclose(out.scores, [[cosd(45) / 2, cosd(45)]], atol=1e-6)
    assert out.labels.tolist() == [1]


def test_class_without_anchors_scores_minus_inf_and_is_never_chosen():
    # The only anchored class is the opposite of the query, yet it beats the empty class 0.
    out = class_scores(units(90), units(270), [1], 2, k=3)
    assert out.scores[0, 0] == -np.inf
    assert out.scores[0, 1] == pytest.approx(-1.0, abs=1e-6)
    assert out.labels.tolist() == [1]
    assert out.margins.tolist() == [0.0]  # fewer than two classes score


def test_no_anchors_at_all_gives_label_minus_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value" RuntimeWarning from -inf - -inf
        out = class_scores(units(0, 90), np.zeros((0, 2), np.float32), [], 3)
    assert np.isneginf(out.scores).all()
    assert out.labels.tolist() == [-1, -1]
    assert out.margins.tolist() == [0.0, 0.0]


def test_no_queries_gives_empty_results():
    out = class_scores(np.zeros((0, 2), np.float32), ANCHORS, ANCHOR_LABELS, 3)
    assert out.scores.shape == (0, 3)
    assert out.labels.shape == (0,)
    assert out.margins.shape == (0,)


def test_chunked_scoring_matches_one_block(monkeypatch):
    queries = units(0, 33, 77, 140, 200, 290, 355)
    whole = class_scores(queries, ANCHORS, ANCHOR_LABELS, 3, k=3)
    monkeypatch.setattr(anchors_mod, "_CHUNK", 2)
    chunked = class_scores(queries, ANCHORS, ANCHOR_LABELS, 3, k=3)
    np.testing.assert_array_equal(chunked.scores, whole.scores)
    np.testing.assert_array_equal(chunked.labels, whole.labels)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown classifier 'knn'"):
        class_scores(QUERIES, ANCHORS, ANCHOR_LABELS, 3, method="knn")


def test_anchor_count_mismatch_raises():
    with pytest.raises(ValueError, match="6 anchor vectors but 5 anchor labels"):
        class_scores(QUERIES, ANCHORS, ANCHOR_LABELS[:5], 3)


# -- knn_vote ----------------------------------------------------------------------------------------


def test_uniform_vote_is_a_majority_of_the_k_nearest():
    refs = units(0, 80, 85, 180, 175, 170)
    labels = [1, 0, 0, 2, 2, 2]
    vote = knn_vote(units(0), refs, labels, k=3)
    assert vote.labels.tolist() == [0]  # two of the three nearest are class 0
    assert vote.shares.tolist() == [pytest.approx(2 / 3)]
    assert vote.neighbours.tolist() == [[0, 1, 2]]


def test_weighted_vote_weighs_neighbours_by_cosine():
    refs = units(0, 80, 85, 180, 175, 170)
    labels = [1, 0, 0, 2, 2, 2]
    vote = knn_vote(units(0), refs, labels, k=3, weighted=True)
    assert vote.labels.tolist() == [1]  # 1.0 against cos 80 + cos 85 = 0.26
    total = 1 + cosd(80) + cosd(85)
    assert vote.shares[0] == pytest.approx(1 / total, abs=1e-6)


def test_vote_tie_goes_to_larger_summed_similarity_not_the_nearest():
    # Two votes each; class 0 owns the nearest neighbour but class 1 the larger summed cosine.
    refs = units(0, 60, 20, 30)
    vote = knn_vote(units(0), refs, [0, 0, 1, 1], k=4)
    assert vote.labels.tolist() == [1]
    assert vote.shares.tolist() == [0.5]


def test_vote_tie_on_count_and_sum_goes_to_the_nearest():
    # Class 0: cosines 1.0 and 0.5; class 1: 0.75 and 0.75 -> equal sums, class 0 has the nearest.
    s = math.sqrt(1 - 0.75**2)
    refs = np.array([[0.75, s], [0.5, math.sqrt(0.75)], [0.75, -s], [1, 0]], dtype=np.float32)
    vote = knn_vote(units(0), refs, [1, 0, 1, 0], k=4)
    assert vote.labels.tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
def test_vote_does_not_depend_on_reference_order(seed):
    rng = np.random.default_rng(seed)
    cases = [
        (units(0, 60, 20, 30), np.array([0, 0, 1, 1]), 4, 1),  # tie on count, sum decides
        (units(10, -10), np.array([0, 1]), 2, 0),  # exact tie everywhere: smaller class index
        (units(10, -10, 3), np.array([2, 1, 1]), 1, 1),  # plain nearest
        (units(0, 80, 85, 180), np.array([1, 0, 0, 2]), 3, 0),  # majority
    ]
    for refs, labels, k, expected in cases:
        order = rng.permutation(len(labels))
        vote = knn_vote(units(0), refs[order], labels[order], k=k)
        assert vote.labels.tolist() == [expected]


def test_exclude_self_skips_the_query_itself():
    refs = units(0, 5, 50, 55)
    labels = [0, 1, 1, 0]
    with_self = knn_vote(refs, refs, labels, k=1)
    assert with_self.labels.tolist() == labels  # each point is its own nearest neighbour
    without = knn_vote(refs, refs, labels, k=1, exclude_self=np.arange(4))
    assert without.labels.tolist() == [1, 0, 0, 1]
    assert without.neighbours.tolist() == [[1], [0], [3], [2]]


def test_exclude_self_keeps_k_other_neighbours():
    refs = units(0, 5, 10, 15)
    vote = knn_vote(refs[:1], refs, [0, 1, 1, 0], k=3, exclude_self=np.array([0]))
    assert vote.neighbours.tolist() == [[1, 2, 3]]
    assert vote.labels.tolist() == [1]


def test_fewer_references_than_k_pads_neighbours():
    vote = knn_vote(units(0), units(10, 20), [2, 2], k=4)
    assert vote.labels.tolist() == [2]
    assert vote.shares.tolist() == [1.0]
    assert vote.neighbours.tolist() == [[0, 1, -1, -1]]


def test_empty_reference_set_votes_minus_one():
    vote = knn_vote(units(0, 90), np.zeros((0, 2), np.float32), [], k=3)
    assert vote.labels.tolist() == [-1, -1]
    assert vote.shares.tolist() == [0.0, 0.0]
    assert vote.neighbours.tolist() == [[-1, -1, -1], [-1, -1, -1]]


# -- AnchorIndex -------------------------------------------------------------------------------------


@pytest.fixture()
def index() -> AnchorIndex:
    idx = AnchorIndex(dimension=2, n_classes=3)
    idx.add(["a", "b", "c", "d"], units(0, 90, 180, 60), [0, 1, 2, 1])
    return idx


def test_index_add_and_contains(index):
    assert len(index) == 4
    assert "a" in index and "d" in index and "z" not in index
    assert index.class_counts().tolist() == [1, 2, 1]


def test_index_remove_by_id(index):
    assert index.remove(["b", "nope"]) == 1
    assert len(index) == 3 and "b" not in index
    ids, vectors, labels = index.arrays()
    assert ids == ["a", "c", "d"]
    np.testing.assert_allclose(vectors, units(0, 180, 60), atol=1e-7)
    assert labels.tolist() == [0, 2, 1]
    # The removed vector is gone from the faiss index too: its direction now finds a neighbour.
    sims, found = index.search(units(90), 3)
    assert "b" not in found[0]
    assert index.remove(["b"]) == 0


def test_index_readding_an_id_replaces_label_and_vector(index):
    index.add(["b"], units(45), [0])  # a reviewer moves "b" to class 0, with an edited text
    assert len(index) == 4
    ids, vectors, labels = index.arrays()
    row = ids.index("b")
    assert labels[row] == 0
    np.testing.assert_allclose(vectors[row], unit(45), atol=1e-7)
    assert index.class_counts().tolist() == [2, 1, 1]
    sims, found = index.search(units(45), 4)
    assert found[0][0] == "b" and sims[0][0] == pytest.approx(1.0, abs=1e-6)
    assert sorted(found[0]) == ["a", "b", "c", "d"]  # one entry per id: no stale copy of "b"
    # At the old position (90 degrees) nothing sits any more: the best match is "d" at 60 degrees.
    sims, found = index.search(units(90), 1)
    assert found == [["d"]] and sims[0][0] == pytest.approx(cosd(30), abs=1e-6)


def test_index_duplicate_ids_in_one_call_raise_and_change_nothing(index):
    with pytest.raises(ValueError, match="duplicate"):
        index.add(["x", "x"], units(10, 20), [0, 0])
    assert len(index) == 4 and "x" not in index


@pytest.mark.parametrize("bad", [3, -1])
def test_index_bad_label_raises_and_changes_nothing(index, bad):
    with pytest.raises(ValueError, match="outside 0..2"):
        index.add(["a", "x"], units(10, 20), [0, bad])
    assert "x" not in index
    assert index.arrays()[2].tolist() == [0, 1, 2, 1]


def test_index_length_mismatch_raises(index):
    with pytest.raises(ValueError, match="same length"):
        index.add(["x", "y"], units(10), [0, 0])


def test_index_search_returns_nearest_ids(index):
    sims, found = index.search(units(10, 170), 2)
    assert found == [["a", "d"], ["c", "b"]]
    np.testing.assert_allclose(sims, [[cosd(10), cosd(50)], [cosd(10), cosd(80)]], atol=1e-6)
    sims, found = index.search(units(10), 10)  # k beyond the size is capped
    assert len(found[0]) == 4


def test_empty_index_search_arrays_and_classify():
    idx = AnchorIndex(dimension=2, n_classes=2)
    sims, found = idx.search(units(0, 90), 3)
    assert sims.shape == (2, 0) and found == [[], []]
    ids, vectors, labels = idx.arrays()
    assert ids == [] and vectors.shape == (0, 2) and labels.shape == (0,)
    assert idx.classify(units(0)).labels.tolist() == [-1]
    assert idx.class_counts().tolist() == [0, 0]


def test_index_arrays_stay_aligned_after_removals_and_readds():
    idx = AnchorIndex(dimension=2, n_classes=3)
    angles = {f"id{i}": 15 * i for i in range(8)}
    idx.add(list(angles), units(*angles.values()), [i % 3 for i in range(8)])
    idx.remove(["id1", "id4", "id6"])
    idx.add(["id2"], units(200), [2])
    ids, vectors, labels = idx.arrays()
    assert ids == ["id0", "id3", "id5", "id7", "id2"]
    expected_angle = {"id0": 0, "id3": 45, "id5": 75, "id7": 105, "id2": 200}
    np.testing.assert_allclose(vectors, units(*(expected_angle[i] for i in ids)), atol=1e-7)
    assert labels.tolist() == [0, 0, 2, 1, 2]
    # faiss agrees with the arrays: each stored vector finds its own id first.
    _, found = idx.search(vectors, 1)
    assert [f[0] for f in found] == ids


def test_index_classify_matches_class_scores(index):
    queries = units(10, 100, 260)
    got = index.classify(queries, k=2, method="ensemble")
    _, vectors, labels = index.arrays()
    want = class_scores(queries, vectors, labels, 3, k=2, method="ensemble")
    np.testing.assert_allclose(got.scores, want.scores)
    assert got.labels.tolist() == [0, 1, 2]


# -- cross-checking the anchors --------------------------------------------------------------------------


def test_cross_check_classifies_each_anchor_by_the_others():
    # Two tight clusters and one stray anchor of class 0 sitting inside class 1's cluster.
    vecs = units(0, 5, 10, 90, 95, 100, 92)
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    check = anchors_mod.cross_check_anchors(vecs, labels, 3, method="centroid", folds=len(labels))
    assert check.scores.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert check.usable.all()
    # Nearest other anchor carrying the predicted label: the stray's nearest class-1 anchor is 2 degrees away.
    assert check.nearest[6] == pytest.approx(cosd(2), abs=1e-6)
    assert check.nearest[0] == pytest.approx(cosd(5), abs=1e-6)
    assert np.all(np.isinf(check.scores.scores[:, 2]))


def test_cross_check_marks_a_class_left_without_anchors_unusable():
    vecs = units(0, 5, 90, 95, 180)
    labels = np.array([0, 0, 1, 1, 2])  # class 2 has a single anchor: held out, its class is empty
    check = anchors_mod.cross_check_anchors(vecs, labels, 3, method="topk_mean", k=1, folds=5)
    assert check.usable.tolist() == [True, True, True, True, False]
    assert check.scores.labels[:4].tolist() == [0, 0, 1, 1]


def test_cross_check_folds_are_capped_and_seeded():
    vecs = units(*range(0, 120, 10))
    labels = np.array([0] * 6 + [1] * 6)
    a = anchors_mod.cross_check_anchors(vecs, labels, 2, method="ensemble", folds=50, seed=3)
    b = anchors_mod.cross_check_anchors(vecs, labels, 2, method="ensemble", folds=50, seed=3)
    assert np.array_equal(a.scores.scores, b.scores.scores)
    with pytest.raises(ValueError, match="folds"):
        anchors_mod.cross_check_anchors(vecs, labels, 2, folds=1)


def test_cross_check_with_fewer_than_two_anchors_is_empty():
    check = anchors_mod.cross_check_anchors(units(0), np.array([0]), 2)
    assert check.usable.tolist() == [False]
    assert check.scores.labels.tolist() == [-1]
