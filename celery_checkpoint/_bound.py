"""What the engine's parts need of the facade, and of the task they run in.

The modules below :mod:`celery_checkpoint.checkpoints` take a :class:`Bound`
(the ``Checkpoints`` object, typed by what it offers) instead of importing the
facade, so imports flow one way. :class:`BoundTask` is the part of a Celery
task instance the execution uses.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery

from .config import CheckpointConfig
from .store import CheckpointStore

__all__ = ["Bound", "BoundTask"]


class Bound(Protocol):
    """An app bound to a checkpoint store: ``Checkpoints`` is one."""

    @property
    def app(self) -> Celery: ...

    @property
    def config(self) -> CheckpointConfig: ...

    @property
    def store(self) -> CheckpointStore: ...

    @property
    def task_events(self) -> bool: ...


class BoundTask(Protocol):
    """The Celery task instance a checkpointed body runs in (``self`` of a bound task)."""

    name: str
    app: Celery

    @property
    def request(self) -> Any: ...

    @property
    def backend(self) -> Any: ...

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kwargs: Any
    ) -> None: ...

    def signature_from_request(self, request: Any = None, *args: Any, **kwargs: Any) -> Any: ...

    def send_event(self, type_: str, retry: bool = True, **fields: Any) -> Any: ...
