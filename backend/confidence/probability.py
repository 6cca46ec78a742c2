"""Probability helpers shared by the signals, the prior mapping and the calibrator."""

from __future__ import annotations

from typing import Any

import numpy as np

_LOGIT_CLIP = 1e-4  # probabilities are clipped to [1e-4, 1 - 1e-4] before a logit: 0 or 1 must not become inf
_LOSS_CLIP = 1e-6  # and to [1e-6, 1 - 1e-6] in a log loss: one confident mistake must not make it infinite


def logit(p: Any) -> np.ndarray:
    """log(p / (1 - p)), finite for every p in [0, 1]."""
    p = np.clip(np.asarray(p, dtype=np.float64), _LOGIT_CLIP, 1 - _LOGIT_CLIP)
    return np.log(p / (1 - p))


def item_log_loss(p: Any, right: Any) -> np.ndarray:
    """Per-item negative log-likelihood of the outcomes ``right`` under the probabilities ``p``."""
    p = np.clip(np.asarray(p, dtype=np.float64), _LOSS_CLIP, 1 - _LOSS_CLIP)
    return -np.where(np.asarray(right, dtype=bool), np.log(p), np.log1p(-p))
