"""The HTTP side of the ML backend protocol Label Studio 1.23 speaks, as a Flask app.

Routes: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook`` (Label Studio's own), plus
``GET /status?project=ID`` (pre-labelling progress and the last run) and ``GET /metrics`` (request counts
and timings). With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set, every route asks for them.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request

from backend.studio.labelconfig import LabelConfigError
from backend.studio.service import HCCService, number_field, text_field

log = logging.getLogger(__name__)


class _Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.predicted_tasks = 0

    def record(self, route: str, seconds: float) -> None:
        with self._lock:
            self.counts[route] = self.counts.get(route, 0) + 1
            self.seconds[route] = self.seconds.get(route, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.counts), "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                    "predicted_tasks": self.predicted_tasks}


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (no warning needed without auth)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message}), status


def create_app(model_class: Callable[..., Any], service: HCCService) -> Flask:
    """``model_class(project_id, label_config, service=...)`` builds the per-request model (see model.py)."""
    settings = service.settings
    if settings.basic_auth_user and not settings.basic_auth_pass:
        raise ValueError("BASIC_AUTH_USER is set but BASIC_AUTH_PASS is empty: set a password, or unset both")
    app = Flask("label-studio-hcc")
    app.json.sort_keys = False
    # Label Studio sends at most a few thousand tasks per /predict; anything far larger is refused with 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024
    metrics = _Metrics()
    # Jobs a killed or crashed process left queued or running are queued again here (in the background:
    # the first request must not wait for it).
    threading.Thread(target=service.resume_jobs, name="hcc-resume", daemon=True).start()
    user_bytes, password_bytes = settings.basic_auth_user.encode(), settings.basic_auth_pass.encode()

    @app.before_request
    def _auth():
        request.environ["hcc.t0"] = time.perf_counter()
        if not user_bytes:
            return None
        auth = request.authorization
        # Compared as UTF-8 bytes: compare_digest refuses non-ASCII str, which a stranger can send.
        ok = auth is not None and hmac.compare_digest((auth.username or "").encode(), user_bytes) and \
            hmac.compare_digest((auth.password or "").encode(), password_bytes)
        if not ok:
            return Response("authentication required", 401, {"WWW-Authenticate": 'Basic realm="label-studio-hcc"'})
        return None

    @app.after_request
    def _timing(response: Response) -> Response:
        t0 = request.environ.get("hcc.t0")
        if t0 is not None:  # by route, so that a stranger's made-up paths do not grow the table
            route = request.url_rule.rule if request.url_rule is not None else "(no such route)"
            metrics.record(route, time.perf_counter() - t0)
        return response

    def payload() -> dict[str, Any]:
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # json's parser recurses per level; silent=True only covers ValueError
            raise ValueError("the request body is nested too deeply to be a Label Studio request") from None
        if not isinstance(data, dict):
            hint = "" if request.is_json else f" sent as Content-Type: application/json, not {request.mimetype!r}"
            raise ValueError(f"the request body must be a JSON object{hint}")
        return data

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(service.health())

    @app.post("/setup")
    def setup():
        try:
            data = payload()
            text_field(data.get("hostname"), "hostname")  # kept for later Label Studio calls: checked now
            text_field(data.get("access_token"), "access_token")
            model = model_class(data.get("project"), text_field(data.get("schema"), "schema"), service=service)
            return jsonify(model.setup(data))
        except (LabelConfigError, ValueError) as exc:
            log.error("/setup: %s", exc)
            return _error(str(exc), 400)

    @app.post("/predict")
    def predict():
        try:
            data = payload()
            tasks = data.get("tasks")
            if not isinstance(tasks, list) or not tasks:
                raise ValueError("'tasks' must be a non-empty list of Label Studio tasks")
            for i, task in enumerate(tasks):
                if not isinstance(task, dict):
                    raise ValueError(f"tasks[{i}] must be a task object")
                number_field(task.get("id"), f"tasks[{i}].id")
            params = data.get("params")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"'params' must be an object, got {type(params).__name__}")
            label_config = text_field(data.get("label_config"), "label_config")
            model = model_class(data.get("project"), label_config, service=service)
            context = (params or {}).get("context")
            response = model.predict(tasks, context=context)
        except (LabelConfigError, ValueError) as exc:
            log.error("/predict: %s", exc)
            return _error(str(exc), 400)
        metrics.predicted_tasks += len(tasks)
        return jsonify(response)

    @app.post("/webhook")
    def webhook():
        try:
            data = payload()
        except ValueError as exc:
            return _error(str(exc), 400)
        project = data.get("project") if isinstance(data.get("project"), dict) else {}
        try:
            model = model_class(project.get("id"), project.get("label_config") or "", service=service)
            return jsonify(model.fit(data.get("action"), data))
        except ValueError as exc:  # PayloadError and unreadable ids: the sender's mistake, named
            log.warning("/webhook %s: %s", data.get("action"), exc)
            return _error(str(exc), 400)

    @app.get("/status")
    def status():
        if request.args.get("project") is None:
            return _error("give the project id: /status?project=ID", 400)
        try:
            project = number_field(request.args["project"], "project")
        except ValueError as exc:
            return _error(f"{exc}: /status?project=ID", 400)
        return jsonify(service.status(project))

    @app.get("/metrics")
    def metrics_route():
        return jsonify(metrics.as_dict())

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        from werkzeug.exceptions import HTTPException

        if isinstance(exc, HTTPException):  # 404, 405, 413...: as JSON like every other error, headers kept
            response = exc.get_response()
            response.set_data(jsonify({"status": "error", "error": f"{exc.code} {exc.name}: {exc.description}"})
                              .get_data())
            response.content_type = "application/json"
            return response
        log.exception("unhandled error on %s", request.path)
        return _error(f"{type(exc).__name__}: {exc}", 500)

    return app
