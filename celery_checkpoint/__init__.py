"""Pause a Celery task mid-body and resume it exactly once from a crash-safe checkpoint."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoints import Checkpoints
from .exceptions import (
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
from .model import Lease, Owner, PausedWorkflow, ResumeRequest, RunRecord
from .pause import PAUSED, RESUMING, Pause, Run
from .store import CheckpointStore, RunInfo, StoreStats

try:
    __version__ = version("celery-checkpoint")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "PAUSED",
    "RESUMING",
    "AlreadyResumed",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointNotFound",
    "CheckpointStore",
    "Checkpoints",
    "CorruptCheckpoint",
    "ImproperlyConfigured",
    "InvalidRunId",
    "Lease",
    "LeaseLost",
    "Owner",
    "Pause",
    "PauseExpired",
    "PausedWorkflow",
    "ResumeRejected",
    "ResumeRequest",
    "Run",
    "RunCancelled",
    "RunInfo",
    "RunRecord",
    "StoreStats",
    "StoreUnavailable",
    "__version__",
]
