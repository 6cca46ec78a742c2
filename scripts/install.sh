#!/usr/bin/env bash
# Install label-studio-hcc and everything it needs into .venv. Idempotent: a second run with unchanged
# project files returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.hcc-install-stamp"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import backend, llama_cpp, label_studio" 2>/dev/null; then
  exit 0
fi

echo "==> creating $VENV and installing (first time: several minutes; llama-cpp-python compiles)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip wheel setuptools
# torch first and pinned: 2.13.0 is a CPU build; letting a dependency pick torch pulls a multi-GB CUDA build.
"${pip[@]}" install -q torch==2.13.0
# llama-cpp-python has no CPU wheels on PyPI and compiles from source (pip keeps the built wheel cached).
"${pip[@]}" install -q -e ".[llm,studio,dev]"
echo "$want" > "$stamp"
echo "==> installed into $VENV" >&2
