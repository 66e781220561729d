"""Pause timeouts: where their deadlines live, and firing a due one.

A pause's deadline is kept by the store, in its deadline index, written in the
same step as the checkpoint; no broker message waits for it. Celery holds an
``eta`` message unacknowledged in the worker's memory until it is due: Redis
then delivers it again on every ``visibility_timeout``, and RabbitMQ closes the
channel once it has been unacknowledged for ``consumer_timeout`` (30 minutes by
default), which stops the worker. Instead:

* the process that saves a pause arms its in-process timer
  (:mod:`._timer`) for the deadline, and fires it there, to the millisecond;
* every worker's recovery pass fires deadlines that have passed and arms the
  worker's timer for the store's earliest deadline, whoever paused it: a run
  paused by a process that is gone (a worker restarted, a pool process
  recycled) fires at that deadline if it is the earliest known, and otherwise by
  the next pass, within ``checkpoint_recovery_interval``.

Firing a timeout is a resume request like a person's, recorded by the same
compare-and-set and run through the same claim, so of a person's resume and
the timeout exactly one happens, however many timers and passes fire it.

``celery_checkpoint.timeout``, the timer task earlier versions sent with an
``eta``, stays registered for the messages still in brokers: a worker
acknowledges one on arrival instead of holding it, and one that is due fires
its run's timeout only if it is still due and unanswered.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery import Celery
from kombu.utils.imports import symbol_by_name
from pydantic import JsonValue

from ._bound import Bound
from ._client import send, store_resuming
from ._events import log_event
from ._timer import DeadlineTimer
from .exceptions import (
    AlreadyResumed,
    CheckpointNotFound,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from .model import Owner, RunRecord, utcnow

__all__ = ["TIMER_TASK", "Timeouts", "register_timer_task", "timer_strategy"]

logger = logging.getLogger("celery_checkpoint")

#: Name of the timer task earlier versions sent with an ``eta`` at each deadline.
TIMER_TASK = "celery_checkpoint.timeout"


class Timeouts:
    """Arming and firing the pause timeouts of one bound app."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound
        self._timer = DeadlineTimer(self.fire, self.fire_due, self._earliest)

    def arm(self, run: RunRecord) -> None:
        """Fire ``run``'s timeout at its deadline from this process (a pause saved here)."""
        if run.expires_at is not None:
            self._timer.arm(run.run_id, run.pause_seq, run.expires_at)

    def start(self) -> None:
        """Follow the store's deadlines from this process (a worker's main process):
        each recovery pass, then each sweep, arms the timer for the earliest one."""
        self._timer.follow(None)

    def stop(self) -> None:
        """Stop this process's timer (the worker is shutting down)."""
        self._timer.stop()

    def refresh(self) -> None:
        """Arm the timer for the store's earliest deadline, if this process follows them."""
        if self._timer.following:
            self._timer.follow(self._earliest())

    def fire_due(self, now: datetime | None = None) -> int:
        """Fire every pause whose deadline passed (by the store's clock, or ``now``);
        returns how many this call fired. One run's trouble is logged, not raised."""
        fired = 0
        for run_id in self.bound.store.due_timeouts(now):
            try:
                fired += self.fire(run_id)
            except Exception as exc:
                logger.warning("run %s: could not fire its timeout: %s", run_id, exc)
        return fired

    def _earliest(self) -> datetime | None:
        return self.bound.store.next_deadline()

    def fire(self, run_id: str, pause_seq: int | None = None) -> bool:
        """Fire the pause's timeout if it is due; True if this call fired it.

        Firing records a timed-out resume request with the same compare-and-set
        as a person's resume, then sends the run's message, which claims like
        every resume. Nothing happens (False) when the run is gone, at another
        pause than ``pause_seq``, not due yet, in flight, already answered by a
        resume request, or already timed out.
        """
        store = self.bound.store
        run = store.load(run_id)
        if run is None or run.expires_at is None:
            return False
        if pause_seq is not None and run.pause_seq != pause_seq:
            return False
        if run.expires_at > utcnow():
            return False
        pending = run.current_resume
        if pending is not None and (pending.timed_out or pending.status == "pending"):
            # Fired already, or a person's resume is on its way (the recovery
            # pass re-sends a pending request whose message is lost).
            return False
        # One request id per pause: a second firer gets the recorded request
        # back instead of replacing it (even once it failed). The marker tells
        # this caller whether it recorded it, so exactly one firer sends.
        marker: dict[str, JsonValue] = {"fired_by": f"{Owner.current().node}:{uuid.uuid4().hex}"}
        try:
            request = store.request_resume(
                run_id,
                marker,
                f"timeout-{run.pause_seq}",
                pause_seq=run.pause_seq,
                timed_out=True,
                via="timeout",
            )
        except (AlreadyResumed, ResumeRejected, CheckpointNotFound, RunCancelled, PauseExpired):
            return False  # a resume won the compare-and-set, or the run moved on
        if not request.timed_out or request.input != marker:
            return False  # another firer recorded it
        log_event(
            "timed_out",
            run_id=run_id,
            task=run.task_name,
            step=run.step,
            pause_seq=run.pause_seq,
            on_timeout=run.on_timeout,
            expires_at=run.expires_at,
        )
        if pending is not None:
            store_resuming(self.bound, run, request)
        send(self.bound, run, request, kind="timeout")
        return True


_TIMED_APPS: weakref.WeakSet[Celery] = weakref.WeakSet()


def register_timer_task(app: Celery, timeouts_of: Callable[[Celery], Timeouts]) -> None:
    """Register the timer task of earlier versions (once per app), for the messages
    they left in brokers."""
    if app in _TIMED_APPS:
        return  # another Checkpoints on this app (``celery checkpoint --store``)
    _TIMED_APPS.add(app)

    @app.task(  # type: ignore[untyped-decorator]
        name=TIMER_TASK,
        bind=True,
        shared=False,
        ignore_result=True,
        Strategy=f"{__name__}:timer_strategy",
    )
    def fire_timeout(task: Any, run_id: str, pause_seq: int) -> bool:
        return timeouts_of(task.app).fire(run_id, pause_seq)


def timer_strategy(task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's own strategy for the timer task, except that a message whose ``eta``
    is still ahead is acknowledged on arrival instead of held until then.

    Holding it is what the deadline index replaced: RabbitMQ would close the
    channel after ``consumer_timeout``, Redis re-deliver it every
    ``visibility_timeout``. The deadline it stood for is in the store, which
    fires it; a message already due runs the task, which fires the timeout only
    if it is still due and unanswered.
    """
    default: Any = symbol_by_name("celery.worker.strategy:default")  # type: ignore[no-untyped-call]
    handle = default(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def on_message(message: Any, body: Any, ack: Any, *args: Any, **kw: Any) -> Any:
        eta = _eta_of(message)
        if eta is None or eta <= utcnow():
            return handle(message, body, ack, *args, **kw)
        ack(logger, connection_errors)
        logger.info(
            "timer message %s (due %s) acknowledged on arrival: pause deadlines are kept "
            "and fired by the checkpoint store",
            (getattr(message, "headers", None) or {}).get("id"),
            eta.isoformat(),
        )
        return None

    return on_message


def _eta_of(message: Any) -> datetime | None:
    """The message's ``eta`` (protocol 2 headers, or a protocol 1 body), if readable."""
    raw = (getattr(message, "headers", None) or {}).get("eta")
    if raw is None:
        payload = getattr(message, "payload", None)
        raw = payload.get("eta") if isinstance(payload, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        eta = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return eta if eta.tzinfo is not None else eta.replace(tzinfo=timezone.utc)
