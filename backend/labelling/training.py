"""Fit the sentence encoder to the team's anchors, and keep the fit only when held-out anchors prove it.

The frozen encoder is the accuracy ceiling of the whole pipeline: every anchor only moves a class centroid.
Few-shot fine-tuning of the encoder on the anchors themselves (the SetFit family: Tunstall et al., "Efficient
Few-Shot Learning Without Prompts", 2022) pulls texts of one label together and pushes labels apart, in the
space the centroid classifier then works in.

Objective (``loss="prototype"``, the default): a normalised-softmax classifier over the encoder's unit
embeddings, ``p(y = j | x) = softmax_j(s * cos(f(x), w_j))`` with scale ``s`` and one prototype ``w_j`` per
label, initialised at the frozen class centroid; the encoder and the prototypes are trained together with
cross-entropy on the anchors. The head is thrown away after training: the pipeline classifies by the cosine
to the (new) class centroids, so the objective trains exactly the geometry it uses. Each step reads a batch of
single texts, half the cost of pair losses at the same number of texts. ``loss="pairs"`` is the
sentence-transformers ``MultipleNegativesRankingLoss`` in both directions over pairs of same-label anchors,
in batches of distinct labels (so no in-batch negative shares the positive's label).

Why not ``SentenceTransformerTrainer``: it needs the ``datasets`` and ``accelerate`` packages and their
start-up cost for a loop of a few hundred steps; the loop below is the plain PyTorch one, over the
library's model, tokenizer and (for pairs) loss.

Adoption: the anchors are split once (seeded, per label) into a fit part and a held-out part (``holdout``).
The encoder is trained on the fit part only; then the fit part's centroids classify the held-out anchors in
the frozen and the trained space. The trained model is adopted only when it is right on more held-out
anchors than the frozen one, or on as many with a higher mean log-likelihood of their labels (a softmax of
the centroid cosines, each model at its best temperature); the report says how many and why. With
``refit`` (off by default: measured, it did not pay for its time), once adopted the same recipe is trained
again from the base model on all the anchors and that model is saved: the held-out part decided whether the
recipe helps on this data, and the refit keeps the fifth of the labels the decision held back (the usual
select-then-refit of model selection). The record lists the texts the saved model was trained on
(``trained_on``): the pipeline fits its score's temperature on the other anchors, which the model never
saw (:meth:`backend.labelling.pipeline.HCCPipeline.temperature_rows`). A re-run with the same base model,
anchors and settings reuses the saved model (its directory is keyed by all three).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend.labelling.anchors import class_scores
from backend.labelling.encoder import TRAINING_RECORD, text_key

log = logging.getLogger(__name__)

LOSSES = ("prototype", "pairs")
RESULT_FILE = TRAINING_RECORD


class TrainingError(RuntimeError):
    """The encoder could not be trained (bad settings, or too few anchors to train and hold out)."""


@dataclass(frozen=True)
class TrainingConfig:
    """How the encoder is fitted to the anchors. The defaults finish in about a minute for 500 anchors on
    two CPU cores with MiniLM (docs/benchmarks.md, "Training the encoder")."""

    loss: str = "prototype"
    epochs: int = 8  # passes over the fit part of the anchors
    max_steps: int = 400  # cap on optimiser steps whatever the number of anchors (bounds the time)
    batch_size: int = 32
    learning_rate: float = 5e-5  # encoder weights (AdamW)
    head_learning_rate: float = 1e-2  # the prototypes of ``loss="prototype"``
    scale: float = 20.0  # s: the inverse temperature of the cosine softmax
    holdout: float = 0.2  # share of the anchors held out to decide adoption
    top_layers: int = 3  # transformer layers trained (from the top); 0: all, with the embeddings
    min_anchors: int = 40  # fewer anchors: no training (too few to train and to prove it)
    min_holdout: int = 10
    # Once adopted, train the same recipe again from the base model on *all* the anchors (the held-out part
    # proved the recipe; the refit does not lose a fifth of the labels). Off by default: it doubles the
    # training time, and on Banking77 at 5% it gained +0.20 points on the mean of 5 draws (-0.5 to +0.8 per
    # draw), within the draws' noise (docs/benchmarks.md, "Training the encoder").
    refit: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise TrainingError(f"training loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.epochs < 1 or self.max_steps < 1 or self.batch_size < 2 or self.top_layers < 0:
            raise TrainingError("training needs epochs >= 1, max_steps >= 1, batch_size >= 2 and top_layers >= 0")
        if not 0.0 < self.holdout < 1.0:
            raise TrainingError(f"training holdout must be a share in (0, 1), got {self.holdout}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0 or self.scale <= 0:
            raise TrainingError("learning rates and scale must be positive")


@dataclass
class TrainingResult:
    """What a training did and whether its model is to be used (``adopted``)."""

    adopted: bool
    reason: str
    model_path: str | None  # the trained model's directory (None when nothing was trained)
    base_model: str
    key: str
    anchors: int
    fit_anchors: int = 0
    holdout_anchors: int = 0
    holdout_right_before: int = 0  # held-out anchors the frozen encoder classifies right
    holdout_right_after: int = 0  # ... and the trained one
    holdout_log_likelihood_before: float = 0.0  # mean log P(label) of a held-out anchor, frozen (tie-break)
    holdout_log_likelihood_after: float = 0.0  # ... and trained
    steps: int = 0  # optimiser steps, the refit's included
    refit_anchors: int = 0  # anchors the adopted model was trained again on (0: the fit part's model is kept)
    seconds: float = 0.0
    # text_key of every text the saved model was trained on (the fit part; all anchors after a refit)
    trained_on: list[str] = field(default_factory=list)
    reused: bool = False  # loaded from an earlier run with the same base model, anchors and settings
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def holdout_accuracy_before(self) -> float:
        return self.holdout_right_before / self.holdout_anchors if self.holdout_anchors else 0.0

    @property
    def holdout_accuracy_after(self) -> float:
        return self.holdout_right_after / self.holdout_anchors if self.holdout_anchors else 0.0

    def as_dict(self, *, record: bool = False) -> dict[str, Any]:
        """Plain data for reports; ``record``: with the full ``trained_on`` list, as the saved record keeps it
        (a report gives its length: thousands of hashes help no reader)."""
        out = asdict(self)
        out["holdout_accuracy_before"] = round(self.holdout_accuracy_before, 4)
        out["holdout_accuracy_after"] = round(self.holdout_accuracy_after, 4)
        if not record:
            out["trained_on"] = len(self.trained_on)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def training_key(base_model: str, texts: Sequence[str], labels: Sequence[str], config: TrainingConfig) -> str:
    """Identifies one training: the base model, the anchors (as a set) and the settings."""
    pairs = sorted(f"{label}\x1f{text}" for text, label in zip(texts, labels, strict=True))
    digest = hashlib.sha256()
    digest.update(json.dumps({"base": base_model, "config": asdict(config)}, sort_keys=True).encode())
    for pair in pairs:
        digest.update(pair.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def split_anchors(labels: Sequence[str], *, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit positions, held-out positions): ``holdout`` of each label's anchors held out, rounded down, so a
    label with a single anchor keeps it in the fit part (its centroid must exist to be tested)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for pos, label in enumerate(labels):
        by_label.setdefault(label, []).append(pos)
    held: list[int] = []
    for label in sorted(by_label):
        positions = by_label[label]
        rng.shuffle(positions)
        held.extend(positions[: int(len(positions) * holdout)])
    held_set = set(held)
    fit = [p for p in range(len(labels)) if p not in held_set]
    return np.array(fit, dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def train_encoder(
    base_model: str,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    model_dir: str | Path | None = None,
    trained_dir: str | Path | None = None,
    config: TrainingConfig | None = None,
    progress: Callable[[int, int], None] | bool = False,
) -> TrainingResult:
    """Fit ``base_model`` (a sentence-transformers directory or packaged name) to the anchors.

    The model is saved in ``model_dir`` (default ``trained_dir/<key>``, ``trained_dir`` defaulting to
    ``<cache>/trained``) with ``hcc_training.json`` beside it; when that file already records a training of
    the same key, its result is returned without training (``reused``). ``progress`` is ``True`` for a
    progress bar, or a callable ``progress(step, total_steps)``. Raises :class:`TrainingError` for bad
    settings; too few anchors is not an error but a result that is not adopted.
    """
    config = config or TrainingConfig()
    config.validate()
    if len(texts) != len(labels):
        raise TrainingError(f"{len(texts)} anchor texts but {len(labels)} labels")
    key = training_key(base_model, texts, labels, config)
    if model_dir is None:
        from backend.config import cache_dir

        model_dir = Path(trained_dir) if trained_dir is not None else cache_dir() / "trained"
        model_dir = model_dir / key
    target = Path(model_dir)
    earlier = load_result(target)
    if earlier is not None and earlier.key == key:
        earlier.reused = True
        return earlier

    fit, held = split_anchors(labels, holdout=config.holdout, seed=config.seed)
    result = TrainingResult(adopted=False, reason="", model_path=None, base_model=base_model, key=key,
                            anchors=len(texts), fit_anchors=len(fit), holdout_anchors=len(held),
                            config=asdict(config))
    label_names = sorted(set(labels))
    if len(texts) < config.min_anchors or len(held) < config.min_holdout or len(label_names) < 2:
        result.reason = (f"not trained: {len(texts)} anchors ({len(held)} to hold out, {len(label_names)} labels); "
                         f"training needs at least {config.min_anchors} anchors, {config.min_holdout} held out "
                         "and two labels")
        return result

    started = time.perf_counter()
    model = _load(base_model)
    index = {label: i for i, label in enumerate(label_names)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    texts = list(texts)
    fit_texts, held_texts = [texts[i] for i in fit], [texts[i] for i in held]
    planned = _planned_steps(y[fit], config) + (_planned_steps(y, config) if config.refit else 0)
    before, ll_before = _held_out(model, fit_texts, y[fit], held_texts, y[held], len(label_names))
    result.steps = _fit(model, fit_texts, y[fit], len(label_names), config, _phase(progress, 0, planned))
    after, ll_after = _held_out(model, fit_texts, y[fit], held_texts, y[held], len(label_names))
    result.holdout_right_before, result.holdout_right_after = before, after
    result.holdout_log_likelihood_before = round(ll_before, 4)
    result.holdout_log_likelihood_after = round(ll_after, 4)
    n = len(held)
    if adopt(before, after, ll_before, ll_after):
        result.adopted = True
        result.reason = (f"adopted: the trained encoder classifies {after} of {n} held-out anchors right, "
                         f"the frozen one {before} (log-likelihood per anchor {ll_after:.3f} vs {ll_before:.3f})")
        if config.refit:
            model = _load(base_model)
            result.steps += _fit(model, texts, y, len(label_names), config,
                                 _phase(progress, result.steps, planned))
            result.refit_anchors = len(texts)
            result.reason += f"; then trained again on all {len(texts)} anchors"
        result.trained_on = sorted({text_key(t) for t in (texts if config.refit else fit_texts)})
        result.seconds = round(time.perf_counter() - started, 2)
        _save(model, target, result)
    else:
        result.reason = (f"kept the frozen encoder: the trained one classifies {after} of {n} held-out anchors "
                         f"right, the frozen one {before} (log-likelihood per anchor {ll_after:.3f} vs "
                         f"{ll_before:.3f})")
        result.seconds = round(time.perf_counter() - started, 2)
        if callable(progress) and config.refit:
            progress(planned, planned)  # the refit that was planned will not run
        target.mkdir(parents=True, exist_ok=True)
        _write_result(target, result)
    log.info("encoder training (%d anchors, %d steps, %.0f s): %s", len(texts), result.steps, result.seconds,
             result.reason)
    return result


def adopt(right_before: int, right_after: int, ll_before: float, ll_after: float) -> bool:
    """The trained encoder wins: more held-out anchors right, or as many (a few dozen anchors often tie) with
    a better log-likelihood of their labels, which sees every anchor's margin and not only the argmax."""
    return right_after > right_before or (right_after == right_before and ll_after > ll_before)


