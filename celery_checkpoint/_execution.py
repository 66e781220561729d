"""The worker side: the state machine around one execution of a checkpointed body.

A first execution (no resume header) runs the body; if it raises ``Pause`` the
run is checkpointed (:mod:`._pausing`) and the execution ends with ``Ignore``.
A resume message claims the run (exactly one delivery wins; the others are
acknowledged and do nothing), heartbeats the lease while the body runs, then:

* the body returned: the run completes, its value goes to Celery as usual;
* it raised ``Pause`` again: the new checkpoint replaces the old one and ends
  the lease in the same step;
* it raised anything else: the run is released back to PAUSED with nothing
  lost, then Celery's own failure and retry handling runs.

A lease lost meanwhile (cancelled, or recovered elsewhere) turns any of these
into a logged ``Ignore``: the run belongs to someone else now. How the lease
ends lives in :mod:`._outcomes`; the wait for the pausing worker's PAUSED state
before a resumed body runs in :mod:`._paused_state`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

from celery import current_task
from celery.exceptions import Ignore

from . import signals
from ._bound import Bound, BoundTask
from ._client import HEADER
from ._delivery import DELIVER, kept_value, track
from ._events import announce, send_task_event
from ._heartbeat import Beat, heartbeats
from ._outcomes import Claim, Outcomes
from ._paused_state import await_paused_state
from ._pausing import IGNORE, Pausing
from .exceptions import ResumeRejected
from .model import Owner, validate_run_id
from .pause import Pause, Run, revalidate

__all__ = ["Executor"]

logger = logging.getLogger("celery_checkpoint")

_CURRENT: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "checkpoint_run", default=None
)


class Executor(Outcomes):
    """Runs checkpointed bodies for one bound app."""

    def __init__(self, bound: Bound, pausing: Pausing) -> None:
        self.bound = bound
        self._pausing = pausing

    def wrap(self, fun: Callable[..., Any], *, bind: bool) -> Callable[..., Any]:
        """The task body Celery registers: ``fun`` inside the state machine."""

        @functools.wraps(fun)
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            task = args[0] if bind else current_task._get_current_object()
            result = self._execute(task, fun, args, kwargs)
            if result is IGNORE:
                # Raised here, not where the run paused: Celery copies the code
                # positions of every frame in an Ignore's traceback (twice), formats
                # them and pickles them to the pool's parent. Six frames deep, that
                # was about a third of a first execution's time in the worker.
                raise Ignore()
            return result

        # Celery names the task and checks call arguments from this signature.
        checkpointed.__signature__ = inspect.signature(fun)  # type: ignore[attr-defined]
        return checkpointed

    @staticmethod
    def current() -> Run:
        """The run of the body executing in this thread; ``RuntimeError`` outside one."""
        run = _CURRENT.get()
        if run is None:
            raise RuntimeError("checkpoints.current() is only available inside a checkpoint task")
        return run

    def _execute(
        self,
        task: BoundTask,
        fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        request = task.request
        if request.id is None or getattr(request, "called_directly", False):
            # Called as a plain function, not through Celery: no run to checkpoint.
            token = _CURRENT.set(Run(run_id="", resumed=False))
            try:
                return fun(*args, **kwargs)
            finally:
                _CURRENT.reset(token)
        header = _header(request)
        if header is None:
            return self._first_execution(task, fun, args, kwargs)
        return self._resumed_execution(task, fun, args, kwargs, header)

    def _first_execution(
        self,
        task: BoundTask,
        fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        run_id = validate_run_id(task.request.id)
        if self.bound.store.exists(run_id):
            logger.warning(
                "run %s: ignoring a redelivered first-execution message, the run already has "
                "a checkpoint (running the body again would repeat its side effects)",
                run_id,
            )
            return IGNORE
        context = _CURRENT.set(Run(run_id=run_id, resumed=False))
        try:
            return fun(*args, **kwargs)
        except Pause as pause:
            return self._pausing.pause(task, pause, previous=None, token=None)
        finally:
            _CURRENT.reset(context)

    def _resumed_execution(
        self,
        task: BoundTask,
        fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        header: dict[str, Any],
    ) -> Any:
        run_id = validate_run_id(task.request.id)
        if header.get("kind") == DELIVER:
            return self._deliver(run_id)
        pause_seq = header.get("pause_seq")
        owner = _owner(getattr(task.request, "hostname", None))
        claim = self._claim(run_id, pause_seq if isinstance(pause_seq, int) else None, owner)
        if claim is None:
            logger.info(
                "run %s: message for pause %s not claimed (a duplicate delivery, a second "
                "resume, or the run is in flight, ended or at another pause): acknowledged, "
                "nothing run",
                run_id,
                pause_seq,
            )
            return IGNORE
        if claim.expires:
            self._expire(task, claim)
        current = self._resumed_run(claim)
        if current is None:
            return IGNORE
        announce(
            "resumed",
            signals.checkpoint_resumed,
            task,
            claim.run,
            log={
                "token": claim.token,
                "request_id": current.request_id,
                "timed_out": claim.timed_out,
                "owner": owner.node,
            },
            timed_out=claim.timed_out,
            request_id=current.request_id,
        )
        if self.bound.task_events:
            # Moves a monitor's state on from PAUSED, which Celery's own
            # task-started cannot: it ranks below a state Celery does not know.
            send_task_event(
                task,
                "task-resumed",
                run_id=run_id,
                step=claim.run.step,
                pause_seq=claim.run.pause_seq,
                request_id=current.request_id,
                timed_out=claim.timed_out,
            )
        config = self.bound.config
        beat = heartbeats.start(
            self.bound.store,
            run_id,
            claim.token,
            lease_seconds=config.lease_seconds,
            interval=config.heartbeat_interval,
        )
        context = _CURRENT.set(current)
        try:
            await_paused_state(task, claim.run)
            return self._run_body(task, fun, args, kwargs, claim, beat)
        finally:
            beat.stop()
            _CURRENT.reset(context)

    def _deliver(self, run_id: str) -> Any:
        """A delivery message: the kept value of a run completed by a worker that
        died before Celery stored it; Celery stores it now and the chain goes on."""
        ended = self.bound.store.ended(run_id)
        if ended is None or ended.status != "completed" or ended.result is None:
            return IGNORE
        logger.warning(
            "run %s: delivering the value its completion kept (the worker that completed "
            "it stopped before Celery stored it)",
            run_id,
        )
        track(self.bound, run_id)
        return kept_value(ended)

    def _resumed_run(self, claim: Claim) -> Run | None:
        """The body's view of a claimed run; an input that no longer validates releases it."""
        run, request = claim.run, claim.request
        resume_input = None
        if request is not None and not claim.timed_out:
            try:
                resume_input = revalidate(run, request.input)
            except ResumeRejected as exc:
                # No body runs on an answer that does not match: the request is
                # marked failed and the run stays paused for a valid one.
                self.bound.store.release(run.run_id, claim.token, error=str(exc))
                logger.error(
                    "run %s: its answer was refused, the run stays paused: %s", run.run_id, exc
                )
                return None
            except BaseException as exc:
                self.bound.store.release(run.run_id, claim.token, error=repr(exc))
                raise
        return Run(
            run_id=run.run_id,
            resumed=True,
            step=run.step,
            pause_seq=run.pause_seq,
            state=run.state,
            resume_input=resume_input,
            timed_out=claim.timed_out,
            request_id=None if request is None else request.request_id,
            token=claim.token,
        )

    def _run_body(
        self,
        task: BoundTask,
        fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        claim: Claim,
        beat: Beat,
    ) -> Any:
        """Run the claimed body and end its lease by what it did (see the module docstring)."""
        try:
            pause, result, handed_on = _call(fun, args, kwargs)
            beat.stop()
            if handed_on is not None:
                # The body handed the run on: ``raise Ignore()``, or ``self.replace(sig)``
                # (which sent the replacement under this task id, carrying the canvas,
                # and raised Ignore). The run ends here; its result is the replacement's.
                if not self._ended_by_ignore(claim):
                    raise Ignore() from handed_on
                raise handed_on
            if pause is not None:
                return self._pausing.pause(task, pause, previous=claim.run, token=claim.token)
            self._complete(task, claim, result)
            return result
        except Ignore:
            raise  # ours: the lease was lost, whatever the body did is dropped
        except BaseException as exc:
            # The body, or saving its pause, or completing it failed: give the
            # run back (still PAUSED, nothing lost) before Celery's own failure
            # handling, or recovery would run it again and again.
            beat.stop()
            if not self._release(claim.run.run_id, claim.token, exc):
                # Cancelled or taken over meanwhile: storing this failure
                # would overwrite the state of whoever owns the run now.
                raise Ignore() from exc
            raise

    def _claim(self, run_id: str, pause_seq: int | None, owner: Owner) -> Claim | None:
        """Claim the run for one resume message; None when another delivery owns it.

        What runs is read from the claimed record, not from the message: the
        pending request's input, or, for a timed-out request, the pause's
        ``on_timeout``.
        """
        run = self.bound.store.claim(
            run_id, owner=owner, lease_seconds=self.bound.config.lease_seconds, pause_seq=pause_seq
        )
        if run is None or run.lease is None:
            return None
        request = run.current_resume
        return Claim(run, run.lease.token, request, request is not None and request.timed_out)


def _call(
    fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Pause | None, Any, Ignore | None]:
    """Run the body: (the Pause it raised, None, None), (None, what it returned,
    None), or (None, None, the Ignore it raised). Anything else propagates."""
    try:
        return None, fun(*args, **kwargs), None
    except Pause as pause:
        return pause, None, None
    except Ignore as ignored:
        return None, None, ignored


_OWNERS: dict[tuple[int, str | None], Owner] = {}


def _owner(node: str | None) -> Owner:
    """This process's lease owner as ``node``: built once per process, as it reads /proc."""
    key = (os.getpid(), node)
    owner = _OWNERS.get(key)
    if owner is None:
        owner = _OWNERS[key] = Owner.current(node=node)
    return owner


def _header(request: Any) -> dict[str, Any] | None:
    headers = getattr(request, "headers", None) or {}
    value = headers.get(HEADER) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(request, HEADER, None)
    return value if isinstance(value, dict) else None
