"""The progress line `hcc demo` prints while the backend pre-labels (backend.cli.studio_demo)."""

from __future__ import annotations

from backend.cli.studio_demo import _progress_line


def test_the_progress_line_shows_the_step_the_llm_calls_and_the_time_left() -> None:
    job = {"state": "running", "step": "labelling 500 tasks (250 of 3000 done)", "llm_calls": 120, "eta_s": 95.4}
    assert _progress_line(job) == ("pre-labelling: running labelling 500 tasks (250 of 3000 done), 120 LLM calls, "
                                   "~95 s left")


def test_a_finished_or_waiting_job_shows_no_time_left() -> None:
    assert _progress_line({"state": "done", "step": "done", "eta_s": 0.0}) == "pre-labelling: done done"
    assert _progress_line({}) == "pre-labelling: waiting"
