"""The answering side: resume and cancel, and the Celery writes they make.

A resume validates its input against the pause's ``expects`` before anything
changes, records the request with the store's compare-and-set, then re-sends
the run's task message with its original id and canvas (:func:`send`). A
cancel ends the run in the store and stores REVOKED. Neither ever waits for a
worker, and the Celery states they write carry the run's request
(:mod:`._results`), so they reach a client waiting in ``get()`` on ``rpc://``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from celery import signature as make_signature
from celery import states
from celery.result import AsyncResult
from pydantic import ValidationError

from . import signals
from ._bound import Bound
from ._codec import decode, encode
from ._events import announce, log_event
from ._results import backend_of, store_state, try_store_state
from .exceptions import (
    AlreadyResumed,
    CheckpointError,
    CheckpointNotFound,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from .model import ResumeRequest, RunRecord, Via, utcnow, validate_key, validate_run_id
from .pause import JSON, RESUMING, validate_input

__all__ = ["HEADER", "Client", "decode", "encode", "send", "store_resuming"]

logger = logging.getLogger("celery_checkpoint")

#: Message header that marks a resume (absent on a first execution).
HEADER = "celery_checkpoint"


def send(bound: Bound, run: RunRecord, request: ResumeRequest | None, kind: str = "resume") -> None:
    """(Re-)send the run's task message with its original id and canvas."""
    app = bound.app
    if run.request.signature:
        sig = make_signature(decode(run.request.signature), app=app)
    else:
        # A record written straight to the store (no captured request): the
        # task and its arguments are all there is to send.
        sig = app.signature(run.task_name, args=decode(run.args), kwargs=decode(run.kwargs))
    headers = dict(sig.options.get("headers") or {})
    headers[HEADER] = {
        "kind": kind,
        "pause_seq": run.pause_seq,
        "request_id": None if request is None else request.request_id,
    }
    sig.options.pop("expires", None)
    sig.options["headers"] = headers
    sig.options["task_id"] = run.run_id
    # Sent from inside a task (the timeout timer) it is not that task's child.
    sig.apply_async(add_to_parent=False)


def store_resuming(bound: Bound, run: RunRecord, request: ResumeRequest) -> bool:
    """Store RESUMING over the FAILURE a failed attempt left: get() must wait again.

    Called before the message is sent, so the resumed run's own state always
    lands after it; a failure is logged and never stops the send (the run
    matters more than its state in the result backend). True if stored.
    """
    meta = {"run_id": run.run_id, "step": run.step, "request_id": request.request_id}
    return try_store_state(bound.app, run, meta, RESUMING)


