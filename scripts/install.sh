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
# llama-cpp-python has no CPU wheels on PyPI and compiles from source. It is built for a portable x86-64
# baseline (AVX2, FMA, F16C), not -march=native: a native build on a CPU with AMX compiles in AMX kernels that
# crash (general protection fault in libggml-cpu) where the VM does not grant AMX state, and a wheel built on
# one machine's CPU may be reused on the next. pip's wheel cache ignores CMAKE_ARGS, so the wheel is built
# without it and kept in a directory named after the version and the build settings.
LLAMA_VERSION=0.3.36  # keep in step with the llm extra in pyproject.toml
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
wheels="${HCC_WHEEL_DIR:-$HOME/.cache/label-studio-hcc/wheels}/llama-$(echo "$LLAMA_VERSION $LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "==> compiling llama-cpp-python $LLAMA_VERSION (once per machine: 5-10 min)" >&2
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "${pip[@]}" wheel -q --no-cache-dir --no-deps -w "$wheels" \
    "llama-cpp-python==$LLAMA_VERSION"
fi
"${pip[@]}" install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
"${pip[@]}" install -q --find-links "$wheels" -e ".[llm,studio,dev]"
echo "$want" > "$stamp"
echo "==> installed into $VENV" >&2