def load_result(model_dir: str | Path) -> TrainingResult | None:
    """The result saved in ``model_dir`` by :func:`train_encoder`, if it is whole (an adopted one with its
    model), else None."""
    saved = Path(model_dir) / RESULT_FILE
    if not saved.is_file():
        return None
    try:
        result = TrainingResult.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # a torn file costs a re-train, never the run
        log.warning("ignoring unreadable training result %s: %s", saved, exc)
        return None
    if result.adopted and not (result.model_path and Path(result.model_path).is_dir()):
        return None
    return result


# -- internals ---------------------------------------------------------------------------------------------
def _load(base_model: str):
    from sentence_transformers import SentenceTransformer

    from backend.labelling.encoder import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # training reads a local model, never a hub
    path = resolve_model_path(base_model)
    try:
        return SentenceTransformer(path, device="cpu", local_files_only=True)
    except Exception as exc:  # the library raises many types for "not found"
        raise TrainingError(f"cannot load encoder {base_model!r} to train it: {exc}") from exc


def _embed(model, texts: Sequence[str]) -> np.ndarray:
    vectors = model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def _held_out(model, fit_texts, fit_y, held_texts, held_y, n_classes: int) -> tuple[int, float]:
    """(held-out anchors classified right by the fit part's centroids, the mean log-likelihood of their labels
    under a softmax of the centroid cosines at the temperature that suits this model best)."""
    scored = class_scores(_embed(model, held_texts), _embed(model, fit_texts), fit_y, n_classes,
                          method="centroid")
    right = int(np.sum(scored.labels == held_y))
    scores = np.where(np.isfinite(scored.scores), scored.scores, -1e9).astype(np.float64)
    # Training changes the spread of the cosines, so each model gets its own temperature: a fair comparison.
    return right, max(_mean_log_likelihood(scores / t, held_y) for t in _TEMPERATURES)


