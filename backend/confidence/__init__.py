"""Confidence: the probability that a label is right.

Per-item signals of a run (:mod:`.signals`), the prior mapping used before any review (:mod:`.prior`), the
calibrator fitted on reviewed items (:mod:`.calibration`) and the shared probability helpers
(:mod:`.probability`). It reads records by their field names and knows nothing of how they were made.

May import: ``backend.data`` and ``backend.config`` only; the labelling pipeline imports it, not the reverse.
"""
