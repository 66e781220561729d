"""One structured log line and one signal per run transition, and the task events.

The lines go through Celery's task logger (``celery_checkpoint.runs``, a child
of ``celery.task``), so a worker prints them with its task format and an
operator can grep or ship them: ``checkpoint.<event> key=value ...``. Values
holding spaces, quotes or ``=`` are JSON-quoted; ``None`` values are left out.

When the worker sends task events (``-E``), a pause also sends ``task-paused``
and a resumed body ``task-resumed``: Celery's event state (Flower, ``celery
events``) turns an event type it does not know into the state of that name,
so a paused run shows ``PAUSED`` instead of the ``STARTED`` of its execution.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from celery.utils.dispatch import Signal
from celery.utils.log import get_task_logger

from .model import RunRecord

__all__ = ["announce", "kv", "log_event", "send_task_event", "transitions"]

#: The logger every transition line goes to.
transitions = get_task_logger("celery_checkpoint.runs")

logger = logging.getLogger("celery_checkpoint")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if not text or any(c in text for c in ' "=\\\n\r\t') or not text.isprintable():
        return json.dumps(text)
    return text


def kv(**fields: Any) -> str:
    """``key=value`` pairs in the given order, ``None`` values left out."""
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Write ``checkpoint.<event> key=value ...`` to the transitions logger."""
    if transitions.isEnabledFor(level):
        transitions.log(level, "checkpoint.%s %s", event, kv(**fields))


def announce(
    event: str,
    signal: Signal,
    sender: Any,
    run: RunRecord,
    *,
    level: int = logging.INFO,
    log: dict[str, Any] | None = None,
    **arguments: Any,
) -> None:
    """Log the transition of ``run`` and send ``signal``; a failing receiver is only logged."""
    fields: dict[str, Any] = {
        "run_id": run.run_id,
        "task": run.task_name,
        "step": run.step,
        "pause_seq": run.pause_seq,
    }
    fields.update(log or {})
    log_event(event, level, **fields)
    signal.send(sender=sender, run=run, step=run.step, **arguments)


def send_task_event(task: Any, type_: str, **fields: Any) -> None:
    """Send the monitoring event ``type_`` for ``task``'s request; a failure is only logged.

    Never retried: a monitor missing one event is better than a pause or a
    resume held up by a broker hiccup. A task with ``send_events = False``
    sends none, as Celery's own events.
    """
    if not getattr(task, "send_events", True):
        return
    try:
        task.send_event(type_, retry=False, **fields)
    except Exception as exc:
        logger.warning("could not send the %s event of task %s: %r", type_, task.request.id, exc)