class Client:
    """``resume`` and ``cancel`` of one bound app; ``fire_timeout`` fires a due pause."""

    def __init__(self, bound: Bound, fire_timeout: Callable[[str, int | None], bool]) -> None:
        self.bound = bound
        self._fire_timeout = fire_timeout

    def resume(
        self,
        run_id: str,
        input: Any = None,
        *,
        request_id: str | None = None,
        pause_seq: int | None = None,
        actor: str | None = None,
        via: Via = "code",
    ) -> AsyncResult:
        """See :meth:`celery_checkpoint.Checkpoints.resume`."""
        store, app = self.bound.store, self.bound.app
        run_id = validate_run_id(run_id)
        run = store.load(run_id)
        if run is None:
            ended = store.ended(run_id)
            if ended is None:
                raise CheckpointNotFound(run_id)
            if request_id is not None and ended.answered_pause(request_id) is not None:
                return AsyncResult(run_id, app=app)  # the same resume, already run
            raise ended.ended_error()
        if request_id is not None and run.answered_pause(request_id) is not None:
            # A webhook delivered again after the run moved on to a new pause:
            # the answer it carries was applied to the pause it was meant for.
            logger.info(
                "run %s: request %s answered an earlier pause; not an answer to pause %d",
                run_id,
                request_id,
                run.pause_seq,
            )
            return AsyncResult(run_id, app=app)
        if pause_seq is not None and pause_seq != run.pause_seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {run.pause_seq}",
            )
        request_id = request_id or uuid.uuid4().hex
        self._check_deadline(run, request_id)
        _, stored = validate_input(run, input)
        try:
            accepted = store.request_resume(
                run_id, stored, request_id, pause_seq=run.pause_seq, actor=actor, via=via
            )
        except AlreadyResumed as exc:
            raise self._explain_refusal(run_id, exc) from exc
        if accepted.status == "failed":
            # This very request already ran and failed: one resume, not two.
            # A new request id tries again.
            logger.info(
                "run %s: resume %s already ran and failed (%s); not sent again",
                run_id,
                accepted.request_id,
                accepted.error,
            )
            return AsyncResult(run_id, app=app)
        if run.resume is not None and run.resume.status == "failed":
            store_resuming(self.bound, run, accepted)  # first: SUCCESS must land after it
        send(self.bound, run, accepted)
        log_event(
            "resume_requested",
            run_id=run_id,
            task=run.task_name,
            step=run.step,
            pause_seq=run.pause_seq,
            request_id=accepted.request_id,
            actor=actor,
            via=via,
        )
        return AsyncResult(run_id, app=app)

    def resume_key(
        self,
        key: str,
        input: Any = None,
        *,
        request_id: str | None = None,
        actor: str | None = None,
        via: Via = "code",
    ) -> AsyncResult | None:
        """See :meth:`celery_checkpoint.Checkpoints.resume_key`."""
        store = self.bound.store
        key = validate_key(key)
        request_id = request_id or uuid.uuid4().hex
        run_id = store.find_key(key)
        if run_id is not None:
            try:
                return self.resume(run_id, input, request_id=request_id, actor=actor, via=via)
            except CheckpointNotFound:
                pass  # ended between the lookup and the answer: keep it for the next pause
        try:
            stored = JSON.validate_python(input)
        except ValidationError as exc:
            raise ResumeRejected(
                key, "the input is not JSON", exc.errors(include_url=False)
            ) from exc
        ttl = self.bound.config.early_answer_ttl
        run_id, accepted = store.answer_key(key, stored, request_id, ttl=ttl, actor=actor, via=via)
        if run_id is None:
            log_event(
                "answer_kept",
                key=key,
                request_id=accepted.request_id,
                ttl=ttl,
                actor=actor,
                via=via,
            )
            return None
        # A pause took the key between the lookup and the answer: the answer went
        # to it through the same compare-and-set; it is checked against expects
        # by the worker, which leaves the run paused if it does not match.
        run = store.load(run_id)
        if run is not None and accepted.status == "pending":
            send(self.bound, run, accepted)
        return AsyncResult(run_id, app=self.bound.app)

    def _check_deadline(self, run: RunRecord, request_id: str) -> None:
        """Refuse a resume of an expiring pause whose deadline has passed."""
        if run.on_timeout != "expire" or run.expires_at is None or run.expires_at > utcnow():
            return
        pending = run.current_resume
        if pending is not None and pending.request_id == request_id and not pending.timed_out:
            return  # accepted before the deadline: the same request again is that resume
        try:
            self._fire_timeout(run.run_id, run.pause_seq)
        except Exception as exc:  # the worker's recovery pass fires it anyway
            logger.warning("run %s: could not fire its due timeout: %s", run.run_id, exc)
        raise PauseExpired(
            f"run {run.run_id!r} can no longer be resumed: its pause at step {run.step!r} "
            f"timed out at {run.expires_at.isoformat()}"
        )

    def _explain_refusal(self, run_id: str, exc: AlreadyResumed) -> CheckpointError:
        """``PauseExpired`` when the request that won was the pause's expiry."""
        store = self.bound.store
        run = store.load(run_id)
        if run is None:
            ended = store.ended(run_id)
            if ended is not None and ended.status == "expired":
                return ended.ended_error()
        elif run.resume is not None and run.resume.timed_out and run.on_timeout == "expire":
            return PauseExpired(f"run {run_id!r} timed out at step {run.step!r} and is expiring")
        return exc

    def cancel(self, run_id: str, reason: str | None = None) -> RunRecord:
        """See :meth:`celery_checkpoint.Checkpoints.cancel`."""
        store = self.bound.store
        run_id = validate_run_id(run_id)
        in_flight = store.lease(run_id) is not None  # as seen just before; for reports
        ended = store.end(run_id, "cancelled", reason=reason)
        if ended is None:
            previous = store.ended(run_id)
            if previous is None:
                raise CheckpointNotFound(run_id)
            if previous.status != "cancelled":
                # Completed: AlreadyResumed; expired: PauseExpired; failed: RunCancelled.
                raise previous.ended_error()
            # Again, in case the first call failed here; the chord counted it already.
            self._store_revoked(previous, chord=False)
            return previous
        self._store_revoked(ended, chord=True)
        announce(
            "cancelled",
            signals.checkpoint_cancelled,
            self.bound.app,
            ended,
            log={"in_flight": in_flight, "reason": reason},
            reason=reason,
            in_flight=in_flight,
        )
        return ended

    def _store_revoked(self, run: RunRecord, *, chord: bool) -> None:
        """REVOKED with ``RunCancelled`` in the result backend; a chord hears of it.

        May raise (the run is cancelled in the store already): cancelling
        again stores it again.
        """
        why = f": {run.ended_reason}" if run.ended_reason else ""
        exc = RunCancelled(f"run {run.run_id!r} cancelled{why}")
        request = store_state(self.bound.app, run, exc, states.REVOKED)
        if chord and request.chord:
            try:
                backend_of(self.bound.app, run.task_name).on_chord_part_return(
                    request, states.REVOKED, exc
                )
            except Exception as error:
                logger.error("run %s: could not tell its chord: %s", run.run_id, error)
