"""One mapping from errors to HTTP statuses, and the one shape an error body has.

Every JSON error is ``{"error": {"code": ..., "message": ..., "details": [...]}}``;
``details`` holds pydantic's errors (``loc``, ``msg``, ``type``) when there are
any. The pages use the same statuses and messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import (
    AlreadyResumed,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImproperlyConfigured,
    InvalidRunId,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
    StoreUnavailable,
)

__all__ = ["Problem", "clean_details", "problem_for"]


@dataclass(frozen=True)
class Problem:
    """An error as the web app answers it."""

    status: int
    code: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)
    headers: Mapping[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def clean_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's errors reduced to what is JSON and safe to show: ``loc``, ``msg``, ``type``."""
    details = []
    for error in errors:
        if not isinstance(error, Mapping):
            continue
        loc = [part if isinstance(part, int) else str(part) for part in error.get("loc", ())]
        details.append(
            {"loc": loc, "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
        )
    return details


def problem_for(exc: CheckpointError) -> Problem:
    """The status and code of every error the package raises, in one place."""
    message = str(exc)
    if isinstance(exc, CheckpointNotFound | InvalidRunId):
        return Problem(404, "not_found", message)
    if isinstance(exc, ResumeRejected):
        if exc.errors:
            return Problem(422, "invalid_input", message, clean_details(exc.errors))
        # Without validation errors the resume aimed at an earlier pause of the run.
        return Problem(409, "superseded", message)
    if isinstance(exc, AlreadyResumed):
        if exc.completed:
            return Problem(410, "completed", message)
        return Problem(409, "already_answered", message)
    if isinstance(exc, PauseExpired):
        return Problem(410, "expired", message)
    if isinstance(exc, RunCancelled):
        return Problem(410, "cancelled", message)
    if isinstance(exc, CheckpointExists | LeaseLost):
        return Problem(409, "conflict", message)
    if isinstance(exc, StoreUnavailable):
        return Problem(503, "store_unavailable", message)
    if isinstance(exc, CorruptCheckpoint):
        return Problem(500, "corrupt_checkpoint", message)
    if isinstance(exc, ImproperlyConfigured):
        return Problem(500, "improperly_configured", message)
    return Problem(500, "internal_error", message)
