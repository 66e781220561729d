"""Checkpoint stores, chosen by URL scheme from one alias table.

``base`` holds the contract and the table; each backend is a package of its
own, imported only when its scheme is opened (a missing driver names the extra
to install).
"""

from __future__ import annotations

import os
from typing import Any

from .base import (
    BACKENDS,
    DEFAULT_LEASE_SECONDS,
    CheckpointStore,
    GroupCounts,
    Order,
    RunFilter,
    RunInfo,
    StoreStats,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_LEASE_SECONDS",
    "CheckpointStore",
    "GroupCounts",
    "Order",
    "RunFilter",
    "RunInfo",
    "StoreStats",
    "open_store",
]


def open_store(target: str | os.PathLike[str] | CheckpointStore, **options: Any) -> CheckpointStore:
    """See :meth:`CheckpointStore.open`."""
    return CheckpointStore.open(target, **options)
