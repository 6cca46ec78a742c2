"""The choice view on the anchors the encoder is least sure of: candidates by name only, or by name and the
team's nearest anchor of each (``HCCConfig.choice_examples``). Scores what the pipeline itself weighs: the
LLM's hit rate on those anchors and the pool's out-of-fold gain. 5% anchors, plain random draws.

    .venv/bin/hcc llm serve --port 8081 &
    .venv/bin/python bench/choice_examples.py --datasets banking77,massive_scenario --draws 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import DEFAULT_LLM_MODEL, cache_dir  # noqa: E402
from backend.labelling.combination import top_candidates  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from backend.labelling.llm import LLMAnnotator  # noqa: E402
from backend.labelling.pipeline import HCCConfig, HCCPipeline, _scaled_log_probs  # noqa: E402
from bench.views import DATA, DATASETS, read_jsonl  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "choice_examples.json"


def anchor_evidence(pipeline: HCCPipeline, labels: list[str]) -> dict:
    """Ask the choice view about the anchors the pipeline would ask about, as :meth:`HCCPipeline.evidence`
    does, and score the answers against the anchors' labels."""
    cfg = pipeline.config
    check = pipeline.cross_check()
    rows = np.flatnonzero(check.usable)
    scores = pipeline._complete(check.scores, pipeline.anchor_vectors).scores[rows]
    truth = pipeline.anchor_labels[rows]
    log_probs = _scaled_log_probs(scores, pipeline.evidence(allow_llm=False).encoder_weight)
    confident = np.exp(log_probs.max(axis=1))
    asked = pipeline._anchors_to_ask(rows, np.flatnonzero(confident < cfg.llm_gate), confident)
    candidates = top_candidates(scores, cfg.choice_candidates)
    started = time.perf_counter()
    answers = pipeline._ask([pipeline.anchor_texts[rows[i]] for i in asked], candidates[asked], scores[asked],
                            False, "anchors", vectors=pipeline.anchor_vectors[rows[asked]], own=rows[asked])
    seconds = time.perf_counter() - started
    pipeline._evidence = None  # the pool's own fit below replays the cached answers
    pool = pipeline.evidence().pool
    return {"asked": int(len(asked)),
            "llm_right": float(np.mean([a.label == labels[truth[i]]
                                        for a, i in zip(answers["choice"], asked, strict=True)])),
            "enc_right": float(np.mean([scores[i].argmax() == truth[i] for i in asked])),
            "recall": float(np.mean([truth[i] in candidates[i] for i in asked])),
            "adopted": bool(pool.adopted), "gain": pool.gain, "se": pool.standard_error, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--draws", default="0", help="comma-separated draw numbers")
    ap.add_argument("--llm-base-url", default="http://127.0.0.1:8081/v1")
    ap.add_argument("--llm-model", default=DEFAULT_LLM_MODEL)
    args = ap.parse_args()
    encoder = Encoder(DEFAULT_ENCODER, cache_dir=cache_dir() / "embeddings", show_progress=False)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.datasets.split(","):
        large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
        labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
        for draw in (int(d) for d in args.draws.split(",")):
            anchors = random.Random(draw).sample(large, round(0.05 * len(large)))
            for examples in (False, True):
                llm = LLMAnnotator(labels, base_url=args.llm_base_url, model=args.llm_model,
                                   cache_dir=cache_dir() / "llm", concurrency=2)
                pipeline = HCCPipeline(encoder, labels, llm=llm, config=HCCConfig(choice_examples=examples))
                pipeline.set_anchors([a["input"] for a in anchors], [a["label"] for a in anchors])
                key = f"{name}|{draw}|{'examples' if examples else 'names'}"
                results[key] = anchor_evidence(pipeline, labels)
                print(key, results[key], file=sys.stderr)
                RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
