"""Delivering a completed run's value when the worker that completed it died.

The store records a completion before Celery stores SUCCESS and sends the rest
of the chain: a worker killed in between would leave the store "completed" and
the result backend PAUSED for ever. So the completion keeps the body's value
(kombu's JSON of it) and puts the run in the store's undelivered index; once
Celery has stored the result in the same process (``task_postrun``), the run
leaves the index. A recovery pass takes runs left undelivered for
``checkpoint_resend_after`` seconds: a result backend that already shows
SUCCESS only clears the index; otherwise the run's message is sent again as a
*delivery*, which a worker answers by returning the kept value, so Celery
stores it and the chain goes on exactly as if the first worker had lived.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery import states
from celery.signals import task_postrun

from ._bound import Bound
from ._client import send
from ._codec import decode, encode
from ._results import readable
from .model import RunRecord

__all__ = ["DELIVER", "deliver_due", "encode_result", "kept_value", "track"]

logger = logging.getLogger("celery_checkpoint")

#: The header ``kind`` of a message that delivers a completed run's kept value.
DELIVER = "deliver"

#: Runs completed in this process whose SUCCESS Celery has not stored yet:
#: task id -> the bound app whose store is told once it has.
_PENDING: dict[str, Bound] = {}
_LOCK = threading.Lock()


def encode_result(value: Any) -> str | None:
    """The body's value as kept with the completion; None when kombu's JSON cannot
    carry it (it is then delivered only by the worker that completed the run)."""
    try:
        return json.dumps(encode(value))
    except (TypeError, ValueError):
        return None


def kept_value(run: RunRecord) -> Any:
    """The value :func:`encode_result` kept on a completed run's tombstone."""
    return decode(json.loads(run.result or "null"))


def track(bound: Bound, run_id: str) -> None:
    """Tell the store once Celery has stored this run's result in this process."""
    with _LOCK:
        _PENDING[run_id] = bound


def _stored(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    if task_id is None:
        return
    with _LOCK:
        bound = _PENDING.pop(task_id, None)
    if bound is None or state != states.SUCCESS:
        return
    try:
        bound.store.mark_delivered(task_id)
    except Exception as exc:  # a recovery pass finds the run and checks again
        logger.warning("run %s: could not mark its result delivered: %s", task_id, exc)


task_postrun.connect(_stored, weak=False, dispatch_uid="celery_checkpoint.delivered")


def deliver_due(bound: Bound) -> int:
    """Re-send, as deliveries, completed runs whose value never reached Celery."""
    sent = 0
    store, backend = bound.store, bound.app.backend
    for run_id in store.due_deliveries(bound.config.resend_after):
        try:
            ended = store.ended(run_id)
            if ended is None or ended.status != "completed" or ended.result is None:
                store.mark_delivered(run_id)
                continue
            if readable(backend):
                meta = backend.get_task_meta(run_id, cache=False)
                if meta.get("status") == states.SUCCESS:
                    store.mark_delivered(run_id)
                    continue
            send(bound, ended, ended.resume, kind=DELIVER)
            sent += 1
        except Exception as exc:  # one run's trouble must not stop the pass
            logger.warning("run %s: could not deliver its result: %s", run_id, exc)
    return sent
