"""Annotator quality: how far to trust each human (and the LLM judge) in comparison and crowd labels.

Attentiveness of pairwise annotators by EM (:mod:`.attentiveness`), crowd-label models for categorical
labels (:mod:`.crowd`), the weak-LLM judge (:mod:`.judge`), weighted preference export for DPO
(:mod:`.preferences`) and seeded simulated annotators for tests and benchmarks (:mod:`.simulation`).

May import: :mod:`backend.labelling` (the LLM client the judge uses), ``backend.data`` and ``backend.config``.
"""
