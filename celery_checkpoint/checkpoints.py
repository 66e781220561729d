"""Pause a Celery task in the middle and resume it exactly once.

A task body raises :class:`~celery_checkpoint.Pause`; the run's state is saved
as a checkpoint, the Celery state becomes ``PAUSED`` and the worker slot is
freed. Later, :meth:`Checkpoints.resume` records the input and re-sends the
task with its original id and canvas, so ``AsyncResult(id).get()`` and the rest
of a chain receive the resumed run's value::

    from datetime import timedelta
    from pydantic import BaseModel
    from celery import Celery
    from celery_checkpoint import Checkpoints, Pause

    app = Celery("shop", broker="redis://localhost:6379/0", backend="redis://localhost:6379/1")
    checkpoints = Checkpoints(app)                # the store: checkpoint_store, or the default

    class Approval(BaseModel):
        approved: bool

    @checkpoints.task(bind=True)
    def ship(self, order_id):
        run = checkpoints.current()
        if not run.resumed:
            reserve_stock(order_id)
            raise Pause("await_approval", state={"reserved": True}, expects=Approval,
                        timeout=timedelta(days=2))
        return "shipped" if run.resume_input.approved else "cancelled"

    res = ship.delay(42)                          # res.state == "PAUSED" once it pauses
    checkpoints.resume(res.id, {"approved": True})
    res.get()                                     # "shipped"

The body runs again from its top on resume: code before the pause point must
look at ``run.resumed`` / ``run.state`` to skip work already done.

``Checkpoints`` is the facade: it holds the configuration and the store, and
delegates to the parts below it — the worker-side state machine
(:mod:`._execution`, :mod:`._pausing`), the answering side (:mod:`._client`),
pause timeouts (:mod:`._timeouts`) and recovery (:mod:`.recovery`). Creating
it adds the :class:`~celery_checkpoint.bootstep.CheckpointRecovery` worker
bootstep and the worker's ``--checkpoint-store`` option.

Timeouts, cancelling, recovery and the guarantees under faults are described
in the README; signals and log lines in :mod:`celery_checkpoint.signals`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import click
from celery import Celery
from celery.result import AsyncResult

from ._client import Client, send
from ._execution import Executor
from ._links import resume_link
from ._pausing import Pausing
from ._timeouts import Timeouts, register_timer_task
from .config import CheckpointConfig
from .exceptions import PauseExpired
from .model import ResumeRequest, RunRecord, Via
from .pause import Run
from .recovery import RecoveryReport, recover
from .store import CheckpointStore, Order, RunInfo

__all__ = ["BOOTSTEP", "Checkpoints"]

#: The recovery bootstep, by name: the facade adds it without importing it.
BOOTSTEP = "celery_checkpoint.bootstep:CheckpointRecovery"

_REGISTRY: weakref.WeakKeyDictionary[Celery, Checkpoints] = weakref.WeakKeyDictionary()


class Checkpoints:
    """Bind a Celery app to a checkpoint store.

    ``store`` is a URL (``sqlite:///...``, ``file:///dir``, ``redis://host:port/db``),
    a directory, or a store object; without it ``app.conf.checkpoint_store`` is
    used. The worker's ``--checkpoint-store`` option overrides both, as a
    command line overrides the code it runs.
    """

    def __init__(self, app: Celery, store: str | CheckpointStore | None = None) -> None:
        self.app = app
        self._store_arg = store
        self._store: CheckpointStore | None = store if isinstance(store, CheckpointStore) else None
        self._config: CheckpointConfig | None = None
        self._task_events: bool | None = None
        self._lock = threading.Lock()
        self._timeouts = Timeouts(self)
        self._client = Client(self, self._timeouts.fire)
        self._executor = Executor(self, Pausing(self, self._timeouts))
        _REGISTRY[app] = self
        _install_worker_hooks(app)
        register_timer_task(app, lambda timed: Checkpoints.for_app(timed)._timeouts)

    @classmethod
    def for_app(cls, app: Celery) -> Checkpoints:
        """The app's ``Checkpoints``, created from ``app.conf`` if there is none yet."""
        found = _REGISTRY.get(app)
        return found if found is not None else cls(app)

    @classmethod
    def find(cls, app: Celery) -> Checkpoints | None:
        """The app's ``Checkpoints``, or None if nobody bound one to it."""
        return _REGISTRY.get(app)

    # -- configuration and store ---------------------------------------------

    @property
    def config(self) -> CheckpointConfig:
        """The ``checkpoint_*`` settings, read and checked once."""
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
                    self._store = CheckpointStore.open(
                        config.store, lease_seconds=config.lease_seconds
                    )
        return self._store

    @property
    def task_events(self) -> bool:
        """Whether this worker sends task events (``-E``, ``worker_send_task_events``).

        The worker's bootstep records what the worker was started with before
        its pool forks; elsewhere it is ``worker_send_task_events``. Paused
        and resumed runs then send ``task-paused`` and ``task-resumed``.
        """
        if self._task_events is not None:
            return self._task_events
        return bool(self.app.conf.worker_send_task_events)

    @task_events.setter
    def task_events(self, enabled: bool) -> None:
        self._task_events = bool(enabled)

    # -- the task side ----------------------------------------------------------

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
            body = self._executor.wrap(fun, bind=bool(opts.get("bind")))
            return self.app.task(**opts)(body)

        if len(args) == 1 and callable(args[0]) and not options:
            return decorate(args[0])
        if args:
            raise TypeError("checkpoints.task() takes the body or keyword options only")
        return decorate

    def current(self) -> Run:
        """The run of the body executing in this thread; ``RuntimeError`` outside one."""
        return self._executor.current()

    # -- the answering side -----------------------------------------------------

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

        ``actor`` (who answered: a user name, an e-mail, a service) and ``via``
        (``"code"``, ``"cli"``, ``"api"``, ``"inbox"``, ``"link"``, ``"webhook"``)
        are recorded on the request.
        """
        return self._client.resume(
            run_id, input, request_id=request_id, pause_seq=pause_seq, actor=actor, via=via
        )

    def resume_key(
        self,
        key: str,
        input: Any = None,
        *,
        request_id: str | None = None,
        actor: str | None = None,
        via: Via = "code",
    ) -> AsyncResult | None:
        """Answer whichever run waits on the business ``key``; see ``Pause(key=...)``.

        A run paused with the key is resumed exactly as :meth:`resume` would
        (validation, the same exactly-once rules); its ``AsyncResult`` is
        returned. No run holds the key yet (the answer came first): the answer
        is kept for ``checkpoint_early_answer_ttl`` seconds and None returned;
        the pause that names the key takes it and the body resumes at once.
        Use the event's own id (a webhook delivery id) as ``request_id``: a
        provider delivering it twice makes one answer. Per key one answer is
        kept; another ``request_id`` raises ``AlreadyResumed``.
        """
        return self._client.resume_key(key, input, request_id=request_id, actor=actor, via=via)

    def cancel(self, run_id: str, reason: str | None = None) -> RunRecord:
        """Cancel a paused or in-flight run for good; its Celery state becomes REVOKED.

        Durable: the store records the run as cancelled, so no later resume,
        timeout or recovery runs it, and ``resume()`` raises ``RunCancelled``.
        An in-flight owner is fenced, not waited for: its next heartbeat or
        final write raises ``LeaseLost`` and whatever its body ends with is
        dropped. Cancelling a cancelled run again returns its record;
        a completed, expired or failed one raises what answering it would
        (``AlreadyResumed`` / ``PauseExpired`` / ``RunCancelled``), an unknown
        one ``CheckpointNotFound``. Returns the ended record.
        """
        return self._client.cancel(run_id, reason)

    def resume_link(
        self,
        run_id: str,
        input: Any = None,
        *,
        expires_in: timedelta | float | None = None,
        actor: str | None = None,
    ) -> str:
        """A signed one-time link that answers the run's current pause, for e-mail or chat.

        Opening the link (GET) shows the run and a confirm button, or the form
        drawn from ``expects`` when no ``input`` is preset; only its POST
        answers (``via="link"``, ``actor`` recorded). The link is bound to this
        pause (``pause_seq``) and to ``input``, which is validated now
        (``ResumeRejected``); it expires after ``expires_in`` (default 7 days)
        and never after the pause's deadline. Its nonce is the request id: a
        second click is the same answer. Needs ``checkpoint_web_secret_keys``
        and ``checkpoint_web_base_url`` (``ImproperlyConfigured`` otherwise);
        unknown or ended runs raise as ``resume`` does.
        """
        return resume_link(self, run_id, input, expires_in=expires_in, actor=actor)

    def runs(
        self,
        *,
        task: str | None = None,
        step: str | None = None,
        older_than: float | None = None,
        order: Order | None = None,
        after: tuple[str, str] | None = None,
    ) -> Iterator[RunInfo]:
        """Paused and in-flight runs (see :meth:`CheckpointStore.list`)."""
        return self.store.list(
            task=task, step=step, older_than=older_than, order=order, after=after
        )

    def send(self, run: RunRecord, request: ResumeRequest | None, kind: str = "resume") -> None:
        """(Re-)send the run's task message with its original id and canvas."""
        send(self, run, request, kind)

    # -- operations ---------------------------------------------------------------

    def fire_timeout(self, run_id: str, pause_seq: int | None = None) -> bool:
        """Fire the pause's timeout if it is due; True if this call fired it.

        Nothing happens (False) when the run is gone, at another pause than
        ``pause_seq``, not due yet, in flight, already answered, or already timed out.
        """
        return self._timeouts.fire(run_id, pause_seq)

    def recover(self) -> RecoveryReport:
        """One recovery pass (see :mod:`celery_checkpoint.recovery`)."""
        return recover(self, self._timeouts)

    def start_timer(self) -> None:
        """Keep this process's timer armed for the store's earliest deadline, read
        by each recovery pass (the worker bootstep calls it before its first pass)."""
        self._timeouts.start()

    def stop_timer(self) -> None:
        """Stop this process's deadline timer (the worker bootstep, at shutdown)."""
        self._timeouts.stop()


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple | set) else (value,)


def _install_worker_hooks(app: Celery) -> None:
    """Add the recovery bootstep and the ``--checkpoint-store`` worker option to ``app``."""
    app.steps["worker"].add(BOOTSTEP)
    options = app.user_options["worker"]
    if not any(getattr(opt, "name", None) == "checkpoint_store" for opt in options):
        options.add(
            click.Option(
                ["--checkpoint-store"],
                default=None,
                help="Checkpoint store URL or directory (overrides checkpoint_store).",
            )
        )
