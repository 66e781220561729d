"""The Celery states written for a run from outside its task: RESUMING, REVOKED, FAILURE.

Inside a task Celery hands the result backend the task's request. A resume,
a cancel, a control command or a recovery pass has none, so these writes
pass one rebuilt from the signature captured at pause time. Its
``reply_to`` and ``correlation_id`` are what ``rpc://`` routes a state by:
with them the state reaches the client that sent the task and may be
waiting in ``get()``; without them ``rpc://`` drops it (no ``reply_to``) or
refuses it outright ("RPC backend missing task request").

Nothing here reads a state back: a result backend may be ``rpc://`` (only
the sender can read) or none at all (``DisabledBackend``); the store is the
truth. :func:`readable` says when reading back is possible at all.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.app.task import Context
from celery.backends.base import DisabledBackend
from celery.backends.rpc import RPCBackend

from ._codec import decode
from .model import RunRecord

__all__ = ["backend_of", "readable", "request_of", "store_state", "try_store_state"]

logger = logging.getLogger("celery_checkpoint")


def request_of(run: RunRecord) -> Context:
    """The task request of ``run`` as a result backend needs it, from its captured signature."""
    options = run.request.signature.get("options") or {}
    return Context(
        id=run.run_id,
        task=run.task_name,
        args=decode(run.args),
        kwargs=decode(run.kwargs),
        root_id=run.request.root_id,
        parent_id=run.request.parent_id,
        group=run.request.group_id,
        group_index=options.get("group_index"),
        chord=options.get("chord"),
        # rpc:// publishes a state to reply_to (the sender's queue) under
        # correlation_id, which Celery sets to the task id when it sends.
        reply_to=options.get("reply_to") or None,
        correlation_id=run.run_id,
    )


def backend_of(app: Celery, task_name: str) -> Any:
    """The result backend of ``task_name`` (a task may name its own), else the app's."""
    task = app.tasks.get(task_name)
    backend = getattr(task, "backend", None) if task is not None else None
    return backend if backend is not None else app.backend


def store_state(
    app: Celery, run: RunRecord, result: Any, state: str, *, traceback: str | None = None
) -> Context:
    """Store ``state`` for ``run`` with its request; returns the request. May raise."""
    request = request_of(run)
    backend_of(app, run.task_name).store_result(
        run.run_id, result, state, traceback=traceback, request=request
    )
    return request


def try_store_state(app: Celery, run: RunRecord, result: Any, state: str) -> bool:
    """:func:`store_state`, logging a failure instead of raising; True if it was stored.

    For writes that must never stop what comes after them (a resume's message).
    """
    try:
        store_state(app, run, result, state)
    except Exception as exc:
        logger.warning(
            "run %s: could not store the Celery state %s (%s: %s); the run goes on, "
            "only its state in the result backend is behind",
            run.run_id,
            state,
            type(exc).__name__,
            exc,
        )
        return False
    return True


def readable(backend: Any) -> bool:
    """Whether a worker can read a run's state back from ``backend``.

    Not from ``DisabledBackend`` (it stores nothing) nor from ``rpc://``
    (states are messages to the sender's own queue; reading would consume
    this process's queue instead).
    """
    return not isinstance(backend, DisabledBackend | RPCBackend)
