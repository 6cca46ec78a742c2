"""docker-compose.yml, Dockerfile and .dockerignore, checked against the code they run.

No Docker engine is needed: the compose file is read with PyYAML and its ``${VAR:-default}`` values are
resolved here the way Docker Compose does, then compared with what the backend, the CLI and the Dockerfile
actually read, listen on and run.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from backend.cli.main import build_parser

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml to check docker-compose.yml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# ${NAME}, ${NAME:-default} or ${NAME-default} with no further ${...} inside: resolved innermost first.
_INNERMOST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^${}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's substitution for the forms this repository uses (nested defaults included)."""
    def resolve(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)  # set but empty stays empty
        return env.get(name, "")

    while True:
        new = _INNERMOST.sub(resolve, value)
        if new == value:
            assert "${" not in new, f"unsupported interpolation in {value!r}"
            return new
        value = new


def resolved(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolved(v, env) for k, v in node.items()}
    return node


def load(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as Compose would see it with only ``env`` set (defaults everywhere else)."""
    return resolved(yaml.safe_load(COMPOSE.read_text()), env or {})


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "NAME=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports") or []:
        target = entry["target"] if isinstance(entry, dict) else str(entry).split(":")[-1].split("/")[0]
        ports.add(int(target))
    return ports


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> volume name (short syntax ``name:/path``)."""
    out = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        out[target] = source
    return out


def dockerfile_cmd() -> str:
    cmds = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    assert len(cmds) == 1, "the Dockerfile must have exactly one CMD"
    return cmds[0]


def gunicorn_port() -> int:
    match = re.search(r"--bind\s+[\w.\-]*:(\d+)", dockerfile_cmd())
    assert match, "the CMD must bind gunicorn to a port"
    return int(match.group(1))


def names_the_backend_reads() -> set[str]:
    """Environment variables read by Settings.from_env, _wsgi.py, backend/config.py and the Dockerfile's CMD."""
    settings = (ROOT / "backend" / "studio" / "settings.py").read_text()
    names = set(re.findall(r"\b(?:env|_flag|_int|_number|_choice)\(\s*\"([A-Z][A-Z0-9_]*)\"", settings))
    for path in (ROOT / "_wsgi.py", ROOT / "backend" / "config.py"):  # config.py: HCC_CACHE_DIR
        names |= set(re.findall(r"os\.environ\.get\(\s*\"([A-Z][A-Z0-9_]*)\"", path.read_text()))
    names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", dockerfile_cmd()))
    # The scan must find what the compose file relies on, or every check below would pass vacuously.
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "HCC_LLM_BASE_URL", "HCC_LLM_MODEL",
            "BASIC_AUTH_USER", "LOG_LEVEL", "WORKERS", "THREADS"} <= names, sorted(names)
    return names


def llm_command(services: dict[str, Any]) -> list[str]:
    command = services["llm"]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


# -- the three services --------------------------------------------------------------------------------


def test_three_services(services: dict[str, Any]) -> None:
    assert set(services) == {"label-studio", "llm", "backend"}


def test_label_studio_service(services: dict[str, Any]) -> None:
    studio = services["label-studio"]
    assert studio["image"] == "heartexlabs/label-studio:1.23.2"  # the version the end-to-end tests run
    assert 8080 in container_ports(studio)
    assert "/label-studio/data" in mounts(studio)
    env = env_of(studio)
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"  # the backend uses the fixed token below
    assert env["ML_BLOCK_LOCAL_IP"] == "false" and env["SSRF_PROTECTION_ENABLED"] == "false"
    raw = env_of(yaml.safe_load(COMPOSE.read_text())["services"]["label-studio"])
    for name in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        assert raw[name].startswith(f"${{{name}:-"), f"{name} must be overridable from the environment"
        assert env[name], f"{name} needs a default"


def test_backend_publishes_the_port_gunicorn_binds(services: dict[str, Any]) -> None:
    assert container_ports(services["backend"]) == {gunicorn_port()}


def test_llm_serves_inside_the_network_only(services: dict[str, Any]) -> None:
    # Reached by the backend by service name; an LLM server without auth should not be on the host's ports.
    assert "ports" not in services["llm"]


