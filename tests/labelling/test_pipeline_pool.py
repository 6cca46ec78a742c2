"""The pooled pipeline (combine="pool") with the real encoder and an LLM over HTTP whose reliability is known.

The LLM is the OpenAI-speaking test server scripted as an annotator of known quality: an oracle that picks
the gold label whenever it is among the candidates, or a careless one that always picks the first
candidate. The anchors must show the pipeline which is which.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.labelling.encoder import Encoder
from backend.labelling.llm import LLMAnnotator
from backend.labelling.pipeline import HCCConfig, HCCPipeline
from tests.fault_server import (  # noqa: F401 - fault_server_fixture registers the `fault_server` fixture
    Action,
    FaultServer,
    fault_server_fixture,
    ranked,
)

SAMPLES = Path(__file__).resolve().parents[2] / "backend" / "samples"


def rows(name: str) -> list[dict[str, str]]:
    with (SAMPLES / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


ANCHORS = rows("banking77_anchors.csv")
TASKS = rows("banking77_tasks.csv")
GOLD = {r["text"]: r["category"] for r in ANCHORS + TASKS}
LABELS = sorted({r["category"] for r in ANCHORS + TASKS})


def choice_request(body: dict[str, Any]) -> tuple[list[str], str]:
    """(candidates, text) of a choice-view request."""
    message = body["messages"][-1]["content"]
    candidates = re.findall(r"^- (\S+)$", message.split("\n\nText: ")[0], flags=re.M)
    return candidates, message.split("\n\nText: ", 1)[1]


def picks(choose) -> Any:
    """A responder that answers the candidate ``choose(candidates, text)`` with probability 0.9, listing
    every candidate as an alternative of its one token."""

    def respond(body: dict[str, Any]) -> Action:
        candidates, text = choice_request(body)
        chosen = choose(candidates, text)
        rest = [c for c in candidates if c != chosen]
        alternatives = [(chosen, math.log(0.9))] + [(c, math.log(0.1 / len(rest))) for c in rest]
        return ranked(chosen, [(chosen, math.log(0.9))], [alternatives])

    return respond


ORACLE = picks(lambda candidates, text: GOLD[text] if GOLD[text] in candidates else candidates[0])
CARELESS = picks(lambda candidates, text: candidates[0])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return Encoder(cache_dir=tmp_path_factory.mktemp("embeddings"))


def run(encoder: Encoder, server: FaultServer, tmp_path: Path, **config: Any):
    llm = LLMAnnotator(LABELS, base_url=server.url, structured="grammar", cache_dir=tmp_path, concurrency=2)
    pipeline = HCCPipeline(encoder, LABELS, llm=llm, config=HCCConfig(combine="pool", llm_views=("choice",),
                                                                      **config))
    pipeline.set_anchors([r["text"] for r in ANCHORS], [r["category"] for r in ANCHORS])
    return pipeline, pipeline.annotate([r["text"] for r in TASKS])


def accuracy(records: list[dict]) -> float:
    return float(np.mean([rec["label"] == task["category"] for rec, task in zip(records, TASKS, strict=True)]))


def test_a_strong_llm_is_followed_where_the_encoder_is_unsure(encoder, fault_server: FaultServer,
                                                              tmp_path: Path) -> None:
    fault_server.default = ORACLE
    pipeline, result = run(encoder, fault_server, tmp_path)
    evidence = result.report["combination"]
    assert evidence["llm_adopted"] and evidence["weights"][1] > evidence["weights"][0]
    encoder_accuracy = float(np.mean([r["encoder_label"] == t["category"] for r, t in zip(result.records, TASKS,
                                                                                           strict=True)]))
    assert accuracy(result.records) >= encoder_accuracy + 0.05
    asked = [r for r in result.records if "llm_choice" in r]
    assert 0 < len(asked) < len(TASKS)  # only where the encoder is unsure
    assert fault_server.request_count == evidence["anchor_llm_questions"] + len(asked) <= 100 + len(asked)
    assert {r["stage"] for r in asked} <= {"consistent", "combined"}
    assert all(r["stage"] == "encoder_only" for r in result.records if "llm_choice" not in r)
    for rec in asked:
        assert rec["llm_choice_distribution"][rec["llm_choice"]] == pytest.approx(0.9, abs=1e-3)
        assert rec["candidates"] == sorted(rec["candidates"], key=LABELS.index)
        assert 0.0 <= rec["score"] <= 1.0


def test_a_careless_llm_earns_no_weight_and_costs_no_item_question(encoder, fault_server: FaultServer,
                                                                   tmp_path: Path) -> None:
    fault_server.default = CARELESS
    pipeline, result = run(encoder, fault_server, tmp_path)
    evidence = result.report["combination"]
    assert not evidence["llm_adopted"] and "did not earn" in evidence["message"]
    assert fault_server.request_count == evidence["anchor_llm_questions"] > 0  # the anchors only
    assert [r["label"] for r in result.records] == [r["encoder_label"] for r in result.records]
    assert {r["stage"] for r in result.records} == {"encoder_only"}


def test_a_cap_of_zero_anchors_never_asks_the_llm_and_says_so(encoder, fault_server: FaultServer,
                                                                tmp_path: Path) -> None:
    fault_server.default = ORACLE  # even a perfect LLM: the user chose not to spend calls weighing it
    pipeline, result = run(encoder, fault_server, tmp_path, anchor_llm_cap=0)
    evidence = result.report["combination"]
    assert fault_server.request_count == 0 and not evidence["llm_adopted"]
    assert "never weighed, so never asked" in evidence["message"]
    assert [r["label"] for r in result.records] == [r["encoder_label"] for r in result.records]


def test_a_rerun_replays_stored_answers_without_a_call(encoder, fault_server: FaultServer, tmp_path: Path) -> None:
    from backend.labelling.pipeline import stored_answers

    fault_server.default = ORACLE
    pipeline, first = run(encoder, fault_server, tmp_path)
    calls = fault_server.request_count
    pipeline.set_anchors([r["text"] for r in ANCHORS[:-5]], [r["category"] for r in ANCHORS[:-5]])
    replay = pipeline.annotate([r["text"] for r in TASKS], answers=stored_answers(first.records, ("choice",)))
    assert fault_server.request_count == calls  # the re-vote kept the last pool and asked nothing
    assert accuracy(replay.records) >= accuracy(first.records) - 0.02


def test_a_label_without_anchors_is_predicted_from_its_name(encoder) -> None:
    absent = "terminate_account"
    anchors = [r for r in ANCHORS if r["category"] != absent]
    pipeline = HCCPipeline(encoder, LABELS)
    pipeline.set_anchors([r["text"] for r in anchors], [r["category"] for r in anchors])
    assert absent in pipeline.classes_without_anchors()
    texts = ["I want to terminate my account", "Please close my account"]
    labels = [r["label"] for r in pipeline.annotate(texts).records]
    assert labels == [absent, absent]
    blind = HCCPipeline(encoder, LABELS, config=HCCConfig(label_prototypes=False))
    blind.set_anchors([r["text"] for r in anchors], [r["category"] for r in anchors])
    assert absent not in [r["label"] for r in blind.annotate(texts).records]


def test_a_restarted_pipeline_revotes_with_the_views_weights_it_had(encoder, fault_server: FaultServer,
                                                                    tmp_path: Path) -> None:
    from backend.labelling.pipeline import stored_answers

    fault_server.default = ORACLE
    first_pipeline, first = run(encoder, fault_server, tmp_path)
    state = first_pipeline.pool_state()
    assert state["adopted"] and len(state["weights"]) == 2
    calls = fault_server.request_count
    restarted = HCCPipeline(encoder, LABELS, config=HCCConfig(combine="pool", llm_views=("choice",)))
    restarted.set_anchors([r["text"] for r in ANCHORS], [r["category"] for r in ANCHORS])
    answers = stored_answers(first.records, ("choice",))
    forgetful = restarted.annotate([r["text"] for r in TASKS], answers=answers)
    assert {r["stage"] for r in forgetful.records} == {"encoder_only"}  # no weights: the stored answers unused
    restarted.restore_pool(state)
    again = restarted.annotate([r["text"] for r in TASKS], answers=answers)
    assert [r["label"] for r in again.records] == [r["label"] for r in first.records]
    assert fault_server.request_count == calls


def shown_examples(body: dict[str, Any]) -> dict[str, str]:
    """label -> example text of a choice-view request that shows examples."""
    message = body["messages"][-1]["content"].split("\n\nText: ")[0]
    return dict(re.findall(r'^- (\S+)\n  labelled example: "(.*)"$', message, flags=re.M))


def test_each_candidate_is_shown_by_an_anchor_of_its_label_never_the_text_itself(
        encoder, fault_server: FaultServer, tmp_path: Path) -> None:
    fault_server.default = ORACLE
    run(encoder, fault_server, tmp_path, choice_examples=True)
    anchors = [(" ".join(r["text"].split()), r["category"]) for r in ANCHORS]
    assert fault_server.requests
    for body in fault_server.requests:
        candidates, text = choice_request(body)
        examples = shown_examples(body)
        assert examples and set(examples) <= set(candidates)
        for label, example in examples.items():
            shown = example.removesuffix("...")  # a long example is cut short
            givers = [t for t, lab in anchors if lab == label and t.startswith(shown)]
            assert givers  # a human gave the example that label
            assert " ".join(text.split()) not in givers  # an anchor is never its own example
