"""The Label Studio layer: the ML-backend wire protocol over the engine.

Reading the labelling config (:mod:`.labelconfig`), per-project state (:mod:`.store`), tasks <-> texts and
records -> predictions (:mod:`.project`, :mod:`.pairwise`), the service behind /setup, /predict and the
webhooks (:mod:`.service`), background jobs (:mod:`.jobs`), Label Studio API calls (:mod:`.client`), the Flask
app (:mod:`.server`), its settings (:mod:`.settings`) and local process launch (:mod:`.launch`).

May import: :mod:`backend.labelling`, :mod:`backend.confidence`, :mod:`backend.annotators`,
:mod:`backend.models`, ``backend.data`` and ``backend.config``; never the CLI.
"""
