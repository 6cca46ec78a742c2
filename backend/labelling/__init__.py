"""The labelling pipeline: the views that label each text and how their labels are combined.

The sentence encoder over the team's anchors (:mod:`.encoder`, :mod:`.anchors`), the LLM views behind any
OpenAI-compatible API (:mod:`.llm`, :mod:`.prompts`, :mod:`.llm_cache`), and the HCC pipeline with its
consistency split and DCCA correction (:mod:`.pipeline`). Plain texts, labels and arrays in and out.

May import: :mod:`backend.confidence` (the prior mapping of P(right) each record carries), :mod:`backend.models`
(packaged encoders), ``backend.data`` and ``backend.config``. Never the Label Studio layer or the CLI.
"""
