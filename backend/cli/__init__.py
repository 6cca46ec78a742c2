"""The ``hcc`` command: argument parsing (:mod:`.main`) and the jobs it runs.

Offline annotation of files (:mod:`.annotate`), evaluation against gold labels (:mod:`.evaluate`),
calibration from reviewed rows (:mod:`.calibrate`), annotator quality and preference export
(:mod:`.comparison`), and the demos (:mod:`.demo` offline, :mod:`.studio_demo` with Label Studio).

May import every other package; nothing imports it.
"""
