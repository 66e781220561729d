"""Rows of the ``runs`` table to records and back, and the store's times.

A row keeps the record JSON as saved (without its resume request and lease)
and, in columns, the fields that transitions change without rewriting it;
the columns win when a record is read. Times are integer microseconds since
the Unix epoch, UTC.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from ...exceptions import CorruptCheckpoint
from ...model import Lease, Owner, ResumeRequest, RunRecord, corrupt_detail

__all__ = [
    "LEASE_COLUMNS",
    "RUN_COLUMNS",
    "from_us",
    "lease_from",
    "now_us",
    "resume_from",
    "run_from",
    "us",
]

#: What a record is read from, in this order (see :func:`run_from`).
RUN_COLUMNS = (
    "run_id, status, record, last_token, lease_ended_by, recoveries, ended_reason, "
    "ended_at, resume, result"
)
#: The lease, in this order (see :func:`lease_from`).
LEASE_COLUMNS = "lease_token, lease_owner, lease_claimed, lease_expires"
_RUN_WIDTH = 10

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


def now_us() -> int:
    """The local clock (one machine: every process reads the same one)."""
    return time.time_ns() // 1000


def us(when: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // _US


def from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def resume_from(run_id: str, data: Any) -> ResumeRequest:
    try:
        return ResumeRequest.model_validate_json(data)
    except (ValidationError, ValueError, TypeError) as exc:
        raise CorruptCheckpoint(run_id, "resume request: " + corrupt_detail(exc, data)) from exc


def run_from(row: Any) -> RunRecord:
    """The record of a row read with :data:`RUN_COLUMNS` first; ``CorruptCheckpoint``
    if it does not parse or names another run."""
    run_id, status, record, last_token, ended_by, recoveries, reason, ended_at, resume, result = (
        row[:_RUN_WIDTH]
    )
    try:
        run = RunRecord.from_json(record)
    except (ValidationError, ValueError, TypeError) as exc:
        raise CorruptCheckpoint(run_id, corrupt_detail(exc, record or b"")) from exc
    if run.run_id != run_id:
        raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
    # The columns win over the JSON. Set straight into the fields (pydantic's
    # __setattr__ costs a tenth of a claim here): every value is ours, typed.
    run.__dict__.update(
        resume=None if resume is None else resume_from(run_id, resume),
        status=status,
        last_token=last_token,
        lease_ended_by=ended_by,
        recoveries=recoveries,
        ended_reason=reason,
        ended_at=None if ended_at is None else from_us(ended_at),
        result=result,
    )
    return run


def lease_from(
    run_id: str, token: int | None, owner: Any, claimed: Any, expires: Any
) -> Lease | None:
    """The lease of a row read with :data:`LEASE_COLUMNS`, or None when not in flight."""
    if token is None:
        return None
    try:
        return Lease.model_construct(
            token=token,
            owner=Owner.model_validate_json(owner),
            claimed_at=from_us(claimed),
            expires_at=from_us(expires),
        )
    except (ValidationError, ValueError, TypeError, OverflowError) as exc:
        raise CorruptCheckpoint(run_id, f"lease: {exc}") from exc
