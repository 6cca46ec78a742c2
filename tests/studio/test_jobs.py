"""The background job queue (webhooks answer at once, the work runs behind) and the per-project file lock."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.studio.jobs import JobQueue, project_lock

WAIT = 10.0  # generous upper bound for anything that should happen at once: the machine is shared


class Gate:
    """A job that blocks the worker until released, so the test controls what is waiting and what runs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.started.set()
        assert self.release.wait(WAIT), "the test never released the gate"


def recorder(log: list[str], name: str) -> Callable[[], None]:
    return lambda: log.append(name)


@pytest.fixture
def jobs() -> JobQueue:
    return JobQueue(name="test-jobs")


def test_jobs_run_in_submission_order(jobs: JobQueue) -> None:
    ran: list[str] = []
    gate = Gate()
    jobs.submit("gate", gate)  # hold the worker so all three are waiting together
    for name in ("a", "b", "c"):
        assert jobs.submit(name, recorder(ran, name)) is True
    assert gate.started.wait(WAIT)
    assert jobs.pending() == 3
    gate.release.set()
    assert jobs.wait_idle(WAIT)
    assert ran == ["a", "b", "c"]
    assert jobs.pending() == 0


def test_identical_waiting_job_is_merged_and_on_queued_runs_once(jobs: JobQueue) -> None:
    ran: list[str] = []
    queued: list[str] = []
    gate = Gate()
    jobs.submit("gate", gate)
    assert gate.started.wait(WAIT)  # "gate" is running, so "prelabel:1" below waits behind it

    assert jobs.submit("prelabel:1", recorder(ran, "first"), on_queued=lambda: queued.append("q")) is True
    assert jobs.submit("prelabel:1", recorder(ran, "second"), on_queued=lambda: queued.append("q")) is False
    assert jobs.submit("prelabel:2", recorder(ran, "other project")) is True  # another key is not merged
    assert queued == ["q"]
    assert jobs.pending() == 2

    gate.release.set()
    assert jobs.wait_idle(WAIT)
    # The merged request is served by the waiting job: one run, the job submitted first.
    assert ran == ["first", "other project"]


def test_key_submitted_while_its_job_runs_runs_again(jobs: JobQueue) -> None:
    """A webhook arriving during a re-vote must trigger another re-vote: the running one read old anchors."""
    runs: list[int] = []
    gate = Gate()

    def first() -> None:
        runs.append(1)
        gate()

    assert jobs.submit("revote:1", first) is True
    assert gate.started.wait(WAIT)
    assert jobs.submit("revote:1", lambda: runs.append(2)) is True  # not merged into the running job
    assert jobs.pending() == 1
    gate.release.set()
    assert jobs.wait_idle(WAIT)
    assert runs == [1, 2]


