"""WSGI entry of the label-studio-hcc ML backend.

- gunicorn: ``gunicorn --bind :9090 --workers $WORKERS --threads $THREADS _wsgi:app``
- directly: ``python _wsgi.py --host 127.0.0.1 --port 9090`` (Flask's threaded server; fine for one user)

Settings come from the environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, MODEL_DIR, BASIC_AUTH_USER,
BASIC_AUTH_PASS, LOG_LEVEL and the HCC_* variables (backend/studio/settings.py lists them all).
"""

from __future__ import annotations

import argparse
import logging
import os

from backend.studio.server import create_app, is_loopback
from model import HCCModel, get_service

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                    format="[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s")

app = create_app(HCCModel, get_service())


def main() -> None:
    parser = argparse.ArgumentParser(description="label-studio-hcc ML backend")
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)))
    parser.add_argument("--log-level", default=None, help="overrides LOG_LEVEL")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    args = parser.parse_args()
    if args.log_level:
        logging.getLogger().setLevel(args.log_level.upper())
    service = get_service()
    logger = logging.getLogger("hcc")
    logger.info("model_version %s, MODEL_DIR %s", service.settings.model_version, service.settings.model_dir)
    if not service.settings.basic_auth_user and not is_loopback(args.host):
        logger.warning("listening on %s without BASIC_AUTH_USER / BASIC_AUTH_PASS: anyone who reaches port %d "
                       "can change this backend's anchors and start jobs; set both (and the same pair in Label "
                       "Studio's model settings)", args.host, args.port)
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
