"""LLM calls per second on the embedded server: with the server's prompt-prefix reuse, without it, and
from our on-disk answer cache.

The annotator puts the fixed part of the prompt (instructions + label list) first so a server can reuse
its KV cache for that prefix; "without" sends the same content with the text first, so every request
starts with new tokens and the whole prompt is evaluated again.

    .venv/bin/python bench/llm_throughput.py --llm-base-url http://127.0.0.1:8091/v1 --calls 12
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.labelling import prompts  # noqa: E402
from backend.labelling.llm import LLMAnnotator, gbnf_choice  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def timed_calls(client: openai.OpenAI, model: str, messages_list: list[list[dict]], grammar: str) -> float:
    t0 = time.perf_counter()
    for messages in messages_list:
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32,
                                       extra_body={"grammar": grammar})
    return len(messages_list) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-base-url", required=True)
    ap.add_argument("--model", default="local")
    ap.add_argument("--calls", type=int, default=12)
    args = ap.parse_args()

    labels = json.loads((DATA / "categories.json").read_text())
    with (DATA / "test.csv").open(newline="") as fh:
        texts = [r["text"] for r in random.Random(1).sample(list(csv.DictReader(fh)), args.calls + 1)]
    client = openai.OpenAI(base_url=args.llm_base_url, api_key="none", timeout=300)
    system = prompts.system_prompt(labels, json_answer=False)
    grammar = gbnf_choice(labels)
    fixed_first = [[{"role": "system", "content": system},
                    {"role": "user", "content": prompts.zero_shot_message(t)}] for t in texts]
    text_first = [[{"role": "user", "content": prompts.zero_shot_message(t) + "\n\n" + system}] for t in texts]

    timed_calls(client, args.model, fixed_first[:1], grammar)  # warm the prefix
    result = {"calls": args.calls,
              "fixed_prefix_first_calls_per_s": round(timed_calls(client, args.model, fixed_first[1:], grammar), 3),
              "text_first_calls_per_s": round(timed_calls(client, args.model, text_first[1:], grammar), 3)}
    with tempfile.TemporaryDirectory() as cache:
        llm = LLMAnnotator(labels, base_url=args.llm_base_url, model=args.model, cache_dir=cache,
                           structured="grammar", logprobs=False, concurrency=1)
        llm.zero_shot(texts[1:])
        t0 = time.perf_counter()
        llm.zero_shot(texts[1:])
        result["answer_cache_calls_per_s"] = round(args.calls / (time.perf_counter() - t0), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
