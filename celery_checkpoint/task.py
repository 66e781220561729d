"""Pause a Celery task in the middle and resume it exactly once.

A task body raises :class:`Pause`; the run's state is saved as a checkpoint,
the Celery state becomes ``PAUSED`` and the worker slot is freed. Later,
:meth:`Checkpoints.resume` records the input and re-sends the task with its
original id and canvas, so ``AsyncResult(id).get()`` and the rest of a chain
receive the resumed run's value::

    from datetime import timedelta
    from pydantic import BaseModel
    from celery import Celery, states
    from celery_checkpoint import Checkpoints, Pause

    app = Celery("shop", broker="redis://localhost:6379/0", backend="redis://localhost:6379/1")
    checkpoints = Checkpoints(app, store="/var/lib/shop/checkpoints")

    class Approval(BaseModel):
        approved: bool

    @checkpoints.task(bind=True)
    def ship(self, order_id):
        run = checkpoints.current()
        if not run.resumed:
            reserve_stock(order_id)
            raise Pause("await_approval", state={"reserved": True}, expects=Approval)
        return "shipped" if run.resume_input.approved else "cancelled"

    res = ship.delay(42)                          # res.state == "PAUSED" once it pauses
    checkpoints.resume(res.id, {"approved": True})
    res.get()                                     # "shipped"

The body runs again from its top on resume: code before the pause point must
look at ``run.resumed`` / ``run.state`` to skip work already done.

Around a resumed body the decorator claims the checkpoint (exactly one of any
number of deliveries wins; the others are acknowledged and do nothing),
heartbeats the lease while the body runs, then completes the run (the body
returned), saves it again (another ``Pause``) or releases it (an exception:
the run returns to PAUSED and Celery's own failure and retry handling runs).

Timeouts. ``Pause(..., timeout=timedelta(days=2), on_timeout="expire")`` ends
a pause nobody answered. At pause time a small timer message
(``celery_checkpoint.timeout``) is sent with ``eta`` at the deadline, and every
worker's recovery pass also fires due deadlines (an ``eta`` message is not
durable on every broker). Firing a timeout is a resume request like a
person's, recorded by the same compare-and-set and run through the same claim,
so of a person's resume and the timeout exactly one happens: a resume accepted
before the timeout fired wins; a resume after it is refused
(``PauseExpired`` with ``"expire"``, ``AlreadyResumed`` with ``"resume"``).
``"expire"`` ends the run with Celery state FAILURE carrying ``PauseExpired``
(the chain's error callbacks run); ``"resume"`` runs the body with
``run.timed_out`` true and no input. A timer for a run that was resumed,
completed, cancelled or paused again meanwhile does nothing, and never touches
the run's result.

Cancelling. ``checkpoints.cancel(run_id, reason)`` ends the run for good in
the store and sets its Celery state to REVOKED (no error callbacks, as with
Celery's own revoke). A cancelled run is never resumed, timed out or
recovered, and ``resume()`` raises ``RunCancelled``. A run that is in flight
is *fenced*, not waited for: cancel returns at once, the body keeps running to
its end (Celery cannot stop arbitrary code safely), but its lease is gone, so
whatever it does next (return, fail, pause again) is dropped with a logged
error and the state stays REVOKED. Side effects the body makes after the
cancel are the body's to guard against (check your own data, or keep the
work after the pause point idempotent).

Signals and log lines for every transition: see :mod:`celery_checkpoint.signals`.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

from celery import Celery, states
from celery.exceptions import Ignore
from celery.result import AsyncResult
from pydantic import JsonValue, TypeAdapter, ValidationError

from . import signals
from ._events import announce, log_event
from ._heartbeat import heartbeats
from .config import CheckpointConfig
from .exceptions import (
    AlreadyResumed,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    ImproperlyConfigured,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from .model import CeleryRequest, Owner, PausedWorkflow, ResumeRequest, utcnow, validate_run_id
from .store import CheckpointStore, open_store

__all__ = ["HEADER", "PAUSED", "RESUMING", "Checkpoints", "Pause", "Run"]

logger = logging.getLogger("celery_checkpoint")

#: The Celery state of a paused run.
PAUSED = "PAUSED"
#: The Celery state of a run resumed after a failed attempt, until it ends again.
RESUMING = "RESUMING"
#: Message header that marks a resume (absent on a first execution).
HEADER = "celery_checkpoint"
#: The longest pause timeout: far enough, and clear of datetime's range.
_MAX_TIMEOUT = timedelta(days=365 * 100)
#: Longest a resumed body waits for the pausing worker's PAUSED state (seconds).
_PAUSED_STATE_WAIT = 5.0
#: Name of the internal task that fires a pause's timeout at its deadline.
TIMER_TASK = "celery_checkpoint.timeout"

#: What ``_execute`` returns when the execution must end with ``Ignore`` (it
#: paused, or its message has nothing to run); the task wrapper raises it.
_IGNORE = object()

_REGISTRY: weakref.WeakKeyDictionary[Celery, Checkpoints] = weakref.WeakKeyDictionary()
_CURRENT: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "checkpoint_run", default=None
)


class Pause(Exception):
    """Raise in a checkpointed task body to pause the run at ``step``.

    ``state`` is JSON the resumed body reads back as ``run.state``. ``timeout``
    (a ``timedelta`` or seconds) ends the pause on its own: ``on_timeout="expire"``
    fails the run with ``PauseExpired``; ``"resume"`` resumes it with
    ``run.timed_out`` true and no input. ``expects`` is a pydantic model or
    type the resume input is validated against before anything changes.
    """

    def __init__(
        self,
        step: str,
        *,
        state: JsonValue = None,
        timeout: timedelta | float | None = None,
        on_timeout: Literal["expire", "resume"] = "expire",
        expects: Any = None,
        reason: str | None = None,
        metadata: dict[str, JsonValue] | None = None,
    ) -> None:
        if not isinstance(step, str) or not step:
            raise TypeError("Pause needs a step name: Pause('await_approval', ...)")
        if on_timeout not in ("expire", "resume"):
            raise ValueError(f"on_timeout must be 'expire' or 'resume', not {on_timeout!r}")
        if isinstance(timeout, int | float):
            if not math.isfinite(timeout):
                raise ValueError(f"Pause timeout must be a finite number of seconds, not {timeout}")
            timeout = timedelta(seconds=timeout)
        if timeout is not None and not timedelta(0) < timeout <= _MAX_TIMEOUT:
            raise ValueError(
                f"Pause timeout must be positive and at most {_MAX_TIMEOUT.days} days, "
                f"not {timeout}"
            )
        for name, value in (("state", state), ("metadata", metadata)):
            try:
                _JSON.validate_python(value)
            except ValidationError as exc:
                raise TypeError(
                    f"Pause {name} must be JSON (dicts, lists, str, int, float, bool, None): "
                    f"{exc.errors(include_url=False)[0]['msg']}"
                ) from None
        super().__init__(step)
        self.step = step
        self.state = state
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.expects = expects
        self.expects_path = None if expects is None else type_path(expects)
        self.reason = reason
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"Pause({self.step!r})"


@dataclass(frozen=True)
class Run:
    """What a checkpointed body knows about its run: ``checkpoints.current()``."""

    run_id: str
    resumed: bool
    step: str | None = None
    pause_seq: int = 0
    state: JsonValue = None
    resume_input: Any = None
    timed_out: bool = False
    request_id: str | None = None
    token: int | None = None


def type_path(expects: Any) -> str:
    """``module:QualName`` of a type so a resume in another process can validate against it."""
    module = getattr(expects, "__module__", None)
    qualname = getattr(expects, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname:
        raise ImproperlyConfigured(
            f"Pause(expects={expects!r}): expects must be a pydantic model or type defined at "
            "module level, so the process that resumes the run can import it"
        )
    return f"{module}:{qualname}"


#: Built once: building a TypeAdapter takes about a millisecond, and every resume
#: without ``expects`` (client and worker side) validates its input with it.
_JSON: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)


@functools.lru_cache(maxsize=256)
def _adapter(path: str) -> TypeAdapter[Any]:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(
            f"cannot import the resume input type {path!r}: {exc}. Import the module that "
            "defines it where resume() is called"
        ) from exc
    return TypeAdapter(obj)


def _validate_input(run: PausedWorkflow, value: Any) -> tuple[Any, JsonValue]:
    """Validate ``value`` against the pause's ``expects``: (python value, its JSON form)."""
    if run.expects is None:
        try:
            return value, _JSON.validate_python(value)
        except ValidationError as exc:
            raise ResumeRejected(run.run_id, "the input is not JSON", exc.errors()) from exc
    adapter = _adapter(run.expects)
    try:
        parsed = adapter.validate_python(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise ResumeRejected(
            run.run_id, f"input does not match {run.expects}: {exc.error_count()} error(s)", errors
        ) from exc
    return parsed, cast(JsonValue, adapter.dump_python(parsed, mode="json"))


def _json_safe(value: Any) -> Any:
    """Copy of a signature dict holding only JSON types (what a message carries anyway)."""
    from kombu.utils import json as kombu_json

    codec: Any = kombu_json
    return codec.loads(codec.dumps(value))


class Checkpoints:
    """Bind a Celery app to a checkpoint store.

    ``store`` is a directory, a URL (``file:///dir``, ``redis://host:port/db``)
    or a store object; without it ``app.conf.checkpoint_store`` is used. The
    worker's ``--checkpoint-store`` option overrides both, as a command line
    overrides the code it runs. Creating this object adds the
    :class:`~celery_checkpoint.bootstep.CheckpointRecovery` worker bootstep.
    """

    def __init__(self, app: Celery, store: str | CheckpointStore | None = None) -> None:
        from .bootstep import install

        self.app = app
        self._store_arg = store
        self._store: CheckpointStore | None = store if isinstance(store, CheckpointStore) else None
        self._config: CheckpointConfig | None = None
        self._lock = threading.Lock()
        _REGISTRY[app] = self
        install(app)
        _register_timer(app)

    @classmethod
    def for_app(cls, app: Celery) -> Checkpoints:
        """The app's ``Checkpoints``, created from ``app.conf`` if there is none yet."""
        found = _REGISTRY.get(app)
        return found if found is not None else cls(app)

    # -- configuration and store ---------------------------------------------

    @property
    def config(self) -> CheckpointConfig:
        if self._config is None:
            explicit = self._store_arg if isinstance(self._store_arg, str) else None
            self._config = CheckpointConfig.from_app(self.app, store=explicit)
        return self._config

    def use_store(self, target: str) -> None:
        """Use ``target`` from now on, over ``store=`` and ``app.conf`` (the worker's
        ``--checkpoint-store``); a store opened before is closed unless it was given."""
        self.reset()
        with self._lock:
            self._store_arg = target
            self._store = None

    def reset(self) -> None:
        """Forget the opened store and settings (after ``app.conf`` changed)."""
        with self._lock:
            if self._store is not None and not isinstance(self._store_arg, CheckpointStore):
                self._store.close()
                self._store = None
            self._config = None

    @property
    def store(self) -> CheckpointStore:
        """The store, opened on first use in each process."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    config = self.config
                    self._store = open_store(config.store, lease_seconds=config.lease_seconds)
        return self._store

    # -- the task decorator ----------------------------------------------------

    def task(self, *args: Any, **options: Any) -> Any:
        """Like ``app.task``, wrapping the body so it can ``raise Pause(...)``."""

        def decorate(fun: Callable[..., Any]) -> Any:
            opts = dict(options)
            base = opts.get("base")
            # An expired pause is an expected outcome, not a crash: log it without a
            # traceback, and never let autoretry_for=(Exception,) retry it.
            for name in ("throws", "dont_autoretry_for"):
                inherited = opts.get(name, getattr(base, name, ()) if base is not None else ())
                opts[name] = (*_as_tuple(inherited), PauseExpired)
            return self.app.task(**opts)(self._wrap(fun, bind=bool(opts.get("bind"))))

        if len(args) == 1 and callable(args[0]) and not options:
            return decorate(args[0])
        if args:
            raise TypeError("checkpoints.task() takes the body or keyword options only")
        return decorate

    def _wrap(self, fun: Callable[..., Any], *, bind: bool) -> Callable[..., Any]:
        from celery import current_task

        @functools.wraps(fun)
        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            task = args[0] if bind else current_task._get_current_object()
            result = self._execute(task, fun, args, kwargs)
            if result is _IGNORE:
                # Raised here, not where the run paused: Celery copies the code
                # positions of every frame in an Ignore's traceback (twice), formats
                # them and pickles them to the pool's parent. Six frames deep, that
                # was about a third of a first execution's time in the worker.
                raise Ignore()
            return result

        # Celery names the task and checks call arguments from this signature.
        checkpointed.__signature__ = inspect.signature(fun)  # type: ignore[attr-defined]
        return checkpointed

    def current(self) -> Run:
        """The run of the body executing in this thread; ``RuntimeError`` outside one."""
        run = _CURRENT.get()
        if run is None:
            raise RuntimeError("checkpoints.current() is only available inside a checkpoint task")
        return run

    def _execute(
        self, task: Any, fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        request = task.request
        run_id = request.id
        if run_id is None or getattr(request, "called_directly", False):
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
        self, task: Any, fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        run_id = validate_run_id(task.request.id)
        if self.store.exists(run_id):
            logger.warning(
                "run %s: ignoring a redelivered first-execution message, the run already has "
                "a checkpoint (running the body again would repeat its side effects)",
                run_id,
            )
            return _IGNORE
        context = _CURRENT.set(Run(run_id=run_id, resumed=False))
        try:
            return fun(*args, **kwargs)
        except Pause as pause:
            return self._pause(task, pause, previous=None, token=None)
        finally:
            _CURRENT.reset(context)

    def _resumed_execution(
        self,
        task: Any,
        fun: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        header: dict[str, Any],
    ) -> Any:
        run_id = validate_run_id(task.request.id)
        pause_seq = header.get("pause_seq")
        config = self.config
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
            return _IGNORE
        if claim.expires:
            self._expire(task, claim)
        run, request, lease_token = claim.run, claim.request, claim.token
        timed_out = claim.timed_out
        try:
            resume_input = None
            if request is not None and not timed_out:
                resume_input, _ = _validate_input(run, request.input)
        except BaseException as exc:
            self.store.release(run_id, lease_token, error=repr(exc))
            raise
        current = Run(
            run_id=run_id,
            resumed=True,
            step=run.step,
            pause_seq=run.pause_seq,
            state=run.state,
            resume_input=resume_input,
            timed_out=timed_out,
            request_id=None if request is None else request.request_id,
            token=lease_token,
        )
        announce(
            "resumed",
            signals.checkpoint_resumed,
            task,
            run,
            log={
                "token": lease_token,
                "request_id": current.request_id,
                "timed_out": timed_out,
                "owner": run.lease.owner.node if run.lease is not None else None,
            },
            timed_out=timed_out,
            request_id=current.request_id,
        )
        beat = heartbeats.start(
            self.store,
            run_id,
            lease_token,
            lease_seconds=config.lease_seconds,
            interval=config.heartbeat_interval,
        )
        context = _CURRENT.set(current)
        try:
            self._await_paused_state(task, run)
            try:
                try:
                    result = fun(*args, **kwargs)
                except Pause as pause:
                    beat.stop()
                    return self._pause(task, pause, previous=run, token=lease_token)
                beat.stop()
                self._complete(task, run, lease_token, result)
            except Ignore:
                raise
            except BaseException as exc:
                # The body, or saving its pause, or completing it failed: give
                # the run back (still PAUSED, nothing lost) before Celery's own
                # failure handling, or recovery would run it again and again.
                beat.stop()
                if not self._release(run_id, lease_token, exc):
                    # Cancelled or taken over meanwhile: storing this failure
                    # would overwrite the state of whoever owns the run now.
                    raise Ignore() from exc
                raise
            return result
        finally:
            beat.stop()
            _CURRENT.reset(context)

    def _await_paused_state(self, task: Any, run: PausedWorkflow) -> None:
        """Wait (briefly) until the pausing worker has stored PAUSED for this pause.

        It saves the checkpoint first and stores the Celery state just after; a
        resume fast enough to finish in between would have its SUCCESS
        overwritten by that late PAUSED. Normally the state is there already
        and this is one result-backend read.
        """
        deadline = time.monotonic() + _PAUSED_STATE_WAIT
        while True:
            try:
                meta = task.backend.get_task_meta(run.run_id, cache=False)
            except Exception:  # a backend that stores nothing, or is down: do not wait
                return
            state = meta.get("status")
            result = meta.get("result")
            if state == RESUMING or state in states.READY_STATES:
                return
            if (
                state == PAUSED
                and isinstance(result, dict)
                and result.get("pause_seq", run.pause_seq) >= run.pause_seq
            ):
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "run %s: resuming although the result backend does not show pause %d "
                    "(state %s): the pausing worker may have died between its two writes",
                    run.run_id,
                    run.pause_seq,
                    state,
                )
                return
            time.sleep(0.01)

    def _claim(self, run_id: str, pause_seq: int | None, owner: Owner) -> _Claim | None:
        """Claim the run for one resume message; None when another delivery owns it.

        What runs is read from the claimed record, not from the message: the
        pending request's input, or, for a timed-out request, the pause's
        ``on_timeout``.
        """
        run = self.store.claim(
            run_id, owner=owner, lease_seconds=self.config.lease_seconds, pause_seq=pause_seq
        )
        if run is None or run.lease is None:
            return None
        request = run.resume
        if request is not None and request.pause_seq != run.pause_seq:
            request = None
        return _Claim(run, run.lease.token, request, request is not None and request.timed_out)

    def _expire(self, sender: Any, claim: _Claim) -> None:
        """End a claimed run whose pause timed out with ``on_timeout="expire"``; always raises.

        ``PauseExpired`` reaches Celery, which stores FAILURE and runs the
        error callbacks; ``Ignore`` if the run was cancelled meanwhile.
        """
        run = claim.run
        try:
            ended = self.store.cancel(
                run.run_id, reason="pause timed out", status="expired", token=claim.token
            )
        except LeaseLost as lost:
            logger.error("run %s: expiry dropped, the run moved on: %s", run.run_id, lost)
            raise Ignore() from lost
        expired = ended if ended is not None else run
        announce(
            "expired",
            signals.checkpoint_expired,
            sender,
            expired,
            level=logging.WARNING,
            log={"expires_at": run.expires_at},
        )
        raise PauseExpired(
            f"run {run.run_id!r} expired: nobody resumed it at step {run.step!r} before "
            f"{run.expires_at.isoformat() if run.expires_at else 'its deadline'}"
        )

    def _release(self, run_id: str, token: int, exc: BaseException) -> bool:
        """Give the run back after the body raised; False if the lease was lost."""
        try:
            self.store.release(run_id, token, error=f"{type(exc).__name__}: {exc}")
        except LeaseLost as lost:
            logger.error(
                "run %s: body raised %r after its lease was lost (cancelled or recovered "
                "elsewhere), failure dropped: %s",
                run_id,
                exc,
                lost,
            )
            return False
        logger.info("run %s: body raised %r; run released back to PAUSED", run_id, exc)
        return True

    def _complete(self, task: Any, run: PausedWorkflow, token: int, result: Any) -> None:
        try:
            self.store.complete(run.run_id, token=token)
        except LeaseLost as lost:
            # Cancelled, or another worker owns the run now: storing this result
            # would overwrite REVOKED or race the new owner.
            logger.error(
                "run %s: finished after its lease was lost, result dropped: %s", run.run_id, lost
            )
            raise Ignore() from lost
        announce(
            "completed",
            signals.checkpoint_completed,
            task,
            run,
            log={"token": token},
            result=result,
        )

    def _pause(
        self, task: Any, pause: Pause, *, previous: PausedWorkflow | None, token: int | None
    ) -> object:
        """Save the checkpoint and store PAUSED; returns ``_IGNORE`` (the execution ends)."""
        request = task.request
        run_id = validate_run_id(request.id)
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
        record = PausedWorkflow(
            run_id=run_id,
            task_name=task.name,
            step=pause.step,
            pause_seq=(previous.pause_seq + 1) if previous is not None else 1,
            state=pause.state,
            args=list(request.args or ()),
            kwargs=dict(request.kwargs or {}),
            request=CeleryRequest(
                task_id=request.id,
                root_id=request.root_id,
                parent_id=request.parent_id,
                group_id=request.group,
                signature=_json_safe(signature),
            ),
            reason=pause.reason,
            expects=pause.expects_path,
            created_at=previous.created_at if previous is not None else now,
            paused_at=now,
            expires_at=None if pause.timeout is None else now + pause.timeout,
            on_timeout=pause.on_timeout,
            last_token=previous.last_token if previous is not None else 0,
            recoveries=previous.recoveries if previous is not None else 0,
            metadata=pause.metadata,
        )
        try:
            # A first pause only creates: a second copy of the first message (a
            # redelivery while the first copy still ran) must not replace the
            # checkpoint, or a resume already accepted for it, with its own.
            self.store.save(record, token=token, create=previous is None)
        except CheckpointExists as exists:
            logger.warning(
                "run %s: another copy of its first message paused first (%s): this copy's "
                "pause is dropped and the run goes on from that checkpoint",
                run_id,
                exists,
            )
            return _IGNORE
        except LeaseLost as lost:
            logger.error("run %s: re-pause after the lease was lost, dropped: %s", run_id, lost)
            raise Ignore() from lost
        # A save with the token ends the lease in the same step: no complete()
        # after it, which could meet a resume of the new pause claimed meanwhile.
        meta = {
            "run_id": run_id,
            "step": pause.step,
            "reason": pause.reason,
            "pause_seq": record.pause_seq,
            "expires_at": None if record.expires_at is None else record.expires_at.isoformat(),
        }
        try:
            task.update_state(state=PAUSED, meta=meta)
        except Exception as exc:
            # The checkpoint is saved: the run IS paused. Failing the task now
            # would fire error callbacks for a run that will still resume.
            logger.error("run %s: paused, but storing the PAUSED state failed: %r", run_id, exc)
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
        if record.expires_at is not None:
            # Only now that PAUSED is stored: with a short timeout the expiry's
            # FAILURE could otherwise land first and be overwritten by PAUSED.
            self._send_timer(record)
        # Not raised here: the wrapper raises Ignore outside any ``except`` block,
        # so Celery finds neither this Pause as its context nor these frames.
        return _IGNORE

    # -- timeouts --------------------------------------------------------------

    def _send_timer(self, run: PausedWorkflow) -> None:
        """Send the timer message that fires ``run``'s timeout at its deadline.

        A separate task, not the run's own message: a stale timer (the run was
        resumed, completed or paused again meanwhile) then never shows up under
        the run's task id (no STARTED over its result, no duplicate it must
        ignore). It goes to the run's queue. Losing it is fine: every worker's
        recovery pass fires due deadlines too.
        """
        assert run.expires_at is not None
        options = run.request.signature.get("options") or {}
        routing = {
            key: options[key]
            for key in ("queue", "exchange", "routing_key", "priority")
            if options.get(key) not in (None, "")
        }
        try:
            self.app.send_task(
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

    def _fire_timeout(self, run_id: str, pause_seq: int | None = None) -> bool:
        """Fire the pause's timeout if it is due; True if this call fired it.

        Firing records a timed-out resume request with the same compare-and-set
        as a person's resume, then sends the run's message, which claims like
        every resume. Nothing happens (False) when the run is gone, at another
        pause than ``pause_seq``, not due yet, in flight, already answered by a
        resume request, or already timed out.
        """
        run = self.store.load(run_id)
        if run is None or run.expires_at is None:
            return False
        if pause_seq is not None and run.pause_seq != pause_seq:
            return False
        if run.expires_at > utcnow():
            return False
        pending = run.resume
        if (
            pending is not None
            and pending.pause_seq == run.pause_seq
            and (pending.timed_out or pending.status == "pending")
        ):
            # Fired already, or a person's resume is on its way (the recovery
            # pass re-sends a pending request whose message is lost).
            return False
        # One request id per pause: a second firer gets the recorded request
        # back instead of replacing it (even once it failed). The marker tells
        # this caller whether it recorded it, so exactly one firer sends.
        marker: dict[str, JsonValue] = {"fired_by": f"{Owner.current().node}:{uuid.uuid4().hex}"}
        try:
            request = self.store.request_resume(
                run_id,
                marker,
                f"timeout-{run.pause_seq}",
                pause_seq=run.pause_seq,
                timed_out=True,
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
        if pending is not None and pending.pause_seq == run.pause_seq:
            self._show_resuming(run, request)
        self.send(run, request, kind="timeout")
        return True

    # -- resuming --------------------------------------------------------------

    def resume(
        self,
        run_id: str,
        input: Any = None,
        *,
        request_id: str | None = None,
        pause_seq: int | None = None,
    ) -> AsyncResult:
        """Resume a paused run with ``input``; returns the run's ``AsyncResult``.

        ``input`` is validated against the pause's ``expects`` before anything
        changes (``ResumeRejected``, the run stays paused). The same
        ``request_id`` twice is one resume; a different one while a request is
        pending raises ``AlreadyResumed``. Unknown runs raise
        ``CheckpointNotFound``, cancelled ones ``RunCancelled``, expired ones
        ``PauseExpired``; ``pause_seq`` guards against resuming a later pause
        than the one the caller saw.

        Past the deadline of a pause with ``on_timeout="expire"`` the resume is
        refused with ``PauseExpired`` (and the timeout is fired now if no worker
        has yet). Once the timeout has fired, a resume raises ``PauseExpired``
        (``"expire"``) or ``AlreadyResumed`` (``"resume"``).
        """
        run_id = validate_run_id(run_id)
        run = self.store.load(run_id)
        if run is None:
            ended = self.store.ended(run_id)
            if ended is not None:
                if ended.status == "expired":
                    raise PauseExpired(f"run {run_id!r} expired at step {ended.step!r}")
                if ended.status == "completed":
                    done = ended.resume
                    if (
                        done is not None
                        and request_id is not None
                        and done.request_id == request_id
                    ):
                        return AsyncResult(run_id, app=self.app)  # the same resume, already run
                    raise AlreadyResumed(
                        run_id, done.request_id if done else "<none>", completed=True
                    )
                raise RunCancelled(f"run {run_id!r} was {ended.status}: {ended.ended_reason}")
            raise CheckpointNotFound(run_id)
        if pause_seq is not None and pause_seq != run.pause_seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {run.pause_seq}",
            )
        request_id = request_id or uuid.uuid4().hex
        self._check_deadline(run, request_id)
        _, stored = _validate_input(run, input)
        try:
            accepted = self.store.request_resume(
                run_id, stored, request_id, pause_seq=run.pause_seq
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
            return AsyncResult(run_id, app=self.app)
        if run.resume is not None and run.resume.status == "failed":
            self._show_resuming(run, accepted)
        self.send(run, accepted)
        log_event(
            "resume_requested",
            run_id=run_id,
            task=run.task_name,
            step=run.step,
            pause_seq=run.pause_seq,
            request_id=accepted.request_id,
        )
        return AsyncResult(run_id, app=self.app)

    def _show_resuming(self, run: PausedWorkflow, request: ResumeRequest) -> None:
        """Store RESUMING over the FAILURE a failed attempt left: get() must wait again."""
        meta = {"run_id": run.run_id, "step": run.step, "request_id": request.request_id}
        self.app.backend.store_result(run.run_id, meta, RESUMING)

    def _check_deadline(self, run: PausedWorkflow, request_id: str) -> None:
        """Refuse a resume of an expiring pause whose deadline has passed."""
        if run.on_timeout != "expire" or run.expires_at is None or run.expires_at > utcnow():
            return
        pending = run.resume
        if (
            pending is not None
            and pending.pause_seq == run.pause_seq
            and pending.request_id == request_id
            and not pending.timed_out
        ):
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
        run = self.store.load(run_id)
        won = None if run is None else run.resume
        if run is None:
            ended = self.store.ended(run_id)
            if ended is not None and ended.status == "expired":
                return PauseExpired(f"run {run_id!r} expired at step {ended.step!r}")
        elif won is not None and won.timed_out and run.on_timeout == "expire":
            return PauseExpired(f"run {run_id!r} timed out at step {run.step!r} and is expiring")
        return exc

    def send(
        self, run: PausedWorkflow, request: ResumeRequest | None, kind: str = "resume"
    ) -> None:
        """(Re-)send the run's task message with its original id and canvas."""
        from celery import signature as make_signature

        if run.request.signature:
            sig = make_signature(dict(run.request.signature), app=self.app)
        else:
            # A record written straight to the store (no captured request): the
            # task and its arguments are all there is to send.
            sig = self.app.signature(run.task_name, args=run.args, kwargs=run.kwargs)
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

    def cancel(self, run_id: str, reason: str | None = None) -> PausedWorkflow:
        """Cancel a paused or in-flight run for good; its Celery state becomes REVOKED.

        Durable: the store records the run as cancelled, so no later resume,
        timeout or recovery runs it, and ``resume()`` raises ``RunCancelled``.
        An in-flight owner is fenced, not waited for: its next heartbeat or
        final write raises ``LeaseLost`` and whatever its body ends with is
        dropped. Cancelling a cancelled run again returns its record;
        an expired or failed one raises ``PauseExpired`` / ``RunCancelled``,
        an unknown one ``CheckpointNotFound``. Returns the ended record.
        """
        run_id = validate_run_id(run_id)
        in_flight = self.store.lease(run_id) is not None  # as seen just before; for reports
        ended = self.store.cancel(run_id, reason=reason, status="cancelled")
        if ended is None:
            previous = self.store.ended(run_id)
            if previous is None:
                raise CheckpointNotFound(run_id)
            if previous.status == "expired":
                raise PauseExpired(f"run {run_id!r} already expired at step {previous.step!r}")
            if previous.status != "cancelled":
                raise RunCancelled(f"run {run_id!r} already {previous.status}")
            # Again, in case the first call failed here; the chord counted it already.
            self._store_revoked(previous, chord=False)
            return previous
        self._store_revoked(ended, chord=True)
        announce(
            "cancelled",
            signals.checkpoint_cancelled,
            self.app,
            ended,
            log={"in_flight": in_flight, "reason": reason},
            reason=reason,
            in_flight=in_flight,
        )
        return ended

    def _store_revoked(self, run: PausedWorkflow, *, chord: bool) -> None:
        """REVOKED with ``RunCancelled`` in the result backend; a chord hears of it."""
        from celery.app.task import Context

        why = f": {run.ended_reason}" if run.ended_reason else ""
        exc = RunCancelled(f"run {run.run_id!r} cancelled{why}")
        options = run.request.signature.get("options") or {}
        request = Context(
            id=run.run_id,
            task=run.task_name,
            args=run.args,
            kwargs=run.kwargs,
            root_id=run.request.root_id,
            parent_id=run.request.parent_id,
            group=run.request.group_id,
            group_index=options.get("group_index"),
            chord=options.get("chord"),
        )
        backend = self.app.backend
        backend.store_result(run.run_id, exc, states.REVOKED, traceback=None, request=request)
        if chord and request.chord:
            try:
                backend.on_chord_part_return(request, states.REVOKED, exc)
            except Exception as error:
                logger.error("run %s: could not tell its chord: %s", run.run_id, error)

    def runs(self, **filters: Any) -> Iterator[Any]:
        """Paused and in-flight runs, as :class:`~celery_checkpoint.RunInfo`."""
        return self.store.list(**filters)


