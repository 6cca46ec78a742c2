"""Confidence signals: the new record fields from the real encoder, the feature matrix, and the sampled
self-consistency signal against a scripted server and the real llama.cpp server."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.confidence.calibration import Calibrator
from backend.confidence.signals import add_self_consistency, feature_names, logit, self_consistency, signal_features
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder
from backend.labelling.llm import LLMAnnotator
from backend.labelling.pipeline import HCCPipeline, encoder_probabilities
from tests.fault_server import (  # noqa: F401 - fault_server_fixture registers the `fault_server` fixture
    Action,
    FaultServer,
    bad_request,
    fault_server_fixture,
    label,
)

SAMPLES = Path(__file__).resolve().parents[2] / "backend" / "samples"
LABELS = ["card_arrival", "card_linking", "exchange_rate"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return Encoder(DEFAULT_ENCODER, cache_dir=tmp_path_factory.mktemp("emb"))


def bundled_anchors(n_labels: int = 2) -> tuple[list[str], list[str]]:
    with (SAMPLES / "banking77_anchors.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    wanted = sorted({r["category"] for r in rows})[:n_labels]
    rows = [r for r in rows if r["category"] in wanted]
    return [r["text"] for r in rows], [r["category"] for r in rows]


# -- record fields from the real encoder -------------------------------------------------------------------


def test_pipeline_records_carry_encoder_probability_and_anchor_similarity(encoder: Encoder) -> None:
    texts, labels = bundled_anchors()
    label_set = sorted(set(labels))
    pipe = HCCPipeline(encoder, label_set)
    pipe.set_anchors(texts, labels)
    items = [texts[0], "my card still has not come in the post", "   "]
    out = pipe.annotate(items, skip=[False, False, True])

    vectors = encoder.encode(items[:2])
    anchors = encoder.encode(texts)
    for rec, vec in zip(out.records[:2], vectors, strict=True):
        assert 0 < rec["encoder_probability"] <= 1
        # Computed here from the raw vectors, independently of the pipeline.
        same = [j for j, lab in enumerate(labels) if lab == rec["label"]]
        assert rec["anchor_similarity"] == pytest.approx(float(max(anchors[same] @ vec)), abs=1e-5)
    assert out.records[0]["anchor_similarity"] == pytest.approx(1.0, abs=1e-5)  # the text is an anchor
    assert "encoder_probability" not in out.records[2]  # skipped rows carry no signals
    features = signal_features(out.records)
    assert np.isfinite(features.values).all()
    assert features.scored.tolist() == [True, True, False]
    assert not features.values[2].any()


def test_encoder_probabilities_are_a_softmax_that_ignores_classes_without_anchors() -> None:
    scores = np.array([[0.8, 0.7, -np.inf], [-np.inf, -np.inf, -np.inf]])
    probs = encoder_probabilities(scores, temperature=0.1)
    assert probs[0].sum() == pytest.approx(1.0)
    assert probs[0, 0] / probs[0, 1] == pytest.approx(math.exp(1.0))
    assert probs[0, 2] == 0.0
    assert probs[1].tolist() == [0.0, 0.0, 0.0]  # no class scores: no probability, no NaN


# -- the feature matrix ------------------------------------------------------------------------------------


def hcc_record(**fields: Any) -> dict[str, Any]:
    rec = {"text": "t", "label": "a", "stage": "consistent", "encoder_label": "a", "encoder_score": 0.7,
           "encoder_margin": 0.1, "encoder_probability": 0.8, "anchor_similarity": 0.9, "llm_zero_shot": "a",
           "llm_zero_shot_probability": 0.6, "llm_hinted": "a", "llm_hinted_probability": None, "score": 1.0}
    rec.update(fields)
    return rec


def test_features_of_hand_made_records() -> None:
    records = [
        hcc_record(),
        hcc_record(stage="round1", llm_zero_shot="b", llm_zero_shot_probability=0.9, vote_round1="a",
                   vote_round1_share=0.6, score=0.65),
        hcc_record(stage="unresolved", label="b", llm_zero_shot=None, llm_hinted="c", vote_round1="c",
                   vote_round1_share=0.8, vote_round2="b", vote_round2_share=0.4),
        {"text": "", "label": None, "stage": "skipped", "score": 0.0},
    ]
    s = signal_features(records)
    row = {name: s.values[:, j] for j, name in enumerate(s.names)}
    assert row["encoder_logit"][:3] == pytest.approx([logit(0.8)] * 3)
    assert row["backs_encoder"].tolist() == [1, 1, 0, 0]
    assert row["backs_zero_shot"].tolist() == [1, 0, 0, 0]
    assert row["agree_encoder=zero_shot=hinted"].tolist() == [1, 0, 0, 0]
    assert row["agree_encoder=hinted|zero_shot"].tolist() == [0, 1, 0, 0]
    assert row["agree_encoder|zero_shot|hinted"].tolist() == [0, 0, 1, 0]  # an invalid answer agrees with no one
    assert row["llm_zero_shot_p_backing"].tolist() == [0.6, 0, 0, 0]
    assert row["llm_zero_shot_p_against"].tolist() == [0, 0.9, 0, 0]
    assert row["llm_zero_shot_p_missing"].tolist() == [0, 0, 1, 0]  # invalid answer: missing
    assert row["llm_hinted_p_missing"][:3].tolist() == [1, 1, 1]
    assert row["vote_share"].tolist() == [0, 0.6, 0.4, 0]  # the last round counts
    assert [name for name in s.names if name.startswith("stage_")] == [
        "stage_consistent", "stage_round1", "stage_unresolved"]
    assert row["agreement_score"].tolist() == [1.0, 0.65, 1.0, 0.0]
    # Every agreement pattern has a column, seen or not: a calibrator's columns must not depend on luck.
    assert sum(name.startswith("agree_") for name in s.names) == 5


def test_self_consistency_features() -> None:
    records = [hcc_record(llm_self_consistency=2 / 3, llm_samples=["a", "a", "b"]),
               hcc_record(label="b", llm_self_consistency=None, llm_samples=[]),
               hcc_record()]  # a row the sampler did not reach
    s = signal_features(records)
    assert s.column("self_consistency").tolist() == pytest.approx([2 / 3, 0, 0])
    assert s.column("samples_back_label").tolist() == pytest.approx([2 / 3, 0, 0])
    assert s.column("self_consistency_missing").tolist() == [0, 1, 1]


def test_fixed_names_impute_what_older_records_lack() -> None:
    names = feature_names([hcc_record(llm_self_consistency=1.0, llm_samples=["a"])])
    old = {"text": "t", "label": "a", "stage": "consistent", "encoder_label": "a", "score": 1.0}
    s = signal_features([old], names=names)
    assert s.names == names
    assert s.column("self_consistency_missing").tolist() == [1.0]
    assert s.column("llm_zero_shot_p_missing").tolist() == [1.0]
    assert s.column("encoder_logit").tolist() == [0.0]
    assert np.isfinite(s.values).all()


def test_prior_logit_is_the_records_prior_else_the_packaged_mapping_of_its_signals() -> None:
    from backend.confidence.prior import PriorMapping, prior_features

    new = hcc_record(prior_probability=0.3)
    names = feature_names([new])
    assert names[0] == "prior_logit"
    old = hcc_record()  # written before records carried their run's prior mapping
    s = signal_features([new, old], names=names)
    packaged = PriorMapping().log_odds(prior_features(old["encoder_probability"], old["anchor_similarity"]))
    assert s.column("prior_logit").tolist() == pytest.approx([float(logit(0.3)), float(packaged)])
    assert "prior_logit" not in feature_names([old])


def test_a_pooled_records_own_probability_is_the_calibrators_base() -> None:
    # Known truth: each label is right with probability `score`; prior_probability says nothing about it.
    rng = np.random.default_rng(0)
    score = rng.uniform(0.05, 0.95, 400)
    right = rng.random(400) < score
    records = [hcc_record(prior_probability=0.9, score=round(float(p), 4), score_kind="probability")
               for p in score]
    s = signal_features(records)
    assert s.column("prior_logit").tolist() == pytest.approx(logit(np.round(score, 4)).tolist())
    # Before any review the calibrator gives the score back, not the uninformative 0.9 ...
    p = Calibrator().fit(s.values[:0], right[:0], feature_names=s.names).predict_proba(s.values)
    assert p == pytest.approx(np.round(score, 4), abs=1e-3)
    # ... and an agreement share (a DCCA record) is never read as one.
    dcca = signal_features([hcc_record(prior_probability=0.3, score=1.0, score_kind="agreement")])
    assert dcca.column("prior_logit").tolist() == pytest.approx([float(logit(0.3))])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"encoder_probability": "high"}, "'encoder_probability'"),
        ({"prior_probability": 2.0}, "'prior_probability'"),
        ({"llm_zero_shot_probability": 1.5}, "'llm_zero_shot_probability'"),
        ({"llm_self_consistency": 0.5, "llm_samples": "a"}, "'llm_samples'"),
        ({"vote_round1": "a", "vote_round1_share": [1]}, "'vote_round1_share'"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        signal_features([hcc_record(**fields)])


def test_non_finite_numbers_are_missing_not_nan() -> None:
    s = signal_features([hcc_record(encoder_margin=float("nan"), llm_zero_shot_probability=float("inf"))])
    assert np.isfinite(s.values).all()
    assert s.column("llm_zero_shot_p_missing").tolist() == [1.0]


def test_records_must_be_a_list_of_dicts() -> None:
    with pytest.raises(ValueError, match="record 1"):
        signal_features([hcc_record(), "not a record"])
    with pytest.raises(ValueError, match="list of dicts"):
        signal_features(hcc_record())


# -- self-consistency --------------------------------------------------------------------------------------


def by_seed(labels_by_seed: dict[int, str]):
    """A responder that answers according to the request's seed (greedy requests carry seed 0)."""

    def respond(body: dict[str, Any]) -> Action:
        return label(labels_by_seed.get(body.get("seed"), "card_arrival"))

    return respond


