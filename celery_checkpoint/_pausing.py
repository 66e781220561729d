"""Checkpointing a run that raised ``Pause``: its record, its save, its PAUSED state.

:func:`record_for` builds the record from the task's request (what a resume
re-sends: same id, arguments and canvas); :class:`Pausing` saves it (the
deadline with it, in the store's deadline index), stores the Celery state
``PAUSED`` (and the ``task-paused`` event for monitors), announces the pause
and arms this process's timer for the deadline, in that order: the timer only
after PAUSED is stored, so a short timeout's FAILURE can never land first and
be overwritten by it.
"""

from __future__ import annotations

import logging

from celery.exceptions import Ignore

from . import signals
from ._bound import Bound, BoundTask
from ._client import HEADER, encode, send
from ._events import announce, log_event, send_task_event
from ._timeouts import Timeouts
from .exceptions import CheckpointExists, LeaseLost, ResumeRejected
from .model import (
    EARLIER_ANSWERS_KEPT,
    CeleryRequest,
    ResumeRequest,
    RunRecord,
    utcnow,
    validate_run_id,
)
from .pause import PAUSED, Pause, validate_input

__all__ = ["IGNORE", "Pausing", "record_for"]

logger = logging.getLogger("celery_checkpoint")

#: What an execution returns when it must end with ``Ignore`` (it paused, or its
#: message has nothing to run); the task wrapper raises it.
IGNORE = object()


def record_for(task: BoundTask, pause: Pause, previous: RunRecord | None) -> RunRecord:
    """The checkpoint of ``task``'s run paused by ``pause`` (after ``previous``, if any)."""
    request = task.request
    now = utcnow()
    # What a resume re-sends: same id, args and canvas; no expiry (a worker
    # discards a task id it has seen expire) and no stale resume header.
    signature = dict(task.signature_from_request())
    options = dict(signature.get("options") or {})
    options.pop("expires", None)
    headers = dict(options.get("headers") or {})
    headers.pop(HEADER, None)
    options["headers"] = headers
    signature["options"] = options
    run_id = validate_run_id(request.id)
    try:
        stored = encode(signature)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"run {run_id}: the task's arguments cannot be checkpointed ({exc}): a paused "
            "task's arguments must be what kombu's JSON serializer carries (JSON, datetime, "
            "date, time, Decimal, UUID, bytes)"
        ) from exc
    return RunRecord(
        run_id=run_id,
        task_name=task.name,
        step=pause.step,
        pause_seq=(previous.pause_seq + 1) if previous is not None else 1,
        state=pause.state,
        args=list(stored.get("args") or ()),
        kwargs=dict(stored.get("kwargs") or {}),
        request=CeleryRequest(
            task_id=request.id,
            root_id=request.root_id,
            parent_id=request.parent_id,
            group_id=request.group,
            signature=stored,
        ),
        reason=pause.reason,
        expects=pause.expects_path,
        expects_schema=pause.expects_schema,
        created_at=previous.created_at if previous is not None else now,
        paused_at=now,
        expires_at=None if pause.timeout is None else now + pause.timeout,
        on_timeout=pause.on_timeout,
        last_token=previous.last_token if previous is not None else 0,
        recoveries=previous.recoveries if previous is not None else 0,
        metadata=pause.metadata,
        key=pause.key,
        earlier_answers=_earlier_answers(previous),
    )


def _earlier_answers(previous: RunRecord | None) -> list[str]:
    """The request ids that answered the run's pauses so far, the one that resumed
    ``previous`` last."""
    if previous is None:
        return []
    answers = list(previous.earlier_answers)
    if previous.resume is not None and previous.resume.pause_seq == previous.pause_seq:
        answers.append(previous.resume.request_id)
    return answers[-EARLIER_ANSWERS_KEPT:]