@dataclass(frozen=True)
class _Claim:
    """A resume message's won claim, and what it must do (read from the record)."""

    run: PausedWorkflow
    token: int
    request: ResumeRequest | None
    timed_out: bool

    @property
    def expires(self) -> bool:
        return self.timed_out and self.run.on_timeout == "expire"


_OWNERS: dict[tuple[int, str | None], Owner] = {}


def _owner(node: str | None) -> Owner:
    """This process's lease owner as ``node``: built once per process, as it reads /proc."""
    key = (os.getpid(), node)
    owner = _OWNERS.get(key)
    if owner is None:
        owner = _OWNERS[key] = Owner.current(node=node)
    return owner


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple | set) else (value,)


_TIMED_APPS: weakref.WeakSet[Celery] = weakref.WeakSet()


def _register_timer(app: Celery) -> None:
    """Register the internal task that fires a pause's timeout (once per app)."""
    if app in _TIMED_APPS:
        return  # another Checkpoints on this app (``celery checkpoint --store``)
    _TIMED_APPS.add(app)

    @app.task(name=TIMER_TASK, bind=True, shared=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def fire_timeout(task: Any, run_id: str, pause_seq: int) -> bool:
        return Checkpoints.for_app(task.app)._fire_timeout(run_id, pause_seq)


def _header(request: Any) -> dict[str, Any] | None:
    headers = getattr(request, "headers", None) or {}
    value = headers.get(HEADER) if isinstance(headers, dict) else None
    if value is None:
        value = getattr(request, HEADER, None)
    return value if isinstance(value, dict) else None