def test_a_failing_job_does_not_kill_the_worker(jobs: JobQueue, caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("Label Studio went away")

    with caplog.at_level(logging.ERROR, logger="backend.studio.jobs"):
        jobs.submit("boom", boom)
        jobs.submit("after", recorder(ran, "after"))
        assert jobs.wait_idle(WAIT)
    assert ran == ["after"]
    assert any("boom" in r.getMessage() and r.exc_info for r in caplog.records)  # logged with its traceback
    # The same key can be submitted again after its failure.
    assert jobs.submit("boom", recorder(ran, "boom again")) is True
    assert jobs.wait_idle(WAIT)
    assert ran == ["after", "boom again"]


def test_wait_idle(jobs: JobQueue) -> None:
    assert jobs.wait_idle(0)  # nothing submitted yet
    gate = Gate()
    jobs.submit("gate", gate)
    jobs.submit("behind", lambda: None)
    assert gate.started.wait(WAIT)
    assert jobs.wait_idle(0.2) is False  # a job runs and another waits
    gate.release.set()
    assert jobs.wait_idle(WAIT) is True
    assert jobs.pending() == 0


def test_a_failing_on_queued_leaves_nothing_half_queued(jobs: JobQueue) -> None:
    """on_queued writes the job status to SQLite; if that fails, the key must not stay blocked forever."""
    ran: list[str] = []

    def broken_status() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        jobs.submit("prelabel:1", recorder(ran, "lost"), on_queued=broken_status)
    assert jobs.pending() == 0
    assert jobs.wait_idle(1.0)
    assert jobs.submit("prelabel:1", recorder(ran, "retried")) is True  # not merged into a job that never runs
    assert jobs.wait_idle(WAIT)
    assert ran == ["retried"]


# -- project_lock --------------------------------------------------------------------------------------


def _take_lock_in_process(directory: str, events) -> None:
    """Run in a spawned process (another gunicorn worker): report when it tries and when it gets the lock."""
    events.put(("trying", time.monotonic()))
    with project_lock(Path(directory)):
        events.put(("acquired", time.monotonic()))


def test_project_lock_makes_a_second_process_wait(tmp_path: Path) -> None:
    directory = tmp_path / "projects" / "3"  # does not exist yet: the lock creates it
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    with project_lock(directory):
        proc = ctx.Process(target=_take_lock_in_process, args=(str(directory), events))
        proc.start()
        kind, _ = events.get(timeout=30)
        assert kind == "trying"
        time.sleep(0.5)  # give the other process every chance to (wrongly) get the lock
        assert events.empty(), "the second process got the lock while the first held it"
        released = time.monotonic()  # CLOCK_MONOTONIC is system-wide on Linux: comparable across processes
    kind, acquired = events.get(timeout=WAIT)
    proc.join(WAIT)
    assert kind == "acquired"
    assert acquired >= released
    assert proc.exitcode == 0
    assert (directory / "job.lock").exists()


def test_locks_of_different_projects_do_not_block_each_other(tmp_path: Path) -> None:
    got_other = threading.Event()

    def other_project() -> None:
        with project_lock(tmp_path / "2"):
            got_other.set()

    with project_lock(tmp_path / "1"):
        thread = threading.Thread(target=other_project)
        thread.start()
        assert got_other.wait(WAIT)
    thread.join(WAIT)


# -- durable jobs: leases of processes, orphaned jobs -----------------------------------------------------
def _lease_holder(directory, ready):
    """A child process that takes a lease, reports its id and sleeps until killed."""
    import time as _time

    from backend.studio.jobs import ProcessLease

    lease = ProcessLease(directory)
    ready.put(lease.id)
    _time.sleep(600)


def test_a_lease_is_alive_while_its_process_runs_and_dead_after_kill_9(tmp_path):
    import multiprocessing
    import os
    import signal

    from backend.studio.jobs import ProcessLease, orphaned

    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    child = context.Process(target=_lease_holder, args=(tmp_path, ready), daemon=True)
    child.start()
    owner = ready.get(timeout=60)
    mine = ProcessLease(tmp_path)
    assert mine.alive(owner) and mine.alive(mine.id)
    assert not orphaned({"state": "running", "owner": owner}, mine)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert not mine.alive(owner)
    assert orphaned({"state": "running", "owner": owner}, mine)
    assert orphaned({"state": "queued"}, mine)  # a store written before jobs had owners
    assert not orphaned({"state": "done", "owner": owner}, mine)


def test_a_job_left_running_by_a_dead_process_is_resumed_once(tmp_path):
    from backend.studio.service import HCCService
    from backend.studio.settings import Settings

    config = ("<View><Text name='text' value='$text'/><Choices name='c' toName='text'><Choice value='a'/>"
              "<Choice value='b'/></Choices></View>")
    first = HCCService(Settings(model_dir=tmp_path))
    store = first.store(4)
    store.set("label_config", config)
    store.update("job", state="running", kind="prelabel", owner="12345-deadbeef0000", started=1.0)
    store.update("training", state="done")
    second = HCCService(Settings(model_dir=tmp_path))
    third = HCCService(Settings(model_dir=tmp_path))  # another worker starting at the same moment
    assert second.resume_jobs() == ["prelabel:4"]
    assert third.resume_jobs() == []  # the second one (alive) owns it now
    second.jobs.wait_idle(timeout=60)
    job = store.get("job")
    # No Label Studio here, so the resumed job fails, but it ran and says why: it no longer shows "running".
    assert job["state"] == "failed" and "LABEL_STUDIO_URL" in job["error"]


def test_a_job_that_keeps_killing_its_process_is_given_up(tmp_path):
    from backend.studio.jobs import MAX_RESUMES
    from backend.studio.service import HCCService
    from backend.studio.settings import Settings

    service = HCCService(Settings(model_dir=tmp_path))
    store = service.store(4)
    store.set("label_config", "<View/>")
    store.update("job", state="running", kind="prelabel", owner="1-gone", resumed=True, resumes=MAX_RESUMES)
    assert service.resume_jobs() == []
    assert store.get("job")["state"] == "failed" and "interrupted" in store.get("job")["error"]


def test_a_job_retries_while_label_studio_is_down_and_fails_at_once_on_a_refusal(tmp_path):
    from backend.studio.client import StudioError
    from backend.studio.jobs import run_recorded
    from backend.studio.store import ProjectStore

    store = ProjectStore(tmp_path)
    calls, seen = [], []

    def flaky() -> dict:
        calls.append(1)
        seen.append(store.get("job")["state"])
        if len(calls) < 3:
            raise StudioError("cannot reach Label Studio", retryable=True)
        return {"written": 5}

    summary = run_recorded(store, "prelabel", flaky, project_id=1, expected=(StudioError,),
                           retryable=lambda exc: exc.retryable, retries=3, retry_seconds=0.01)
    assert summary is not None and summary["written"] == 5 and len(calls) == 3
    assert store.get("job")["attempt"] == 2 and seen == ["running"] * 3  # "waiting" only between attempts

    calls.clear()

    def refused() -> dict:
        calls.append(1)
        raise StudioError("rejected LABEL_STUDIO_API_KEY (401)")

    assert run_recorded(store, "prelabel", refused, project_id=1, expected=(StudioError,),
                        retryable=lambda exc: exc.retryable, retries=3, retry_seconds=0.01) is None
    assert len(calls) == 1 and store.get("job")["state"] == "failed"