class Pausing:
    """Checkpoints paused runs of one bound app."""

    def __init__(self, bound: Bound, timeouts: Timeouts) -> None:
        self.bound = bound
        self._timeouts = timeouts

    def pause(
        self, task: BoundTask, pause: Pause, *, previous: RunRecord | None, token: int | None
    ) -> object:
        """Save the checkpoint and store PAUSED; returns ``IGNORE`` (the execution ends).

        A first pause (no ``previous``) only creates: a second copy of the first
        message (a redelivery while the first copy still ran) must not replace
        the checkpoint, or a resume already accepted for it, with its own. A
        re-pause saves with the lease's ``token``, which ends the lease in the
        same step: no ``complete`` after it, which could meet a resume of the
        new pause claimed meanwhile.
        """
        record = record_for(task, pause, previous)
        run_id = record.run_id
        try:
            early = self.bound.store.save(record, token=token, create=previous is None)
        except CheckpointExists as exists:
            if exists.status.startswith("key "):
                raise  # another live run holds the key: this pause cannot be taken
            logger.warning(
                "run %s: another copy of its first message paused first (%s): this copy's "
                "pause is dropped and the run goes on from that checkpoint",
                run_id,
                exists,
            )
            return IGNORE
        except LeaseLost as lost:
            logger.error("run %s: re-pause after the lease was lost, dropped: %s", run_id, lost)
            raise Ignore() from lost
        self._store_paused(task, record)
        if self.bound.task_events:
            send_task_event(
                task,
                "task-paused",
                run_id=run_id,
                step=record.step,
                pause_seq=record.pause_seq,
                reason=record.reason,
                expires_at=None if record.expires_at is None else record.expires_at.isoformat(),
            )
        announce(
            "paused",
            signals.checkpoint_paused,
            task,
            record,
            log={
                "expires_at": record.expires_at,
                "on_timeout": record.on_timeout if record.expires_at is not None else None,
                "reason": pause.reason,
            },
            reason=pause.reason,
            expires_at=record.expires_at,
        )
        self._timeouts.arm(record)
        if early is not None:
            self._answered_early(record, early)
        # Not raised here: the wrapper raises Ignore outside any ``except`` block,
        # so Celery finds neither this Pause as its context nor these frames.
        return IGNORE

    def _answered_early(self, record: RunRecord, early: ResumeRequest) -> None:
        """The save took an answer kept for the pause's key: resume the run at once.

        The answer could not be checked against ``expects`` when it came (no
        pause named the key yet); it is checked now. One that does not match is
        marked failed on the run, which stays paused for a valid answer.
        """
        store, run_id = self.bound.store, record.run_id
        try:
            validate_input(record, early.input)
        except ResumeRejected as exc:
            claimed = store.claim(run_id, pause_seq=record.pause_seq)
            if claimed is not None and claimed.lease is not None:
                store.release(run_id, claimed.lease.token, error=str(exc))
            logger.error(
                "run %s: the answer kept for key %r (request %s) does not match expects; "
                "the run stays paused: %s",
                run_id,
                record.key,
                early.request_id,
                exc,
            )
            return
        log_event(
            "resume_requested",
            run_id=run_id,
            task=record.task_name,
            step=record.step,
            pause_seq=record.pause_seq,
            request_id=early.request_id,
            key=record.key,
            early=True,
            actor=early.actor,
            via=early.via,
        )
        send(self.bound, record, early)

    def _store_paused(self, task: BoundTask, record: RunRecord) -> None:
        meta = {
            "run_id": record.run_id,
            "step": record.step,
            "reason": record.reason,
            "pause_seq": record.pause_seq,
            "expires_at": None if record.expires_at is None else record.expires_at.isoformat(),
        }
        try:
            task.update_state(state=PAUSED, meta=meta)
        except Exception as exc:
            # The checkpoint is saved: the run IS paused. Failing the task now
            # would fire error callbacks for a run that will still resume.
            logger.error(
                "run %s: paused, but storing the PAUSED state failed: %r", record.run_id, exc
            )
