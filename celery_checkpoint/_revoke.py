"""Celery's revoke of a run's task id cancels the run, as ``checkpoints.cancel`` does.

``AsyncResult(id).revoke()``, ``celery control revoke``/``terminate`` and
Flower's buttons broadcast a control command that every worker's main process
handles by adding the id to a set in its memory. A paused run holds no
message, so nothing would happen to it then; its next resume would be accepted
and its message discarded as revoked, recovery would re-send it forever, and
once the worker restarted (the set is lost without ``--statedb``) the run
would complete after all. So, in the worker's main process:

* the ``revoke`` and ``terminate`` control handlers are wrapped in place:
  Celery's own handler runs first, then every id that names a run in the store
  is cancelled with a reason saying Celery's revoke did it (the store records
  it durably, REVOKED with ``RunCancelled`` is stored, ``resume()`` raises
  ``RunCancelled``);
* a ``task_revoked`` receiver backs it up: a message of a run whose id Celery
  already marked revoked (a revoke that reached the run before its first
  pause, or that this code could not act on then) cancels the run when it is
  discarded, and stores ``RunCancelled`` over the ``TaskRevokedError`` Celery
  just stored.

Every worker receives the broadcast: the first to end the run announces the
cancel, the others find it ended and only store REVOKED again. Nothing here
ever breaks the control command: its reply is Celery's, whatever happens.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from celery.signals import task_revoked
from celery.utils.functional import maybe_list
from celery.worker.control import Panel

from .checkpoints import Checkpoints
from .exceptions import CheckpointNotFound, InvalidRunId, PauseExpired, RunCancelled

__all__ = ["REASON", "cancel_revoked", "install"]

logger = logging.getLogger("celery_checkpoint")

#: The reason recorded on a run cancelled by Celery's revoke.
REASON = "revoked with Celery's revoke"

_WRAPPED = "__celery_checkpoint_wraps__"


def install() -> None:
    """Wrap the ``revoke`` and ``terminate`` control handlers and connect the
    ``task_revoked`` receiver; idempotent (one process may run several workers)."""
    for name in ("revoke", "terminate"):
        handler = Panel.data.get(name)
        if handler is None or getattr(handler, _WRAPPED, None) is not None:
            continue
        Panel.data[name] = _wrap(name, handler)
    task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_checkpoint.revoke")


def cancel_revoked(app: Celery, task_ids: Iterable[str], reason: str = REASON) -> list[str]:
    """Cancel the runs among ``task_ids``; ids that are no run are left alone.

    Returns the ids of the runs now cancelled. A run that already ended
    otherwise (completed, expired, failed) stays as it is; one that could
    not be cancelled (store unavailable) is logged.
    """
    checkpoints = Checkpoints.find(app)
    if checkpoints is None:
        return []
    cancelled = []
    for task_id in task_ids:
        try:
            if not checkpoints.store.exists(task_id):
                continue
            checkpoints.cancel(task_id, reason=reason)
        except InvalidRunId:
            continue  # a Celery task id, but never a run's
        except (CheckpointNotFound, PauseExpired, RunCancelled):
            continue  # ended otherwise before the revoke reached it
        except Exception as exc:
            logger.error(
                "run %s: revoked with Celery's revoke, but cancelling it failed (%s: %s); "
                "the revoke lives on in this worker's memory only: run "
                "'celery checkpoint cancel %s'",
                task_id,
                type(exc).__name__,
                exc,
                task_id,
            )
            continue
        cancelled.append(task_id)
    return cancelled


def _wrap(name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` (Celery's ``revoke`` or ``terminate``), then the runs among its ids cancelled."""
    signature = inspect.signature(handler)

    @functools.wraps(handler)
    def revoke_runs(state: Any, *args: Any, **kwargs: Any) -> Any:
        reply = handler(state, *args, **kwargs)
        try:
            arguments = signature.bind_partial(state, *args, **kwargs).arguments
            task_ids = [str(i) for i in maybe_list(arguments.get("task_id")) or ()]
            terminate = name == "terminate" or bool(arguments.get("terminate"))
            reason = f"{REASON} (terminate)" if terminate else REASON
            app = getattr(state, "app", None)
            if task_ids and app is not None:
                cancel_revoked(app, task_ids, reason)
        except Exception:
            logger.exception("checkpoint: could not act on the %s control command", name)
        return reply

    setattr(revoke_runs, _WRAPPED, handler)
    return revoke_runs


def _on_task_revoked(
    sender: Any = None, request: Any = None, expired: bool = False, **kwargs: Any
) -> None:
    """A discarded message of a revoked id: cancel its run (an expiry is no revoke)."""
    if expired:
        return
    try:
        task_id = getattr(request, "id", None)
        app = getattr(sender, "app", None)
        if task_id and app is not None:
            cancel_revoked(app, [str(task_id)], f"{REASON} (its message was discarded)")
    except Exception:
        logger.exception("checkpoint: could not act on a revoked task")
