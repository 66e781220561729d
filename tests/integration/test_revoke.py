"""Celery's own revoke of a run's task id cancels the run, on real workers and brokers.

A paused run holds no message, so Celery's revoke alone would only add its id
to each worker's memory: the run would stay paused, a later resume would be
accepted and its message discarded, and after a restart the run would
complete. These tests revoke through the client API, the ``celery control``
command and a revoke that reached the run before it paused, and check the run
ends cancelled for good.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_checkpoint import PAUSED, Checkpoints, RunCancelled
from tests.integration.conftest import Workers
from tests.integration.helpers import ROOT, Worker, get, wait_for_state, wait_until
from tests.integration.proj import Settings, gate_path, read_marks

pytestmark = [pytest.mark.slow]


@pytest.fixture
def store_kind() -> str:
    """The store does not matter here: the file store, on both brokers."""
    return "file"


def _cancelled(checkpoints: Checkpoints, run_id: str, *workers: Worker) -> str:
    """Wait until the store shows ``run_id`` cancelled; returns the recorded reason."""

    def reason() -> str | None:
        record = checkpoints.store.ended(run_id)
        if record is None or record.status != "cancelled":
            return None
        return record.ended_reason or "(no reason)"

    return wait_until(reason, f"run {run_id} cancelled in the store", 60, *workers)


def _celery(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **settings.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.integration.proj", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(240)
def test_revoking_a_paused_run_cancels_it_for_good_across_a_worker_restart(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    # Two workers: both receive the broadcast, one cancels, neither fails.
    first, second = workers.start("a"), workers.start("b")
    revoked = app.tasks["proj.wait_for"].delay(1)
    terminated = app.tasks["proj.wait_for"].delay(2)
    for result in (revoked, terminated):
        wait_for_state(result, PAUSED, first, second)

    AsyncResult(revoked.id, app=app).revoke()
    reason = _cancelled(checkpoints, revoked.id, first, second)
    assert "revoked with Celery's revoke" in reason
    with pytest.raises(RunCancelled, match="Celery's revoke"):
        get(AsyncResult(revoked.id, app=app), first, second)
    with pytest.raises(RunCancelled):
        checkpoints.resume(revoked.id, 5)
    announced = [
        w for w in (first, second) if f"checkpoint.cancelled run_id={revoked.id}" in w.log_text()
    ]
    assert len(announced) == 1, [w.describe() for w in (first, second)]

    done = _celery(settings, "control", "terminate", "SIGTERM", terminated.id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(terminate)" in _cancelled(checkpoints, terminated.id, first, second)
    with pytest.raises(RunCancelled):
        checkpoints.resume(terminated.id, 5)

    # A restart forgets Celery's revoked ids (no --statedb); the store does not.
    first.stop()
    second.stop()
    restarted = workers.start("c")
    for run_id in (revoked.id, terminated.id):
        record = checkpoints.store.ended(run_id)
        assert record is not None and record.status == "cancelled"
        assert checkpoints.store.load(run_id) is None
        with pytest.raises(RunCancelled):
            checkpoints.resume(run_id, 5)
    assert get(app.tasks["proj.add"].delay(2, 3), restarted) == 5  # the worker is taking tasks
    assert read_marks(settings.markers, "body", revoked.id) == []
    assert read_marks(settings.markers, "body", terminated.id) == []
    assert AsyncResult(revoked.id, app=app).state == "REVOKED"


@pytest.mark.timeout(180)
def test_a_revoke_that_reached_the_run_before_its_pause_cancels_it_at_the_next_resume(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.gated_pause"].delay(1)
    wait_until(lambda: read_marks(settings.markers, "first", result.id), "the body to start", 60)
    # Revoked while its first execution runs: no run in the store yet, and Celery
    # lets a running task finish, so the body goes on to pause.
    AsyncResult(result.id, app=app).revoke()
    worker.wait_for_log(f"Tasks flagged as revoked: {result.id}")
    assert checkpoints.store.load(result.id) is None
    gate_path(settings.markers, f"pause-{result.id}").touch()
    wait_until(lambda: checkpoints.store.load(result.id), "the run to pause", 60, worker)

    # The resume is accepted, but its message carries a revoked id: the worker
    # discards it, and the run is cancelled then instead of waiting forever.
    checkpoints.resume(result.id, 5)
    assert "discarded" in _cancelled(checkpoints, result.id, worker)
    with pytest.raises(RunCancelled):
        get(AsyncResult(result.id, app=app), worker)
    with pytest.raises(RunCancelled):
        checkpoints.resume(result.id, 6)
    assert read_marks(settings.markers, "body", result.id) == []
