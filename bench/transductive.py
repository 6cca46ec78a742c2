"""Would a transductive step earn a place? Class centroids refined on the unlabelled items, and whether the
anchors can tell when that helps.

The refinement (semi-supervised soft k-means with the anchors clamped): each class centroid is the mean of
its anchors plus ``lam`` times the items' soft assignments (softmax of cosine / ``T``), repeated 5 times; a
class without anchors starts from its embedded name. The gate: the anchors are cut into 5 folds; each
fold is classified by centroids of the other folds' anchors, refined (or not) on the unlabelled items plus
the held-out fold itself, and the per-anchor difference (refined right - plain right) gives a mean and a
standard error. Encoder only (MiniLM), 5% plain random anchor draws of ``large.jsonl``, all of
``small.jsonl`` as the unlabelled items and the evaluation.

    .venv/bin/python bench/transductive.py            # ~3 min once the embeddings are cached
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.config import cache_dir  # noqa: E402
from backend.labelling.encoder import DEFAULT_ENCODER, Encoder  # noqa: E402
from bench.views import DATA, DATASETS, read_jsonl  # noqa: E402


def centroids(anchors: np.ndarray, labels: np.ndarray, names: np.ndarray, items: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> np.ndarray:
    """Unit class centroids of the anchors (+ weighted items); a class with nothing is its embedded name."""
    sums = np.zeros((len(names), anchors.shape[1]))
    np.add.at(sums, labels, anchors)
    counts = np.bincount(labels, minlength=len(names)).astype(float)
    if items is not None:
        sums += weights.T @ items
        counts += weights.sum(axis=0)
    sums[counts == 0] = names[counts == 0]
    return sums / np.linalg.norm(sums, axis=1, keepdims=True)


def refined(anchors, labels, names, items, *, temperature: float = 0.02, lam: float = 0.3, rounds: int = 5):
    current = centroids(anchors, labels, names)
    for _ in range(rounds):
        logits = items @ current.T / temperature
        soft = np.exp(logits - logits.max(axis=1, keepdims=True))
        soft /= soft.sum(axis=1, keepdims=True)
        current = centroids(anchors, labels, names, items, lam * soft)
    return current


def right(vectors: np.ndarray, truth: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return (vectors @ classes.T).argmax(axis=1) == truth


def run(name: str, encoder: Encoder, draws: int) -> list[dict]:
    large, small = read_jsonl(DATA / name / "large.jsonl"), read_jsonl(DATA / name / "small.jsonl")
    labels = sorted({r["label"] for r in large} | {r["label"] for r in small})
    index = {label: i for i, label in enumerate(labels)}
    names = encoder.encode([label.replace("_", " ") for label in labels])
    items = encoder.encode([r["input"] for r in small])
    truth = np.array([index[r["label"]] for r in small])
    out = []
    for draw in range(draws):
        drawn = random.Random(draw).sample(large, round(0.05 * len(large)))
        anchors = encoder.encode([r["input"] for r in drawn])
        anchor_labels = np.array([index[r["label"]] for r in drawn])
        plain = right(items, truth, centroids(anchors, anchor_labels, names)).mean()
        refine = right(items, truth, refined(anchors, anchor_labels, names, items)).mean()
        fold = np.random.default_rng(0).permutation(len(drawn)) % 5
        diff = []
        for f in range(5):
            rest, held = fold != f, fold == f
            pool = np.vstack([items, anchors[held]])
            base = right(anchors[held], anchor_labels[held], centroids(anchors[rest], anchor_labels[rest], names))
            new = right(anchors[held], anchor_labels[held],
                        refined(anchors[rest], anchor_labels[rest], names, pool))
            diff.extend((new.astype(int) - base.astype(int)).tolist())
        d = np.array(diff, dtype=float)
        out.append({"dataset": name, "draw": draw, "plain": float(plain), "refined": float(refine),
                    "anchor_gain": float(d.mean()), "anchor_se": float(d.std(ddof=1) / np.sqrt(len(d)))})
        print(f"{name} draw {draw}: items {100 * (refine - plain):+.2f}, anchors {100 * d.mean():+.2f} "
              f"(se {100 * out[-1]['anchor_se']:.2f})", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transductive.json")
    args = ap.parse_args()
    encoder = Encoder(DEFAULT_ENCODER, cache_dir=cache_dir() / "embeddings", show_progress=False)
    rows = [row for name in DATASETS for row in run(name, encoder, args.draws)]
    args.out.write_text(json.dumps({"encoder": DEFAULT_ENCODER, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