def test_self_consistency_sends_k_seeded_samples_and_caches_them(fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = by_seed({1: "card_arrival", 2: "card_linking", 3: "not-a-label"})
    llm = LLMAnnotator(LABELS, base_url=fault_server.url, cache_dir=tmp_path, concurrency=1, max_retries=0)
    texts = ["where is my card", "link my card"]

    shares, samples = self_consistency(llm, texts, ["card_arrival", "card_linking"], k=3, temperature=0.8)

    assert shares == pytest.approx([1 / 3, 1 / 3], abs=1e-4)  # an answer outside the label set disagrees
    assert samples[0] == ["card_arrival", "card_linking", None]
    assert sorted({(b["seed"], b["temperature"]) for b in fault_server.requests}) == [(1, 0.8), (2, 0.8), (3, 0.8)]
    sent = fault_server.request_count
    again = self_consistency(llm, texts, ["card_arrival", None], k=3, temperature=0.8)
    assert fault_server.request_count == sent  # every sample came from the cache
    assert again[0] == [pytest.approx(1 / 3, abs=1e-4), None]  # no valid greedy answer: nothing to be consistent with


def test_greedy_requests_keep_their_cache_key(fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = label("card_arrival")
    llm = LLMAnnotator(LABELS, base_url=fault_server.url, cache_dir=tmp_path, concurrency=1)
    llm.zero_shot(["where is my card"])
    llm.zero_shot(["where is my card"], temperature=0.0, seed=0)  # the defaults spelled out: same request
    assert fault_server.request_count == 1


def test_failed_samples_do_not_count(fault_server: FaultServer) -> None:
    fault_server.script(label("card_arrival"), Action(status=500, message="down"))
    fault_server.default = label("card_arrival")
    llm = LLMAnnotator(LABELS, base_url=fault_server.url, concurrency=1, max_retries=0)
    shares, samples = self_consistency(llm, ["where is my card"], ["card_arrival"], k=2)
    assert shares == [1.0] and samples == [["card_arrival"]]


@pytest.mark.parametrize(("options", "message"), [
    ({"k": 0}, "k must be"), ({"temperature": 0.0}, "temperature must be > 0"), ({"view": "few_shot"}, "view"),
])
def test_self_consistency_rejects_bad_options(fault_server: FaultServer, options: dict, message: str) -> None:
    llm = LLMAnnotator(LABELS, base_url=fault_server.url)
    with pytest.raises(ValueError, match=message):
        self_consistency(llm, ["x"], ["card_arrival"], **options)
    assert fault_server.request_count == 0


def test_server_without_logprobs_gives_flagged_missing_probabilities(fault_server: FaultServer) -> None:
    def no_logprobs(body: dict[str, Any]) -> Action:
        return bad_request("'logprobs' is not supported") if body.get("logprobs") else label("card_arrival")

    fault_server.default = no_logprobs
    llm = LLMAnnotator(LABELS, base_url=fault_server.url, concurrency=1, max_retries=0)
    answers = llm.zero_shot(["where is my card", "link my card", "rate for euros"] * 8)
    records = [hcc_record(label="card_arrival", encoder_label="card_arrival", llm_zero_shot=a.label,
                          llm_zero_shot_probability=a.probability, llm_hinted="card_arrival",
                          encoder_probability=0.5 + 0.02 * i) for i, a in enumerate(answers)]
    s = signal_features(records)
    assert s.column("llm_zero_shot_p_missing").tolist() == [1.0] * len(records)
    cal = Calibrator().fit(s.values, [i % 3 != 0 for i in range(len(records))], feature_names=s.names)
    assert any("no LLM token probabilities" in note for note in cal.notes_)
    assert np.isfinite(cal.predict_proba(s.values)).all()


def test_self_consistency_on_the_real_llm_server(llm_server: str, tmp_path: Path) -> None:
    llm = LLMAnnotator(LABELS, base_url=llm_server, cache_dir=tmp_path, concurrency=1, logprobs=False,
                       structured="grammar", max_tokens=16, timeout=120)
    texts = ["my card has not arrived"]
    greedy = llm.zero_shot(texts)
    records = [{"text": t, "label": a.label or "card_arrival", "llm_zero_shot": a.label}
               for t, a in zip(texts, greedy, strict=True)]

    add_self_consistency(records, llm, k=2, temperature=1.0)

    for rec in records:
        assert all(s in LABELS for s in rec["llm_samples"])  # the grammar holds samples to the label set
        assert rec["llm_self_consistency"] in (0.0, 0.5, 1.0)
    calls = llm.stats.calls
    add_self_consistency(records, llm, k=2, temperature=1.0)
    assert llm.stats.calls == calls  # a re-run is served from the cache
