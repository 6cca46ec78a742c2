"""Shared defaults: cache locations and environment variables the CLI and the server read."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LLM_MODEL = "qwen2.5-coder-1.5b"
#: The LLM views the pipeline can ask; a record carries each one's answer as ``llm_<view>``. Shared here
#: because the pipeline writes those fields and the confidence signals read them.
LLM_VIEWS = ("zero_shot", "hinted", "few_shot", "choice")


def cache_dir() -> Path:
    """``HCC_CACHE_DIR``, else ``$XDG_CACHE_HOME/label-studio-hcc``, else ``~/.cache/label-studio-hcc``."""
    explicit = os.environ.get("HCC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "label-studio-hcc"
