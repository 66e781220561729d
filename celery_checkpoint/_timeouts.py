"""Pause timeouts: the timer message at the deadline, and firing a due timeout.

Firing a timeout is a resume request like a person's, recorded by the same
compare-and-set and run through the same claim, so of a person's resume and
the timeout exactly one happens. The timer message is a separate task
(``celery_checkpoint.timeout``), not the run's own message: a stale timer then
never shows up under the run's task id. Losing it is fine: every worker's
recovery pass fires due deadlines too.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from pydantic import JsonValue

from ._bound import Bound
from ._client import send, store_resuming
from ._events import log_event
from .exceptions import (
    AlreadyResumed,
    CheckpointNotFound,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from .model import Owner, RunRecord, utcnow

__all__ = ["TIMER_TASK", "Timeouts", "register_timer_task"]

logger = logging.getLogger("celery_checkpoint")

#: Name of the internal task that fires a pause's timeout at its deadline.
TIMER_TASK = "celery_checkpoint.timeout"


class Timeouts:
    """Arming and firing the pause timeouts of one bound app."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound

    def arm(self, run: RunRecord) -> None:
        """Send the timer message that fires ``run``'s timeout at its deadline.

        It goes to the run's queue. A failure to send is logged: the recovery
        pass fires the timeout once it is due.
        """
        if run.expires_at is None:
            return
        options = run.request.signature.get("options") or {}
        routing = {
            key: options[key]
            for key in ("queue", "exchange", "routing_key", "priority")
            if options.get(key) not in (None, "")
        }
        try:
            self.bound.app.send_task(
                TIMER_TASK,
                args=(run.run_id, run.pause_seq),
                eta=run.expires_at,
                ignore_result=True,
                add_to_parent=False,
                **routing,
            )
        except Exception as exc:
            logger.warning(
                "run %s: could not send the timeout timer (%s); the recovery pass fires the "
                "timeout once it is due",
                run.run_id,
                exc,
            )

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
    """Register the internal task that fires a pause's timeout (once per app)."""
    if app in _TIMED_APPS:
        return  # another Checkpoints on this app (``celery checkpoint --store``)
    _TIMED_APPS.add(app)

    @app.task(name=TIMER_TASK, bind=True, shared=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def fire_timeout(task: Any, run_id: str, pause_seq: int) -> bool:
        return timeouts_of(task.app).fire(run_id, pause_seq)
