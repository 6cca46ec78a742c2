"""The pooled score's temperature over a trained encoder: fitted on the anchors the encoder never saw.

A known truth on the real MiniLM: the anchors a "trained" encoder saw are easy (one short sentence per
label, said a few ways: what training makes of the anchors it fits), the anchors it never saw are as hard as
the texts to label (long boiler-plate paragraphs, :func:`tests.synthetic_text.misleading_set`, a quarter of
them labelled by a coin: texts the encoder cannot get right). A temperature fitted on every anchor learns the
easy anchors' confidence and over-states the new texts' chance of being right; fitted on the unseen anchors
it does not. The encoder is the packaged MiniLM behind a directory with a training record, which is what
makes an encoder "trained" to the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.labelling.encoder import TRAINING_RECORD, Encoder, resolve_model_path, text_key, trained_on
from backend.labelling.pipeline import MIN_UNSEEN_ANCHORS, HCCConfig, HCCPipeline
from tests.synthetic_text import SUBJECTS, misleading_set

EASY_WAYS = ("Subject: {}.", "It is about {}.", "{} question", "My {} issue", "Topic {}", "{}")


def easy_anchors() -> tuple[list[str], list[str]]:
    texts = [way.format(subject) for subject in SUBJECTS for way in EASY_WAYS]
    return texts, [subject for subject in SUBJECTS for _ in EASY_WAYS]


def noisy(labels: list[str], seed: int) -> list[str]:
    """A quarter of the labels replaced by another label, at random (seeded)."""
    rng = np.random.default_rng(seed)
    return [str(rng.choice([s for s in SUBJECTS if s != label])) if rng.random() < 0.25 else label
            for label in labels]


def encoder_trained_on(tmp_path: Path, texts: list[str]) -> Encoder:
    """The packaged MiniLM in a directory of its own, with a record saying it was trained on ``texts``."""
    model = tmp_path / "model"
    model.mkdir()
    for entry in Path(resolve_model_path("all-MiniLM-L6-v2")).iterdir():
        (model / entry.name).symlink_to(entry)
    (model / TRAINING_RECORD).write_text(json.dumps({"adopted": True, "trained_on": [text_key(t) for t in texts]}))
    return Encoder(str(model), show_progress=False, precision="float32")


def pipeline(encoder, texts: list[str], labels: list[str]) -> HCCPipeline:
    pipe = HCCPipeline(encoder, list(SUBJECTS), config=HCCConfig(label_prototypes=False, transductive=False))
    pipe.set_anchors(texts, labels)
    return pipe


@pytest.fixture(scope="module")
def anchors() -> tuple[list[str], list[str], list[str], list[str]]:
    easy_texts, easy_labels = easy_anchors()
    hard_texts, hard_labels = misleading_set(8, seed=4)  # 32 anchors the encoder never saw
    return easy_texts, easy_labels, hard_texts, noisy(hard_labels, seed=4)


def test_the_temperature_is_fitted_on_the_anchors_the_trained_encoder_never_saw(tmp_path, anchors):
    easy_texts, easy_labels, hard_texts, hard_labels = anchors
    texts, labels = easy_texts + hard_texts, easy_labels + hard_labels
    trained = pipeline(encoder_trained_on(tmp_path, easy_texts), texts, labels)
    frozen = pipeline(Encoder("all-MiniLM-L6-v2", show_progress=False, precision="float32"), texts, labels)
    seen_as_trained, seen_as_frozen = trained.evidence(), frozen.evidence()
    assert seen_as_trained.unseen_only and not seen_as_frozen.unseen_only
    assert seen_as_trained.anchors == seen_as_frozen.anchors == len(texts)
    assert seen_as_trained.temperature_anchors == len(hard_texts)
    assert seen_as_frozen.temperature_anchors == len(texts)

    # The known truth: on new hard texts, the score fitted on the unseen anchors is the honest one.
    new_texts, new_labels = misleading_set(15, seed=5)
    new_labels = noisy(new_labels, seed=5)
    outcomes = {}
    for name, pipe in (("unseen", trained), ("every", frozen)):
        records = pipe.annotate(new_texts).records
        right = np.mean([r["label"] == gold for r, gold in zip(records, new_labels, strict=True)])
        outcomes[name] = (float(np.mean([r["score"] for r in records])), float(right))
    (unseen_score, accuracy), (every_score, same_accuracy) = outcomes["unseen"], outcomes["every"]
    assert accuracy == same_accuracy  # the same model and anchors: only the temperature differs
    assert seen_as_trained.encoder_weight < seen_as_frozen.encoder_weight
    assert abs(unseen_score - accuracy) < abs(every_score - accuracy), outcomes


def test_too_few_unseen_anchors_fit_the_temperature_on_all_of_them(tmp_path, anchors):
    easy_texts, easy_labels, hard_texts, hard_labels = anchors
    few = MIN_UNSEEN_ANCHORS // 2
    texts, labels = easy_texts + hard_texts, easy_labels + hard_labels
    saw_most = encoder_trained_on(tmp_path, easy_texts + hard_texts[few:])
    evidence = pipeline(saw_most, texts, labels).evidence()
    assert not evidence.unseen_only and evidence.temperature_anchors == len(texts)


def test_an_unreadable_or_missing_training_record_means_nothing_was_seen(tmp_path):
    assert trained_on("all-MiniLM-L6-v2") == frozenset()  # a packaged name: no record
    (tmp_path / TRAINING_RECORD).write_text("{torn")
    assert trained_on(str(tmp_path)) == frozenset()
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"adopted": True}))  # a record from before the list
    assert trained_on(str(tmp_path)) == frozenset()
