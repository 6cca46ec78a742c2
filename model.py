"""The model class of this Label Studio ML backend, in the shape users know from Label Studio's examples.

``HCCModel(project_id, label_config)`` has ``setup``, ``predict(tasks, context)`` and ``fit(event, data)``.
The work is done by ``backend.studio.service.HCCService`` (one per process, shared by all projects): the
encoder + LLM heterogeneous-consistency pipeline, DCCA correction, anchors from human annotations.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from backend.studio.service import HCCService, project_id_of

log = logging.getLogger(__name__)

_service: HCCService | None = None
_service_lock = threading.Lock()


def get_service() -> HCCService:
    """The process's service, created on first use from the environment (see backend/studio/settings.py)."""
    global _service
    with _service_lock:
        if _service is None:
            _service = HCCService()
        return _service


class HCCModel:
    """Pre-label text classification with HCC; learn from every submitted label.

    - ``predict``: one prediction per task (label, score, model_version); items the encoder and the LLM
      views disagree on get the DCCA vote, a score below the review threshold and a review flag.
    - ``fit``: Label Studio's webhook events. Annotation events update the anchors at once and re-vote in
      the background; ``TASKS_CREATED`` / ``START_TRAINING`` pre-label the project in the background.
    """

    def __init__(self, project_id: Any = None, label_config: str = "", *, service: HCCService | None = None) -> None:
        self.service = service or get_service()
        self.project_id = project_id_of(project_id) if project_id not in (None, "") else None
        self.label_config = label_config

    @property
    def model_version(self) -> str:
        return self.service.settings.model_version

    def setup(self, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = dict(payload or {})
        payload.setdefault("project", self.project_id)
        payload.setdefault("schema", self.label_config)
        return self.service.setup(payload)

    def predict(self, tasks: list[dict[str, Any]], context: dict[str, Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
        results = self.service.predict(tasks, self.project_id, self.label_config)
        # The project's own version (a trained encoder has its own), as each result carries it.
        version = next((r["model_version"] for r in results if r.get("model_version")), self.model_version)
        return {"results": results, "model_version": version}

    def fit(self, event: str | None, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self.service.webhook({**data, "action": event})