_TEMPERATURES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2)


def _mean_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    from scipy.special import log_softmax

    return float(np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels]))


def _batches(y: np.ndarray, config: TrainingConfig, rng: random.Random) -> list[list[Any]]:
    """One epoch of batches: shuffled single positions (prototype), or same-label pairs in batches whose
    pairs all have distinct labels (pairs)."""
    positions = list(range(len(y)))
    if config.loss == "prototype":
        rng.shuffle(positions)
        return [positions[i:i + config.batch_size] for i in range(0, len(positions), config.batch_size)]
    by_label: dict[int, list[int]] = {}
    for pos in positions:
        by_label.setdefault(int(y[pos]), []).append(pos)
    pairs = [(pos, rng.choice([o for o in by_label[int(y[pos])] if o != pos]))
             for pos in positions if len(by_label[int(y[pos])]) > 1]
    rng.shuffle(pairs)
    batches: list[list[Any]] = []
    while pairs:
        batch, used, rest = [], set(), []
        for pair in pairs:
            label = int(y[pair[0]])
            if label in used or len(batch) >= config.batch_size:
                rest.append(pair)
            else:
                batch.append(pair)
                used.add(label)
        if len(batch) >= 2:  # a lone pair has no negative to learn from
            batches.append(batch)
        pairs = rest if len(batch) >= 2 else []
    return batches


