"""The error tree of celery-checkpoint.

::

    CheckpointError
     ├── ImproperlyConfigured
     ├── InvalidRunId          (also ValueError)
     ├── CorruptCheckpoint
     ├── CheckpointNotFound
     ├── CheckpointExists      (a create-only save found the run already there)
     ├── LeaseLost
     ├── ResumeRejected        (bad resume input; carries the validation errors)
     ├── AlreadyResumed        (another resume request won the compare-and-set)
     ├── PauseExpired
     ├── RunCancelled
     └── StoreUnavailable      (backend I/O failure; carries the cause)

:class:`~celery_checkpoint.Pause` is deliberately *not* here: pausing is control
flow, not failure, the way Celery keeps ``Retry``/``Ignore`` apart from errors.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyResumed",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "ImproperlyConfigured",
    "InvalidRunId",
    "LeaseLost",
    "PauseExpired",
    "ResumeRejected",
    "RunCancelled",
    "StoreUnavailable",
]


class CheckpointError(Exception):
    """Root of every error this package raises.

    An error's ``args`` are its constructor's arguments and ``str()`` is its
    message, so Celery's result backends (which rebuild an exception as
    ``cls(*args)``) and pickle give back the same class with the same fields.
    """


class ImproperlyConfigured(CheckpointError):
    """A setting, store URL or option is wrong; the message names the fix."""


class InvalidRunId(CheckpointError, ValueError):
    """A run id that could escape the store or collide with its own files."""


class CorruptCheckpoint(CheckpointError):
    """A stored record for one run cannot be parsed. Other runs are unaffected."""

    def __init__(self, run_id: str, detail: str) -> None:
        super().__init__(run_id, detail)
        self.run_id = run_id
        self.detail = detail

    def __str__(self) -> str:
        return f"checkpoint {self.run_id!r} is corrupt: {self.detail}"


class CheckpointNotFound(CheckpointError):
    """No paused run has this id (never paused, completed, or cancelled and purged)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no paused run {self.run_id!r} in the checkpoint store"


class CheckpointExists(CheckpointError):
    """``save(create=True)`` found a checkpoint (paused, in flight or ended) for the run.

    Nothing was changed. The task side uses it for a run's first pause: a second
    copy of the first message (a broker redelivery while the first copy still
    ran) must not replace the checkpoint, or a resume accepted for it, with its own.
    """

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(run_id, status)
        self.run_id = run_id
        self.status = status

    def __str__(self) -> str:
        return f"run {self.run_id!r} already has a checkpoint ({self.status})"


class LeaseLost(CheckpointError):
    """A write carried a fencing token that is no longer the run's current one.

    Nothing was changed: another worker owns the run now (its lease expired and
    it was recovered), or the run was completed or cancelled meanwhile.
    """

    def __init__(self, run_id: str, detail: str) -> None:
        super().__init__(run_id, detail)
        self.run_id = run_id
        self.detail = detail

    def __str__(self) -> str:
        return f"lease on run {self.run_id!r} lost: {self.detail}"


class ResumeRejected(CheckpointError):
    """The resume input failed validation against the pause's ``expects``.

    ``errors`` holds pydantic's structured errors; the run stays paused.
    """

    def __init__(self, run_id: str, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(run_id, message, errors)
        self.run_id = run_id
        self.message = message
        self.errors: list[Any] = list(errors or [])

    def __str__(self) -> str:
        return f"resume of run {self.run_id!r} rejected: {self.message}"


class AlreadyResumed(CheckpointError):
    """Another resume request (a different ``request_id``) is pending, or already
    ran the run to completion (``completed``)."""

    def __init__(
        self, run_id: str, pending_request_id: str, completed: bool = False, key: bool = False
    ) -> None:
        super().__init__(run_id, pending_request_id, completed, key)
        #: the run, or with ``key`` the business key an early answer is kept for
        self.run_id = run_id
        self.pending_request_id = pending_request_id
        self.completed = completed
        self.key = key

    def __str__(self) -> str:
        if self.key:
            return (
                f"key {self.run_id!r} already has an answer waiting for its pause "
                f"({self.pending_request_id!r})"
            )
        if self.completed:
            return f"run {self.run_id!r} already completed (resumed by {self.pending_request_id!r})"
        return (
            f"run {self.run_id!r} already has a pending resume request {self.pending_request_id!r}"
        )


class PauseExpired(CheckpointError):
    """The pause timed out with ``on_timeout="expire"``: the run can no longer resume."""


class RunCancelled(CheckpointError):
    """The run was cancelled: it will never resume."""


class StoreUnavailable(CheckpointError):
    """The backend failed to read or write (disk full, read-only, connection lost).

    ``cause`` is the underlying exception. For a write, nothing was changed
    unless the message says otherwise: the previous checkpoint is intact.
    """

    def __init__(self, message: str, cause: BaseException | str | None = None) -> None:
        super().__init__(message, cause)
        self.message = message
        # A rebuilt error (a result backend's JSON) carries the cause as text.
        self.cause: BaseException | None = Exception(cause) if isinstance(cause, str) else cause

    def __str__(self) -> str:
        return f"{self.message}: {self.cause}" if self.cause is not None else self.message
