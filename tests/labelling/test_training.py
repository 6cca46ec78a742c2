"""Training the encoder on anchors: the real MiniLM, real training steps, synthetic data with a known truth
(:func:`tests.synthetic_text.misleading_set`: the frozen encoder is misled by boiler-plate, a trained one learns
to read the word that decides the label)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.labelling.anchors import class_scores
from backend.labelling.encoder import Encoder, text_key
from backend.labelling.training import (
    RESULT_FILE,
    TrainingConfig,
    TrainingError,
    adopt,
    load_result,
    split_anchors,
    train_encoder,
    training_key,
)
from tests.synthetic_text import SUBJECTS, misleading_set

FAST = TrainingConfig(max_steps=24, batch_size=16, min_anchors=20, refit=True)


def held_out_accuracy(model: str, texts: list[str], labels: list[str], test_texts, test_labels) -> float:
    encoder = Encoder(model, show_progress=False, precision="float32")
    index = {label: i for i, label in enumerate(SUBJECTS)}
    scored = class_scores(encoder.encode(test_texts), encoder.encode(texts), np.array([index[x] for x in labels]),
                          len(SUBJECTS), method="centroid")
    return float(np.mean(scored.labels == np.array([index[x] for x in test_labels])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    texts, labels = misleading_set(15, seed=0)
    root = tmp_path_factory.mktemp("trained")
    ticks: list[tuple[int, int]] = []
    result = train_encoder("all-MiniLM-L6-v2", texts, labels, trained_dir=root, config=FAST,
                           progress=lambda step, total: ticks.append((step, total)))
    result.ticks = ticks  # what /status would have shown
    return texts, labels, root, result


def test_training_fixes_what_the_frozen_encoder_gets_wrong_and_is_adopted(trained):
    texts, labels, _, result = trained
    assert result.adopted, result.reason
    assert result.holdout_right_after > result.holdout_right_before
    assert result.holdout_log_likelihood_after > result.holdout_log_likelihood_before
    assert result.fit_anchors + result.holdout_anchors == len(texts)
    # Adopted, the recipe is trained again from the base model on every anchor, held-out ones included.
    assert result.refit_anchors == len(texts) and result.steps == 2 * FAST.max_steps
    assert "trained again on all 60 anchors" in result.reason
    test_texts, test_labels = misleading_set(10, seed=1)  # texts neither model saw
    frozen = held_out_accuracy("all-MiniLM-L6-v2", texts, labels, test_texts, test_labels)
    after = held_out_accuracy(result.model_path, texts, labels, test_texts, test_labels)
    assert after > frozen + 0.1, (frozen, after)


def test_progress_counts_both_passes_on_one_scale(trained):
    ticks = trained[3].ticks
    assert [step for step, _ in ticks] == list(range(1, 2 * FAST.max_steps + 1))  # never starts again at 1
    assert {total for _, total in ticks} == {2 * FAST.max_steps}


def test_without_refit_the_fit_part_model_is_kept(tmp_path):
    texts, labels = misleading_set(15, seed=0)
    config = TrainingConfig(max_steps=24, batch_size=16, min_anchors=20)  # refit is off by default
    result = train_encoder("all-MiniLM-L6-v2", texts, labels, trained_dir=tmp_path, config=config)
    assert result.adopted and result.refit_anchors == 0 and result.steps == config.max_steps
    # The record names the texts the model saw: the fit part, never the held-out anchors.
    fit, held = split_anchors(labels, holdout=config.holdout, seed=config.seed)
    assert set(result.trained_on) == {text_key(texts[i]) for i in fit}
    assert not set(result.trained_on) & {text_key(texts[i]) for i in held}
    assert Encoder(result.model_path).trained_on == set(result.trained_on)  # what the pipeline reads


def test_the_record_lists_what_the_model_saw_and_reports_count_it(trained):
    texts, _, root, result = trained
    assert set(result.trained_on) == {text_key(t) for t in texts}  # refit: every anchor
    saved = json.loads((root / result.key / RESULT_FILE).read_text())
    assert saved["trained_on"] == result.trained_on
    assert result.as_dict()["trained_on"] == len(texts)  # a report (CLI, /status) gives the count
    assert load_result(root / result.key).trained_on == result.trained_on


def test_a_rerun_with_the_same_anchors_reuses_the_saved_model(trained):
    texts, labels, root, first = trained
    again = train_encoder("all-MiniLM-L6-v2", list(reversed(texts)), list(reversed(labels)), trained_dir=root,
                          config=FAST)  # the anchors as a set: order does not matter
    assert again.reused and again.model_path == first.model_path and again.key == first.key
    saved = json.loads((root / first.key / RESULT_FILE).read_text())
    assert saved["adopted"] is True and saved["holdout_right_after"] == first.holdout_right_after
    changed = train_encoder("all-MiniLM-L6-v2", texts[:-1], labels[:-1], trained_dir=root,
                            config=TrainingConfig(max_steps=1, batch_size=16, min_anchors=20))
    assert not changed.reused and changed.key != first.key


@pytest.mark.parametrize("refit", [True, False])
def test_a_training_that_ruins_the_encoder_is_not_adopted(tmp_path, refit):
    texts, labels = misleading_set(15, seed=2)
    # A learning rate far too high scrambles the weights: held-out anchors must catch it.
    ruinous = TrainingConfig(max_steps=8, batch_size=16, min_anchors=20, learning_rate=0.05, top_layers=0,
                             refit=refit)
    ticks: list[tuple[int, int]] = []
    result = train_encoder("all-MiniLM-L6-v2", texts, labels, trained_dir=tmp_path, config=ruinous,
                           progress=lambda step, total: ticks.append((step, total)))
    # Progress ends once at its total: a planned refit that will not run jumps there, nothing else repeats.
    planned = 2 * ruinous.max_steps if refit else ruinous.max_steps
    expected = [(step, planned) for step in range(1, ruinous.max_steps + 1)]
    assert ticks == expected + ([(planned, planned)] if refit else [])
    assert not result.adopted and result.model_path is None
    assert result.holdout_right_after <= result.holdout_right_before
    assert "kept the frozen encoder" in result.reason and result.refit_anchors == 0
    assert result.steps == ruinous.max_steps  # no refit of a recipe the held-out anchors rejected
    assert not any(tmp_path.glob("*/config.json"))  # no model saved; only the result, so a re-run is free
    assert load_result(tmp_path / result.key).adopted is False


def test_too_few_anchors_is_a_result_not_an_error(tmp_path):
    result = train_encoder("all-MiniLM-L6-v2", ["a b", "c d", "e f"], ["x", "y", "x"], trained_dir=tmp_path)
    assert not result.adopted and result.steps == 0
    assert "not trained" in result.reason and "at least 40 anchors" in result.reason


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="loss must be one of"):
        train_encoder("all-MiniLM-L6-v2", ["a"], ["x"], trained_dir=tmp_path, config=TrainingConfig(loss="magic"))
    with pytest.raises(TrainingError, match="holdout"):
        TrainingConfig(holdout=1.5).validate()
    with pytest.raises(TrainingError, match="2 anchor texts but 1 labels"):
        train_encoder("all-MiniLM-L6-v2", ["a", "b"], ["x"], trained_dir=tmp_path)
    with pytest.raises(TrainingError, match="cannot load encoder"):
        train_encoder(str(tmp_path / "nowhere"), *misleading_set(15, seed=0), trained_dir=tmp_path, config=FAST)


def test_the_pairs_loss_trains_too(tmp_path):
    texts, labels = misleading_set(15, seed=3)
    config = TrainingConfig(loss="pairs", max_steps=6, batch_size=4, min_anchors=20)
    result = train_encoder("all-MiniLM-L6-v2", texts, labels, trained_dir=tmp_path, config=config)
    assert result.steps == 6 and result.holdout_anchors == 12


def test_split_holds_out_a_share_of_each_label_and_keeps_single_anchors_to_fit():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    fit, held = split_anchors(labels, holdout=0.2, seed=0)
    assert sorted([*fit, *held]) == list(range(len(labels)))
    assert [labels[i] for i in held].count("a") == 2 and [labels[i] for i in held].count("b") == 1
    assert 15 in fit  # the only "c" must stay to have a centroid
    assert split_anchors(labels, holdout=0.2, seed=0)[1].tolist() == held.tolist()  # seeded


def test_the_key_names_base_model_anchors_and_settings():
    texts, labels = ["x", "y"], ["a", "b"]
    key = training_key("m", texts, labels, TrainingConfig())
    assert key == training_key("m", texts[::-1], labels[::-1], TrainingConfig())
    assert key != training_key("other", texts, labels, TrainingConfig())
    assert key != training_key("m", texts, ["a", "a"], TrainingConfig())
    assert key != training_key("m", texts, labels, TrainingConfig(epochs=3))


def test_adoption_needs_more_right_or_a_tie_with_a_better_likelihood():
    assert adopt(50, 53, -1.2, -1.5)  # more right wins, whatever the likelihood
    assert not adopt(53, 50, -1.5, -1.0)
    assert adopt(54, 54, -1.3, -1.1) and not adopt(54, 54, -1.1, -1.3)  # a tie: the likelihood decides
    assert not adopt(54, 54, -1.1, -1.1)  # nothing gained: keep the frozen encoder
