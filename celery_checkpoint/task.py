"""Former home of the task-side API, kept for one release: import from
:mod:`celery_checkpoint` (``Checkpoints``, ``Pause``, ``Run``, ``PAUSED``, ``RESUMING``)."""

from __future__ import annotations

from ._client import HEADER
from ._timeouts import TIMER_TASK
from .checkpoints import Checkpoints
from .pause import PAUSED, RESUMING, Pause, Run

__all__ = ["HEADER", "PAUSED", "RESUMING", "TIMER_TASK", "Checkpoints", "Pause", "Run"]
