# label-studio-hcc: the ML backend (gunicorn on :9090) and, with another command, the embedded LLM server.
# docker-compose.yml runs both from this one image; see the comments there.

# -- build: compilers are needed for llama-cpp-python (no CPU wheels on PyPI), not at run time ---------------
FROM python:3.11-slim AS build

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv && pip install --upgrade pip wheel setuptools

# torch first, from the CPU index: left to the resolver, sentence-transformers would pull the multi-GB CUDA
# build. The project's own requirement (torch>=2.6) is then already satisfied and pip leaves it alone.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# A portable llama.cpp build: the default -march=native would crash with "illegal instruction" on any CPU
# older than the build machine's.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY backend ./backend
RUN pip install ".[llm]"

# -- run ---------------------------------------------------------------------------------------------------
FROM python:3.11-slim

# libgomp: llama.cpp and faiss use OpenMP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 hcc \
 && mkdir -p /data/models /data/cache \
 && chown -R hcc:hcc /data

COPY --from=build /opt/venv /opt/venv

# MODEL_DIR: per-project state (SQLite) and the embedding cache. HCC_CACHE_DIR: embedded LLM models.
# Both are volumes in docker-compose.yml; the directories exist here so a fresh named volume gets hcc's uid.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=/data/models \
    HCC_CACHE_DIR=/data/cache \
    WORKERS=1 \
    THREADS=8

WORKDIR /app
COPY model.py _wsgi.py ./
USER hcc

EXPOSE 9090
# Shell form so WORKERS and THREADS are read when the container starts; exec so gunicorn gets SIGTERM.
# --timeout 300: a /predict batch runs the LLM views and may take minutes on a CPU.
CMD ["sh", "-c", "exec gunicorn --bind :9090 --workers ${WORKERS:-1} --threads ${THREADS:-8} --timeout 300 _wsgi:app"]
