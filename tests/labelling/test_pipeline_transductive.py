"""The transductive refinement inside the pipeline, with the real encoder on the packaged Banking77 sample:
fitted once per anchor set on a large run, reused by small batches, and, when adopted, the centroids that
score the items and the anchors' cross-check that everything learnt from the anchors rests on."""

from __future__ import annotations

import numpy as np
import pytest

from backend.labelling.anchors import class_scores
from backend.labelling.encoder import Encoder
from backend.labelling.pipeline import HCCConfig, HCCPipeline
from backend.labelling.transductive import MIN_ITEMS
from tests.labelling.test_pipeline_pool import ANCHORS, LABELS, TASKS

TEXTS = [r["text"] for r in TASKS]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return Encoder(cache_dir=tmp_path_factory.mktemp("embeddings"))


def pipeline(encoder: Encoder, **config) -> HCCPipeline:
    built = HCCPipeline(encoder, LABELS, config=HCCConfig(**config))
    built.set_anchors([r["text"] for r in ANCHORS], [r["category"] for r in ANCHORS])
    return built


def test_a_large_run_fits_the_refinement_once_per_anchor_set_and_a_small_batch_reuses_it(encoder) -> None:
    hcc = pipeline(encoder)
    small = hcc.annotate(TEXTS[: MIN_ITEMS - 1])
    assert hcc.refinement() is None and "transductive" not in small.report  # too few items to learn from
    large = hcc.annotate(TEXTS)
    fitted = hcc.refinement()
    assert fitted is not None and fitted.items == len(TEXTS)
    assert large.report["transductive"]["message"] == fitted.message
    hcc.annotate(TEXTS[:5])
    hcc.annotate(TEXTS)
    assert hcc.refinement() is fitted  # not refitted while the anchors stay
    hcc.set_anchors([r["text"] for r in ANCHORS[:-10]], [r["category"] for r in ANCHORS[:-10]])
    assert hcc.refinement() is None


def test_switched_off_or_another_classifier_never_refines(encoder) -> None:
    for config in ({"transductive": False}, {"classifier": "topk_mean"}):
        hcc = pipeline(encoder, **config)
        result = hcc.annotate(TEXTS)
        assert hcc.refinement() is None and "transductive" not in result.report


def test_an_adopted_refinement_scores_the_items_and_the_anchors_cross_check(encoder) -> None:
    hcc = pipeline(encoder)
    plain = hcc.cross_check()
    prior_before = hcc.prior()
    refinement = hcc.refine(encoder.encode(TEXTS), z=-np.inf)  # adopted whatever the anchors say
    assert refinement.adopted
    assert hcc.cross_check() is refinement.cross_check is not plain
    assert hcc.prior() is not prior_before  # refitted on the refined cross-check
    result = hcc.annotate(TEXTS)
    vectors = encoder.encode(TEXTS)
    expected = (vectors @ refinement.centroids.T).argmax(axis=1)  # every sample label has anchors
    assert [r["label"] for r in result.records] == [LABELS[i] for i in expected]
    frozen = class_scores(vectors, hcc.anchor_vectors, hcc.anchor_labels, len(LABELS), method="centroid")
    assert not np.array_equal(expected, frozen.labels)  # the refinement moved labels, so this test can tell


def test_a_refit_that_drops_the_refinement_drops_what_was_learnt_from_it(encoder) -> None:
    hcc = pipeline(encoder)
    vectors = encoder.encode(TEXTS)
    assert hcc.refine(vectors, z=-np.inf).adopted
    refined_prior = hcc.prior()
    assert not hcc.refine(vectors, z=np.inf).adopted  # the next pre-labelling job's gate says no
    assert hcc.cross_check() is hcc._plain_check()
    assert hcc.prior() is not refined_prior  # refitted on the plain cross-check, not left on the refined one
