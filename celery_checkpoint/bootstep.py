"""The worker bootstep that runs recovery passes.

``Checkpoints(app)`` adds it for you; on its own::

    from celery_checkpoint.bootstep import CheckpointRecovery
    app.steps["worker"].add(CheckpointRecovery)

Before the worker takes any task it opens the store (a store that cannot be
opened stops ``celery worker`` with a message naming the store and the cause)
and runs one recovery pass (:mod:`celery_checkpoint.recovery`: re-arm runs
orphaned by dead workers, re-send lost resumes, fire due timeouts), then
repeats it every ``checkpoint_recovery_interval`` seconds on a daemon thread,
so runs orphaned by a machine that never comes back are picked up by the
survivors. Any number of workers may run passes at once. Each pass also arms
the worker's deadline timer for the store's earliest pause deadline, which
then fires on time (:mod:`celery_checkpoint._timeouts`).

``celery worker --checkpoint-store URL`` overrides ``app.conf.checkpoint_store``.

The step also makes Celery's revoke of a run's task id cancel the run
(:mod:`celery_checkpoint._revoke`; control commands reach the worker's main
process only, where this step runs), and tells paused and resumed runs
whether the worker sends task events (``-E``), before the pool forks.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from celery import Celery, bootsteps
from celery.exceptions import WorkerShutdown

from . import _revoke
from .checkpoints import Checkpoints
from .exceptions import CheckpointError
from .recovery import RecoveryReport
from .store._urls import redact

__all__ = ["CheckpointRecovery", "RecoveryReport", "install", "recover"]

logger = logging.getLogger("celery_checkpoint.recovery")


def recover(app: Celery) -> RecoveryReport:
    """One recovery pass over the app's store; safe on any number of workers at once."""
    return Checkpoints.for_app(app).recover()


def install(app: Celery) -> None:
    """Add the bootstep and the ``--checkpoint-store`` worker option to ``app``."""
    Checkpoints.for_app(app)


class CheckpointRecovery(bootsteps.StartStopStep):  # type: ignore[misc]
    """Recover orphaned runs before the worker takes tasks, then on a timer."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}
    label = "CheckpointRecovery"

    def __init__(self, parent: Any, checkpoint_store: str | None = None, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if checkpoint_store:
            # Set before the pool forks so child processes open the same store;
            # the command line wins over checkpoint_store and over Checkpoints(store=...).
            parent.app.conf.checkpoint_store = checkpoint_store
            Checkpoints.for_app(parent.app).use_store(checkpoint_store)
        # -E or worker_send_task_events, as this worker resolved them; set here,
        # before the pool's children fork, so they inherit it.
        Checkpoints.for_app(parent.app).task_events = bool(getattr(parent, "task_events", False))

    def start(self, parent: Any) -> None:
        app = parent.app
        checkpoints = Checkpoints.for_app(app)
        try:
            config = checkpoints.config
            store = checkpoints.store
            checkpoints.start_timer()  # armed by each pass from now on
            report = checkpoints.recover()
        except CheckpointError as exc:
            target = redact(str(app.conf.get("checkpoint_store") or "(the default store)"))
            message = str(exc) if target in str(exc) else f"checkpoint store {target}: {exc}"
            logger.critical("cannot start the worker: %s", message)
            raise WorkerShutdown(message) from exc
        logger.info("checkpoint recovery on %r at boot: %s", store, report)
        _revoke.install()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop,
            args=(checkpoints, config.recovery_interval),
            name="checkpoint-recovery",
            daemon=True,
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        Checkpoints.for_app(parent.app).stop_timer()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)

    def terminate(self, parent: Any) -> None:
        # A cold shutdown calls terminate, not stop (and the embedded test
        # worker always stops that way): without this the thread outlives it.
        self.stop(parent)

    def _loop(self, checkpoints: Checkpoints, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                report = checkpoints.recover()
            except Exception:
                logger.exception("checkpoint recovery pass failed; retrying in %ss", interval)
                continue
            if report:
                logger.info("checkpoint recovery: %s", report)