def _planned_steps(y: np.ndarray, config: TrainingConfig) -> int:
    per_epoch = len(_batches(y, config, random.Random(config.seed)))
    return min(config.max_steps, per_epoch * config.epochs)


def _phase(progress: Callable[[int, int], None] | bool, done: int, planned: int):
    """A progress callback for one training pass that reports on the scale of the whole training (the pass
    on the fit part, then the refit), so that ``/status`` never sees the count start again."""
    if not callable(progress):
        return progress
    return lambda step, _total: progress(done + step, planned)


def _fit(model, texts: list[str], y: np.ndarray, n_classes: int, config: TrainingConfig,
         progress: Callable[[int, int], None] | bool) -> int:
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    total = _planned_steps(y, config)
    if total == 0:
        return 0
    _freeze_below(model, config.top_layers)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.learning_rate}]
    prototypes = None
    if config.loss == "prototype":
        start = torch.from_numpy(_class_means(_embed(model, texts), y, n_classes))
        prototypes = torch.nn.Parameter(start)
        groups.append({"params": [prototypes], "lr": config.head_learning_rate, "weight_decay": 0.0})
        pair_loss = None
    else:
        pair_loss = _symmetric_ranking_loss(model, config.scale)
    optimiser = torch.optim.AdamW(groups, weight_decay=0.01)
    # Linear warm-up over the first 10% of the steps, then linear decay: the usual schedule for fine-tuning.
    warm = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))))
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers renamed it in v5
    bar = _bar(total, progress)
    model.train()
    step = 0
    try:
        while step < total:
            for batch in _batches(y, config, rng):
                if step >= total:
                    break
                if prototypes is not None:
                    features = tokenize([texts[i] for i in batch])
                    embedded = F.normalize(model(features)["sentence_embedding"], dim=1)
                    logits = config.scale * embedded @ F.normalize(prototypes, dim=1).T
                    loss = F.cross_entropy(logits, torch.from_numpy(y[batch]))
                else:
                    first = tokenize([texts[a] for a, _ in batch])
                    second = tokenize([texts[b] for _, b in batch])
                    loss = pair_loss([first, second], None)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                step += 1
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"training diverged at step {step} (loss {loss.item()})")
                _tick(bar, progress, step, total)
    finally:
        model.eval()
        if bar is not None:
            bar.close()
    return step