def test_volumes_are_declared_and_hold_the_state(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for target, source in mounts(service).items():
            assert source in declared, f"{name}: volume {source!r} for {target} is not declared"
    backend_env = env_of(services["backend"])
    assert backend_env["MODEL_DIR"] in mounts(services["backend"])  # projects' state survives a re-create
    assert env_of(services["llm"])["HCC_CACHE_DIR"] in mounts(services["llm"])  # the model is downloaded once


def test_backend_and_llm_run_this_repositorys_image(services: dict[str, Any]) -> None:
    for name in ("backend", "llm"):
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").resolve() == DOCKERFILE
    assert services["backend"]["image"] == services["llm"]["image"]  # built once, run twice


def test_backend_waits_for_its_peers(services: dict[str, Any]) -> None:
    depends = services["backend"]["depends_on"]
    assert {"label-studio", "llm"} <= set(depends)


# -- the backend's environment ---------------------------------------------------------------------------


def test_backend_env_names_are_ones_the_backend_reads(services: dict[str, Any]) -> None:
    """A misspelt HCC_LLM_BASEURL would be silently ignored: the backend would run without the LLM."""
    unknown = set(env_of(services["backend"])) - names_the_backend_reads()
    assert unknown == set(), f"the backend reads none of {sorted(unknown)}"


def test_label_studio_url_points_at_the_label_studio_service(services: dict[str, Any]) -> None:
    url = urlsplit(env_of(services["backend"])["LABEL_STUDIO_URL"])
    assert url.hostname == "label-studio" and url.hostname in services
    assert url.port in container_ports(services["label-studio"])


def test_llm_base_url_points_at_the_port_the_llm_command_serves(services: dict[str, Any]) -> None:
    command = llm_command(services)
    assert command[:3] == ["hcc", "llm", "serve"]
    args = build_parser().parse_args(command[1:])  # the real CLI: an unknown flag fails here
    assert args.host == "0.0.0.0", "on 127.0.0.1 the server is unreachable from the backend's container"
    url = urlsplit(env_of(services["backend"])["HCC_LLM_BASE_URL"])
    assert url.hostname == "llm" and url.hostname in services
    assert url.port == args.port
    assert url.path.rstrip("/") == "/v1"  # the OpenAI client appends /chat/completions to it


def test_backend_asks_for_the_model_the_llm_serves(services: dict[str, Any]) -> None:
    served = build_parser().parse_args(llm_command(services)[1:]).model
    assert env_of(services["backend"])["HCC_LLM_MODEL"] == served
    # and the same when the user picks another model
    other = load({"HCC_LLM_MODEL": "smollm2-135m"})["services"]
    assert env_of(other["backend"])["HCC_LLM_MODEL"] == build_parser().parse_args(llm_command(other)[1:]).model


def test_api_key_defaults_to_the_token_label_studio_starts_with(services: dict[str, Any]) -> None:
    def pair(s: dict[str, Any]) -> tuple[str, str]:
        return env_of(s["backend"])["LABEL_STUDIO_API_KEY"], env_of(s["label-studio"])["LABEL_STUDIO_USER_TOKEN"]

    api_key, token = pair(services)
    assert api_key and api_key == token
    # A user who only sets their own token in .env must not end up with a backend using the old default.
    api_key, token = pair(load({"LABEL_STUDIO_USER_TOKEN": "my-own-token"})["services"])
    assert api_key == token == "my-own-token"
    # An explicit API key (e.g. a personal access token) wins.
    api_key, _ = pair(load({"LABEL_STUDIO_API_KEY": "pat-123"})["services"])
    assert api_key == "pat-123"


# -- Dockerfile and .dockerignore ---------------------------------------------------------------------------


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    assert any(line.startswith("FROM python:3.11-slim") for line in lines)
    torch = [i for i, line in enumerate(lines) if "pip install" in line and "torch==2.13.0" in line]
    project = [i for i, line in enumerate(lines) if re.search(r"pip install .*\"\.\[llm\]\"", line)]
    assert torch and project, "torch==2.13.0 and the project with the llm extra must both be installed"
    assert "download.pytorch.org/whl/cpu" in lines[torch[0]]
    assert torch[0] < project[0], "torch must come first, or the resolver pulls the CUDA build"


def test_dockerfile_runs_the_wsgi_app_with_gunicorn() -> None:
    cmd = dockerfile_cmd()
    assert "gunicorn" in cmd and cmd.rstrip().rstrip("]").rstrip('"').endswith("_wsgi:app")
    assert "${WORKERS" in cmd and "${THREADS" in cmd and "--timeout 300" in cmd
    copies = " ".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY"))
    assert "model.py" in copies and "_wsgi.py" in copies
    # and the app it names exists
    assert re.search(r"^app\s*=", (ROOT / "_wsgi.py").read_text(), re.MULTILINE)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore pattern excludes ``path`` or one of its parent directories (no ! rules used)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.rstrip("/")) for prefix in prefixes for pattern in patterns)


