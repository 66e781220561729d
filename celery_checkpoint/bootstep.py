"""The worker bootstep that recovers runs orphaned by dead workers.

``Checkpoints(app)`` adds it for you; on its own::

    from celery_checkpoint.bootstep import CheckpointRecovery
    app.steps["worker"].add(CheckpointRecovery)

Before the worker takes any task it opens the store (a store that cannot be
opened stops ``celery worker`` with a message naming the store and the cause),
then:

1. re-arms in-flight runs whose lease expired or whose owner process is dead,
2. re-sends those that had a pending resume request, and pending requests whose
   message looks lost (``checkpoint_resend_after``),
3. marks FAILURE any run recovered more than ``checkpoint_max_recoveries``
   times, instead of letting it crash workers forever,
4. fires pauses whose timeout has passed (their ``eta`` message may be lost),

and logs the counts. It repeats every ``checkpoint_recovery_interval`` seconds
on a daemon thread, so runs orphaned by a machine that never comes back are
picked up by the survivors. Every step goes through the store's claim, so any
number of workers may run it at once.

``celery worker --checkpoint-store URL`` overrides ``app.conf.checkpoint_store``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import click
from celery import Celery, bootsteps
from celery.exceptions import WorkerShutdown

from . import signals
from ._events import announce, log_event
from .exceptions import CheckpointError

__all__ = ["CheckpointRecovery", "RecoveryReport", "install", "recover"]

logger = logging.getLogger("celery_checkpoint.recovery")


@dataclass(frozen=True)
class RecoveryReport:
    rearmed: int = 0
    resent: int = 0
    failed: int = 0
    timeouts: int = 0

    def __str__(self) -> str:
        return (
            f"{self.rearmed} re-armed, {self.resent} resume(s) re-sent, "
            f"{self.failed} failed after too many recoveries, {self.timeouts} timeout(s) fired"
        )


def recover(app: Celery) -> RecoveryReport:
    """One recovery pass over the app's store; safe on any number of workers at once."""
    from celery import states

    from .task import Checkpoints

    checkpoints = Checkpoints.for_app(app)
    store = checkpoints.store
    config = checkpoints.config
    rearmed = store.recover_orphaned()
    failed = 0
    for run in rearmed:
        if run.recoveries > config.max_recoveries:
            reason = (
                f"recovered {run.recoveries} times (checkpoint_max_recoveries="
                f"{config.max_recoveries}): its body keeps killing workers or never finishes"
            )
            if store.cancel(run.run_id, reason=reason, status="failed") is not None:
                app.backend.store_result(
                    run.run_id, CheckpointError(f"run {run.run_id!r} {reason}"), states.FAILURE
                )
                log_event(
                    "failed",
                    logging.ERROR,
                    run_id=run.run_id,
                    task=run.task_name,
                    step=run.step,
                    pause_seq=run.pause_seq,
                    recoveries=run.recoveries,
                    reason=reason,
                )
                failed += 1
                continue
        announce(
            "recovered",
            signals.checkpoint_recovered,
            app,
            run,
            log={"recoveries": run.recoveries},
        )
    resent = 0
    for run_id in store.due_resumes(config.resend_after):
        try:  # one run's trouble (a corrupt record, the broker) must not stop the pass
            waiting = store.load(run_id)
            if waiting is not None and waiting.resume is not None:
                kind = "timeout" if waiting.resume.timed_out else "resume"
                checkpoints.send(waiting, waiting.resume, kind=kind)
                resent += 1
        except Exception as exc:
            logger.warning("run %s: could not re-send its resume: %s", run_id, exc)
    timeouts = 0
    for run_id in store.due_timeouts():
        # Through the same compare-and-set and claim as every resume: a lost
        # timer message, or a deadline that passed while no worker ran.
        try:
            timeouts += checkpoints._fire_timeout(run_id)
        except Exception as exc:  # one run's trouble must not stop the pass
            logger.warning("run %s: could not fire its timeout: %s", run_id, exc)
    return RecoveryReport(len(rearmed), resent, failed, timeouts)


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
            from .task import Checkpoints

            Checkpoints.for_app(parent.app).use_store(checkpoint_store)

    def start(self, parent: Any) -> None:
        from .task import Checkpoints

        app = parent.app
        checkpoints = Checkpoints.for_app(app)
        try:
            config = checkpoints.config
            store = checkpoints.store
            report = recover(app)
        except CheckpointError as exc:
            target = str(app.conf.get("checkpoint_store") or "(default directory)")
            message = str(exc) if target in str(exc) else f"checkpoint store {target}: {exc}"
            logger.critical("cannot start the worker: %s", message)
            raise WorkerShutdown(message) from exc
        logger.info("checkpoint recovery on %r at boot: %s", store, report)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop,
            args=(app, config.recovery_interval),
            name="checkpoint-recovery",
            daemon=True,
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)

    def terminate(self, parent: Any) -> None:
        # A cold shutdown calls terminate, not stop (and the embedded test
        # worker always stops that way): without this the thread outlives it.
        self.stop(parent)

    def _loop(self, app: Celery, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                report = recover(app)
            except Exception:
                logger.exception("checkpoint recovery pass failed; retrying in %ss", interval)
                continue
            if report.rearmed or report.resent or report.failed or report.timeouts:
                logger.info("checkpoint recovery: %s", report)


def install(app: Celery) -> None:
    """Add the bootstep and the ``--checkpoint-store`` worker option to ``app``."""
    app.steps["worker"].add(CheckpointRecovery)
    options = app.user_options["worker"]
    if not any(getattr(opt, "name", None) == "checkpoint_store" for opt in options):
        options.add(
            click.Option(
                ["--checkpoint-store"],
                default=None,
                help="Checkpoint store: a directory, file:///dir or redis://host:port/db "
                "(overrides checkpoint_store).",
            )
        )
