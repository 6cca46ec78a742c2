"""The classifier the anchors choose (``classifier="auto"``, anchors.choose_classifier), on synthetic
embeddings whose class structure is known: classes made of several far-apart sub-topics need the top-k
ensemble (a centroid falls between the sub-topics); compact classes keep the centroid."""

from __future__ import annotations

import numpy as np
import pytest

from backend.labelling.anchors import AUTO, choose_classifier, class_scores
from backend.labelling.pipeline import HCCConfig, HCCPipeline

CLASSES, DIM = 12, 48


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def classes(seed: int, *, topics: int, anchors_per_topic: int, spread: float, items_per_topic: int = 20):
    """(anchors, anchor labels, items, item labels): each class is ``topics`` random sub-topic centres."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(CLASSES * topics, DIM)))
    owner = np.repeat(np.arange(CLASSES), topics)

    def around(per_topic: int) -> tuple[np.ndarray, np.ndarray]:
        topic = np.repeat(np.arange(len(centres)), per_topic)
        return unit(centres[topic] + spread * rng.normal(size=(len(topic), DIM))), owner[topic]

    return (*around(anchors_per_topic), *around(items_per_topic))


def accuracy(method: str, anchors, anchor_labels, items, item_labels) -> float:
    return float((class_scores(items, anchors, anchor_labels, CLASSES, method=method).labels == item_labels).mean())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_classes_of_several_sub_topics_choose_the_ensemble_and_it_is_right_to(seed: int) -> None:
    anchors, labels, items, truth = classes(seed, topics=4, anchors_per_topic=5, spread=0.12)
    choice = choose_classifier(anchors, labels, CLASSES)
    assert choice.method == "ensemble", choice.message
    assert choice.gain > 2 * choice.standard_error > 0
    assert choice.accuracy["ensemble"] > choice.accuracy["centroid"]
    # the anchors told the truth: on the unseen items the ensemble beats the centroid too
    assert accuracy("ensemble", anchors, labels, items, truth) > accuracy("centroid", anchors, labels, items, truth)
    assert choice.cross_check is not None and len(choice.cross_check.usable) == len(labels)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compact_classes_keep_the_centroid(seed: int) -> None:
    anchors, labels, _items, _truth = classes(seed, topics=1, anchors_per_topic=8, spread=0.25)
    choice = choose_classifier(anchors, labels, CLASSES)
    assert choice.method == "centroid", choice.message
    assert choice.gain == 0.0 and "no other gains 2 standard errors" in choice.message


def test_a_large_anchor_set_is_judged_on_a_stable_sample() -> None:
    anchors, labels, _items, _truth = classes(4, topics=4, anchors_per_topic=5, spread=0.12)
    first = choose_classifier(anchors, labels, CLASSES, max_anchors=120)
    again = choose_classifier(anchors, labels, CLASSES, max_anchors=120)
    assert first.anchors <= 120 and first.as_dict() == again.as_dict()
    assert first.cross_check is None  # a sample's folds are not the pipeline's: it checks all anchors itself


class VectorEncoder:
    """The pipeline's encoder dependency: each text names its row of a fixed matrix ("v12")."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors.astype(np.float32)

    def encode(self, texts):
        return self.vectors[[int(t[1:]) for t in texts]] if texts else np.zeros((0, self.vectors.shape[1]),
                                                                             np.float32)


def pipeline_over(anchors, labels, items, config: HCCConfig) -> tuple[HCCPipeline, list[str]]:
    vectors = np.vstack([anchors, items])
    names = [f"c{i}" for i in range(CLASSES)]
    hcc = HCCPipeline(VectorEncoder(vectors), names, config=config)
    hcc.set_anchors([f"v{i}" for i in range(len(anchors))], [names[c] for c in labels])
    return hcc, [f"v{len(anchors) + i}" for i in range(len(items))]


def test_the_pipeline_labels_with_the_chosen_classifier_and_says_so() -> None:
    anchors, labels, items, truth = classes(5, topics=4, anchors_per_topic=5, spread=0.12)
    auto, texts = pipeline_over(anchors, labels, items, HCCConfig())
    assert HCCConfig().classifier == AUTO
    result = auto.annotate(texts)
    assert auto.classifier == "ensemble"
    assert result.report["classifier"]["method"] == "ensemble"
    assert "transductive" not in result.report  # the refinement moves centroids: not this classifier's
    fixed, _ = pipeline_over(anchors, labels, items, HCCConfig(classifier="ensemble"))
    assert [r["label"] for r in result.records] == [r["label"] for r in fixed.annotate(texts).records]
    centroid, _ = pipeline_over(anchors, labels, items, HCCConfig(classifier="centroid"))
    assert centroid.classifier_choice().message == "classifier centroid (configured)"
    right = np.mean([r["label"] == f"c{c}" for r, c in zip(result.records, truth, strict=True)])
    plain = np.mean([r["label"] == f"c{c}" for r, c in zip(centroid.annotate(texts).records, truth, strict=True)])
    assert right > plain
    # a new anchor set is judged anew
    auto.set_anchors([f"v{i}" for i in range(0, len(anchors), 2)], [f"c{c}" for c in labels[::2]])
    assert auto._choice is None


def test_the_settings_accept_auto_and_name_a_bad_classifier(monkeypatch) -> None:
    from backend.studio.settings import Settings

    monkeypatch.setenv("HCC_CLASSIFIER", "auto")
    assert Settings.from_env().hcc.classifier == AUTO
    monkeypatch.setenv("HCC_CLASSIFIER", "nearest")
    with pytest.raises(ValueError, match="HCC_CLASSIFIER must be one of auto, "):
        Settings.from_env()