def _symmetric_ranking_loss(model, scale: float):
    """In-batch negatives in both directions (first -> second and second -> first text of each pair)."""
    try:  # sentence-transformers 6
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # 5.x
        from sentence_transformers.losses import MultipleNegativesSymmetricRankingLoss

        return MultipleNegativesSymmetricRankingLoss(model, scale=scale)
    return MultipleNegativesRankingLoss(model, scale=scale, directions=("query_to_doc", "doc_to_query"),
                                        partition_mode="per_direction")


def _freeze_below(model, top_layers: int) -> None:
    """Train only the top ``top_layers`` transformer layers (and what sits above them): the backward pass
    then stops there, which halves a step's time for MiniLM at 3 of 6 layers (docs/benchmarks.md)."""
    if top_layers <= 0:
        return
    transformer = getattr(model[0], "auto_model", None)
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if transformer is None or layers is None:  # not a BERT-shaped encoder: train all of it
        return
    for parameter in transformer.embeddings.parameters():
        parameter.requires_grad = False
    for layer in list(layers)[: max(0, len(layers) - top_layers)]:
        for parameter in layer.parameters():
            parameter.requires_grad = False


def _class_means(vectors: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    means = np.zeros((n_classes, vectors.shape[1]), dtype=np.float32)
    np.add.at(means, y, vectors)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return means / np.maximum(norms, 1e-12)


def _bar(total: int, progress):
    if progress is not True:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="training the encoder", unit="step", leave=False)


def _tick(bar, progress, step: int, total: int) -> None:
    if bar is not None:
        bar.update(1)
    elif callable(progress):
        progress(step, total)


def _save(model, target: Path, result: TrainingResult) -> None:
    """Write the model and its result atomically: a crash never leaves a directory that looks complete."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    result.model_path = str(target.resolve())
    _write_result(target, result)


def _write_result(target: Path, result: TrainingResult) -> None:
    tmp = target / f".{RESULT_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result.as_dict(record=True), indent=1), encoding="utf-8")
    os.replace(tmp, target / RESULT_FILE)
