"""Monitors (Flower, ``celery events``) show a paused run as PAUSED, then SUCCESS.

A real event receiver (``app.events.Receiver`` feeding ``celery.events.state.State``,
as Flower does) listens to a real worker started with ``-E``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.events.state import State

from celery_checkpoint import Checkpoints
from tests.integration.conftest import Workers
from tests.integration.helpers import Worker, get, wait_until
from tests.integration.proj import Settings, gate_path

pytestmark = [pytest.mark.slow]


@pytest.fixture
def store_kind() -> str:
    return "file"


class Monitor:
    """Celery's event state, fed by a receiver on its own thread and connection."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.state = State()
        self.ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="event-monitor", daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise AssertionError("the event receiver did not start")

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self.state.event})
            # Ready once its queue is bound: events sent before that are lost.
            receiver.on_consume_ready = lambda *args, **kwargs: self.ready.set()
            self._receiver = receiver
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def task(self, task_id: str) -> Any:
        return self.state.tasks.get(task_id)

    def wait_state(self, task_id: str, state: str, *workers: Worker) -> Any:
        def reached() -> Any:
            task = self.task(task_id)
            return task if task is not None and task.state == state else None

        found = self.task(task_id)
        return wait_until(
            reached,
            f"the monitor to show {task_id} {state} (now {found and found.state})",
            60,
            *workers,
        )

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)


@pytest.fixture
def monitor(app: Celery) -> Iterator[Monitor]:
    watching = Monitor(app)
    yield watching
    watching.stop()


@pytest.mark.timeout(120)
def test_a_monitor_shows_a_paused_run_as_paused_then_success_after_its_resume(
    app: Celery, checkpoints: Checkpoints, workers: Workers, monitor: Monitor
) -> None:
    worker = workers.start(options=("-E",))
    result = app.tasks["proj.approve"].delay("o-7")

    paused = monitor.wait_state(result.id, "PAUSED", worker)
    assert (paused.step, paused.run_id, paused.pause_seq) == ("await_approval", result.id, 1)
    assert paused.reason == "order o-7"
    assert paused.name == "proj.approve"  # the task-received fields are kept

    checkpoints.resume(result.id, {"approved": True, "approver": "ana"})
    assert get(result, worker) == "o-7 approved by ana"
    done = monitor.wait_state(result.id, "SUCCESS", worker)
    assert done.result == repr("o-7 approved by ana")


@pytest.mark.timeout(120)
def test_a_monitor_shows_a_resumed_body_as_resumed_while_it_runs(
    app: Celery,
    checkpoints: Checkpoints,
    workers: Workers,
    monitor: Monitor,
    settings: Settings,
) -> None:
    """Celery's own task-started ranks below PAUSED in its event state; task-resumed does not."""
    worker = workers.start(options=("-E",))
    result = app.tasks["proj.gated"].delay(3)
    monitor.wait_state(result.id, "PAUSED", worker)

    checkpoints.resume(result.id, "go", request_id="req-9")
    running = monitor.wait_state(result.id, "RESUMED", worker)
    assert (running.request_id, running.pause_seq, running.timed_out) == ("req-9", 1, False)
    gate_path(settings.markers, result.id).touch()
    assert get(result, worker) == "go"
    monitor.wait_state(result.id, "SUCCESS", worker)
