"""Pause a Celery task mid-body and resume it exactly once from a crash-safe checkpoint."""

from importlib.metadata import PackageNotFoundError, version

from .exceptions import (
    AlreadyResumed,
    CheckpointError,
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
from .model import Lease, Owner, PausedWorkflow, ResumeRequest
from .store import CheckpointStore, RunInfo

try:
    __version__ = version("celery-checkpoint")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AlreadyResumed",
    "CheckpointError",
    "CheckpointNotFound",
    "CheckpointStore",
    "CorruptCheckpoint",
    "ImproperlyConfigured",
    "InvalidRunId",
    "Lease",
    "LeaseLost",
    "Owner",
    "PauseExpired",
    "PausedWorkflow",
    "ResumeRejected",
    "ResumeRequest",
    "RunCancelled",
    "RunInfo",
    "StoreUnavailable",
    "__version__",
]