def test_dockerignore_keeps_what_the_image_needs_and_drops_local_state() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # _ignored does not model re-inclusion
    for needed in ("pyproject.toml", "README.md", "model.py", "_wsgi.py", "backend/studio/service.py"):
        assert (ROOT / needed).exists()
        assert not _ignored(needed, patterns), f"{needed} is copied by the Dockerfile but ignored"
    for local in (".venv", ".git", "model_dir", "runs", "backend/studio/__pycache__"):
        assert _ignored(local, patterns), f"{local} should stay out of the build context"


# -- the GPU profile: docker-compose.gpu.yml layered over the base file --------------------------------------

GPU_COMPOSE = ROOT / "docker-compose.gpu.yml"


def merged(base: Any, override: Any) -> Any:
    """Compose's merge of a later file over an earlier one for the keys these files use: mappings merge key by
    key (environment, depends_on, services), anything else (a command, a list of profiles) is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    return override


def load_gpu(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    both = merged(yaml.safe_load(COMPOSE.read_text()), yaml.safe_load(GPU_COMPOSE.read_text()))
    return resolved(both, env or {})


def active(compose: dict[str, Any], profiles: set[str] = frozenset()) -> dict[str, Any]:
    """The services Compose starts with these profiles active (no profile: those without ``profiles``)."""
    return {name: s for name, s in compose["services"].items()
            if not s.get("profiles") or set(s["profiles"]) & profiles}


def vllm_args(service: dict[str, Any]) -> dict[str, str]:
    command = [str(c) for c in service["command"]]
    return dict(zip(command[::2], command[1::2], strict=True))


def test_the_gpu_profile_starts_vllm_instead_of_the_cpu_llm() -> None:
    compose = load_gpu()
    assert set(active(compose)) == {"label-studio", "vllm", "backend"}
    assert set(active(load())) == {"label-studio", "llm", "backend"}  # the base file alone is unchanged
    # The backend still names the CPU server as a dependency: Compose refuses that for a left-out service
    # unless the dependency is optional.
    for name, dependency in compose["services"]["backend"]["depends_on"].items():
        assert name in active(compose) or dependency.get("required") is False, name


def test_the_gpu_backend_asks_the_vllm_service_for_the_model_it_serves() -> None:
    for env in ({}, {"HCC_LLM_MODEL": "llama-3.1-8b", "HCC_VLLM_MODEL": "meta-llama/Llama-3.1-8B-Instruct"}):
        services = load_gpu(env)["services"]
        backend, args = env_of(services["backend"]), vllm_args(services["vllm"])
        url = urlsplit(backend["HCC_LLM_BASE_URL"])
        assert url.hostname == "vllm" and url.port == int(args["--port"]) and url.path.rstrip("/") == "/v1"
        assert args["--host"] == "0.0.0.0", "on 127.0.0.1 vLLM is unreachable from the backend's container"
        assert backend["HCC_LLM_MODEL"] == args["--served-model-name"]
        assert env.get("HCC_VLLM_MODEL", args["--model"]) == args["--model"]


def test_the_gpu_backend_settings_are_ones_it_reads_and_accepts(monkeypatch) -> None:
    from backend.studio.settings import Settings

    backend = env_of(load_gpu()["services"]["backend"])
    assert set(backend) - names_the_backend_reads() == set()
    for name, value in backend.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()  # a bad structured mode or cap would raise here, naming the variable
    assert settings.llm_structured == "json_schema"
    # The cap keeps vLLM's batch full without queueing past it.
    assert 1 < settings.llm_concurrency <= int(vllm_args(load_gpu()["services"]["vllm"])["--max-num-seqs"])


def test_the_gpu_service_reserves_the_gpus_and_keeps_its_weights_in_a_volume() -> None:
    compose = load_gpu()
    vllm = compose["services"]["vllm"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "ports" not in vllm  # reached by service name; a server without auth stays off the host's ports
    assert mounts(vllm)["/root/.cache/huggingface"] in set(compose["volumes"])
    # The Hub token goes to vLLM only, never to the backend or Label Studio.
    gpu = load_gpu({"HF_TOKEN": "hf_secret"})["services"]
    holders = {name for name, s in gpu.items() if "hf_secret" in json.dumps(s)}
    assert holders == {"vllm"}
