"""The real packaged all-MiniLM-L6-v2 encoder: normalisation, similarity, disk cache, offline errors."""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from backend.labelling import encoder as encoder_module
from backend.labelling.encoder import Encoder, EncoderError, cpu_has_native_bf16, resolve_precision, text_key

DIM = 384
SENTENCES = [
    "How do I reset my password?",
    "I forgot my password and need to change it.",
    "The cat is sleeping on the sofa.",
    "What time does the train to Paris leave?",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def encoder(cache_dir) -> Encoder:
    enc = Encoder(cache_dir=cache_dir)
    enc.encode(SENTENCES)  # loads the model once for the module
    return enc


@pytest.fixture(scope="module")
def vectors(encoder) -> np.ndarray:
    return encoder.encode(SENTENCES)


def test_output_is_normalised_float32(vectors):
    assert vectors.shape == (len(SENTENCES), DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()


def test_paraphrases_are_closer_than_unrelated_sentences(vectors):
    sims = vectors @ vectors.T
    paraphrase = sims[0, 1]
    assert paraphrase > sims[0, 2] + 0.3
    assert paraphrase > sims[0, 3] + 0.3
    assert paraphrase > sims[1, 2] + 0.3


def test_identical_texts_give_identical_rows_and_are_encoded_once(encoder):
    before = encoder.encoded_count
    out = encoder.encode(["A brand new sentence about tea.", SENTENCES[2], "A brand new sentence about tea."])
    assert encoder.encoded_count == before + 1  # one unseen text; the duplicate and the known one are free
    np.testing.assert_array_equal(out[0], out[2])
    assert not np.array_equal(out[0], out[1])


def test_row_order_follows_input_order(encoder, vectors):
    out = encoder.encode(SENTENCES[::-1])
    np.testing.assert_array_equal(out, vectors[::-1])


def test_second_encoder_with_same_cache_dir_encodes_nothing(encoder, cache_dir, vectors):
    assert encoder.encoded_count >= len(SENTENCES)
    again = Encoder(cache_dir=cache_dir)
    out = again.encode(SENTENCES)
    assert again.encoded_count == 0
    assert again._model is None  # served from the shards without loading the model
    np.testing.assert_array_equal(out, vectors)


def test_empty_input(encoder):
    out = encoder.encode([])
    assert out.shape == (0, DIM) and out.dtype == np.float32


def test_unknown_model_raises_clear_error_without_network(monkeypatch):
    # Simulate the worst case: huggingface_hub imported before the encoder set HF_HUB_OFFLINE (the
    # module fixture already imported it), and no offline variables in the environment.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    attempts: list[object] = []

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "network is off in this test")

    def no_connect(self, address):
        attempts.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_connect)

    name = "no-such-org/no-such-encoder-xyz"
    with pytest.raises(EncoderError) as err:
        Encoder(name).encode(["hello"])
    message = str(err.value)
    assert repr(name) in message
    assert "local sentence-transformers directory" in message
    assert attempts == []
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# -- precision -------------------------------------------------------------------------------------
CPUINFO_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(CPUINFO_BF16)
    assert cpu_has_native_bf16("flags : sse amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16(CPUINFO_PLAIN)
    assert not cpu_has_native_bf16("")


def test_precision_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("HCC_ENCODER_PRECISION", raising=False)
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("BFloat16") == "bfloat16"
    assert resolve_precision(None) in ("float32", "bfloat16")  # auto: depends on this CPU
    assert resolve_precision("auto", device="cuda") == "float32"
    monkeypatch.setenv("HCC_ENCODER_PRECISION", "float32")
    assert resolve_precision(None) == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"  # an explicit argument wins


def test_a_bad_precision_names_the_setting(monkeypatch):
    monkeypatch.setenv("HCC_ENCODER_PRECISION", "fp8")
    with pytest.raises(EncoderError, match="HCC_ENCODER_PRECISION.*fp8|fp8.*HCC_ENCODER_PRECISION"):
        Encoder()


def test_bfloat16_vectors_match_float32_and_keep_their_own_cache(tmp_path):
    exact = Encoder(cache_dir=tmp_path, precision="float32")
    reference = exact.encode(SENTENCES)
    fast = Encoder(cache_dir=tmp_path, precision="bfloat16")
    assert fast.identity != exact.identity
    out = fast.encode(SENTENCES)
    assert fast.encoded_count == len(SENTENCES)  # not served from the float32 vectors in the same cache dir
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert (out * reference).sum(axis=1).min() > 0.99
    assert not np.array_equal(out, reference)  # really computed in the other precision


def test_a_lone_surrogate_does_not_fail_the_batch(encoder):
    # A JSON "\ud800" escape (from a file or a Label Studio task) reaches Python as a lone surrogate, which the
    # tokenizer refuses; one such text used to fail a whole pre-label job.
    vectors = encoder.encode(["hello \ud800 world", "hello \ufffd world", "a plain text"])
    assert vectors.shape[0] == 3 and np.allclose(vectors[0], vectors[1], atol=1e-5)


# -- the embedding cache: bounded in memory, one SQLite file per embedding space on disk ---------------------


def cache_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_encode_calls_add_no_file_each(encoder, cache_dir):
    encoder.encode(["warm the cache up"])
    before = cache_files(cache_dir)
    for i in range(6):  # six /predict requests of one task each wrote six shard files
        encoder.encode([f"a single new task, number {i}"])
    assert cache_files(cache_dir) == before
    assert [p.name for p in before if p.suffix == ".npz"] == []
    assert {p.name for p in before} <= {"vectors.sqlite", "vectors.sqlite-wal", "vectors.sqlite-shm"}
    again = Encoder(cache_dir=cache_dir)
    again.encode([f"a single new task, number {i}" for i in range(6)])
    assert again.encoded_count == 0 and again._model is None  # all six are on disk


def test_memory_holds_at_most_the_cap_and_dropped_vectors_come_back_from_disk(encoder, tmp_path):
    texts = [f"text number {i} about something else" for i in range(8)]
    expected = encoder.encode(texts)
    small = Encoder(cache_dir=tmp_path, memory_vectors=3)
    out = small.encode(texts)  # a batch larger than the memory: every row still comes back
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert len(small._memory) == 3 and small.encoded_count == 8
    np.testing.assert_array_equal(small.encode(texts[:2]), out[:2])  # dropped from memory, read from disk
    assert small.encoded_count == 8 and len(small._memory) == 3
    no_disk = Encoder(memory_vectors=3)
    no_disk._model = small._model  # the same loaded model, not a second load
    no_disk.encode(texts)
    no_disk.encode(texts[:1])
    assert no_disk.encoded_count == 9  # without a disk cache a dropped vector is encoded again


def test_shards_of_earlier_versions_are_imported_once_and_removed(encoder, tmp_path, caplog):
    expected = encoder.encode(SENTENCES[:2])
    shard_dir = tmp_path / encoder.identity
    shard_dir.mkdir()
    np.savez(shard_dir / "0123456789abcdef.npz", keys=np.array([text_key(t) for t in SENTENCES[:2]]),
             vectors=expected)
    (shard_dir / "torn.npz").write_bytes(b"PK\x03\x04 not a whole zip")
    with caplog.at_level(logging.WARNING, logger="backend.labelling.encoder"):
        reader = Encoder(cache_dir=tmp_path)
        out = reader.encode(SENTENCES[:2])
    np.testing.assert_array_equal(out, expected)
    assert reader.encoded_count == 0 and reader._model is None
    assert not (shard_dir / "0123456789abcdef.npz").exists()  # imported: no longer one file per call
    assert (shard_dir / "torn.npz").exists() and any("torn.npz" in r.getMessage() for r in caplog.records)
    later = Encoder(cache_dir=tmp_path)
    np.testing.assert_array_equal(later.encode(SENTENCES[:2]), expected)
    assert later.encoded_count == 0


def test_an_unreadable_cache_file_costs_a_re_encode_and_a_warning(encoder, tmp_path, caplog):
    expected = encoder.encode(SENTENCES[:1])
    (tmp_path / encoder.identity).mkdir()
    (tmp_path / encoder.identity / "vectors.sqlite").write_bytes(b"this is not a SQLite file at all" * 64)
    broken = Encoder(cache_dir=tmp_path)
    broken._model = encoder._model
    with caplog.at_level(logging.WARNING, logger="backend.labelling.encoder"):
        out = broken.encode(SENTENCES[:1])
        broken.encode(SENTENCES[1:2])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert broken.encoded_count == 2
    warnings = [r.getMessage() for r in caplog.records if "vectors.sqlite" in r.getMessage()]
    assert len(warnings) == 1 and "unusable" in warnings[0]  # once, then the encoder goes on without it


def same_text_tolerance(encoder: Encoder) -> float:
    """How far two encodings of one text may differ when made in batches of different shapes: float32 agrees
    to rounding; bfloat16 to its resolution. Another text's vector differs by ~0.1 or more."""
    return 1e-6 if encoder.precision == "float32" else 5e-3


def test_a_locked_cache_or_a_torn_vector_costs_a_re_encode(encoder, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(encoder_module, "_DISK_TIMEOUT", 0.1)
    first = Encoder(cache_dir=tmp_path)
    first._model = encoder._model
    first.encode(SENTENCES[:1])  # creates the file
    path = tmp_path / encoder.identity / "vectors.sqlite"
    other = sqlite3.connect(path, isolation_level=None)  # another worker holding the write lock
    other.execute("INSERT OR REPLACE INTO vectors VALUES (?, ?)", (text_key(SENTENCES[2]), b"\x00\x01\x02"))
    other.execute("BEGIN IMMEDIATE")
    try:
        with caplog.at_level(logging.WARNING, logger="backend.labelling.encoder"):
            out = first.encode(SENTENCES[1:2])
        assert any("write skipped" in r.getMessage() for r in caplog.records)
    finally:
        other.execute("ROLLBACK")
    # The fixture encoded the sentences in one padded batch, this call one alone: in bfloat16 the two agree to
    # bfloat16's resolution only (~1e-3 on a CPU whose bf16 kernels see the padding, e.g. AMX), not bit for bit.
    np.testing.assert_allclose(out, encoder.encode(SENTENCES[1:2]), atol=same_text_tolerance(encoder))
    later = Encoder(cache_dir=tmp_path)
    later._model = encoder._model
    torn = later.encode(SENTENCES[2:3])  # its stored value is three bytes: encoded again, and replaced
    np.testing.assert_allclose(torn, encoder.encode(SENTENCES[2:3]), atol=same_text_tolerance(encoder))
    assert later.encoded_count == 1
    assert len(other.execute("SELECT vector FROM vectors WHERE key = ?", (text_key(SENTENCES[2]),)).fetchone()[0]) \
        == DIM * 4
    other.close()


def _write_vectors_in_process(directory: str, first: int, count: int, start, spans) -> None:
    """Run in a spawned process: a gunicorn worker storing the vectors it encoded, one request at a time."""
    start.wait(60)
    began = time.monotonic()
    store = encoder_module._VectorFile(Path(directory))
    rng = np.random.default_rng(first)
    for k in range(count):
        vector = rng.normal(size=DIM).astype(np.float32)
        # A write that waited too long for the other process's lock is skipped by design (a later re-encode);
        # on a loaded machine that can happen, so a few attempts: what is stored must never be lost.
        assert any(store.put({f"key-{first + k}": vector / np.linalg.norm(vector)}) for _ in range(5))
    spans.put((began, time.monotonic()))


def test_processes_writing_the_cache_at_once_lose_no_vector(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork: a forked SQLite connection would be shared
    start, spans = ctx.Barrier(2), ctx.Queue()
    per_process = 200
    procs = [ctx.Process(target=_write_vectors_in_process, args=(str(tmp_path), p * 10_000, per_process, start,
                                                                 spans)) for p in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    (a0, a1), (b0, b1) = spans.get(timeout=5), spans.get(timeout=5)
    assert max(a0, b0) < min(a1, b1), "the two processes did not write at the same time: the test proves nothing"
    keys = [f"key-{p * 10_000 + k}" for p in range(2) for k in range(per_process)]
    found = encoder_module._VectorFile(tmp_path).get(keys)
    assert sorted(found) == sorted(keys)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npz"] == []
