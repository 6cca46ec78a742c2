"""The real packaged all-MiniLM-L6-v2 encoder: normalisation, similarity, disk cache, offline errors."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from backend.labelling.encoder import Encoder, EncoderError, cpu_has_native_bf16, resolve_precision

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
