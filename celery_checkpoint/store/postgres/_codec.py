"""How a run lives in a row of the ``runs`` table, and back.

The ``record`` column holds the RunRecord JSON as last saved. The control
columns -- status, tokens, recoveries, the end, the result and the resume
request -- are what transitions change without rewriting it, and override the
record's fields of the same names when a row is read (:func:`decode`). ``ROW``
is the list of columns every statement that returns a run selects, in the
order :func:`decode` and :func:`lease_of` read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ...exceptions import CorruptCheckpoint
from ...model import Lease, Owner, ResumeRequest, RunRecord, corrupt_detail, utcnow

__all__ = ["ROW", "ROW_WIDTH", "decode", "lease_of", "resume_of", "save_params", "text"]

ROW = (
    "record, status, last_token, lease_ended_by, recoveries, ended_reason, ended_at, result, "
    "resume, resume_seq, resume_status, resume_error, "
    "lease_token, lease_owner, lease_claimed_at, lease_expires_at"
)
ROW_WIDTH = 16
_LEASE = 12  # where the lease columns start in ROW


def text(value: str | None) -> str | None:
    """A string PostgreSQL can keep in a text column: NUL becomes U+FFFD.

    Used for the columns that copy a name out of the record (task, step, host)
    and for the free-text reasons; the record JSON itself keeps every character.
    """
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\ufffd")


def resume_of(
    raw: str | None, seq: int | None, status: str | None, error: str | None
) -> ResumeRequest | None:
    """The resume request held in the resume columns (their JSON plus what changes)."""
    if raw is None:
        return None
    request = ResumeRequest.model_validate_json(raw)
    if seq is not None:
        request.pause_seq = seq
    if status is not None:
        request.status = "failed" if status == "failed" else "pending"
    request.error = error
    return request


def decode(run_id: str, row: Sequence[Any], at: int = 0) -> RunRecord:
    """The run in ``row[at:at + ROW_WIDTH]``; ``CorruptCheckpoint`` if it does not parse."""
    body: str = row[at]
    try:
        run = RunRecord.from_json(body)
        (
            status,
            last_token,
            ended_by,
            recoveries,
            reason,
            ended_at,
            result,
            resume,
            seq,
            resume_status,
            resume_error,
        ) = row[at + 1 : at + _LEASE]
        # Assign only what differs: a model's __setattr__ is not free, and on the
        # common path (a claim of a fresh pause) nothing does.
        if run.status != status:
            run.status = status
        if run.last_token != last_token:
            run.last_token = last_token
        if run.lease_ended_by != ended_by:
            run.lease_ended_by = ended_by
        if run.recoveries != recoveries:
            run.recoveries = recoveries
        if run.ended_reason != reason:
            run.ended_reason = reason
        if run.ended_at != ended_at:
            run.ended_at = ended_at
        if run.result != result:
            run.result = result
        if resume is not None or run.resume is not None:
            run.resume = resume_of(resume, seq, resume_status, resume_error)
    except (ValidationError, ValueError) as exc:
        raise CorruptCheckpoint(run_id, corrupt_detail(exc, body)) from exc
    if run.run_id != run_id:
        raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
    return run


def lease_of(
    run_id: str, row: Sequence[Any], at: int = _LEASE, owner: Owner | None = None
) -> Lease | None:
    """The lease in ``row[at:at + 4]`` (token, owner JSON, claimed, expires), or None."""
    token = row[at]
    if token is None:
        return None
    try:
        return Lease.model_construct(
            token=token,
            owner=owner if owner is not None else Owner.model_validate_json(row[at + 1]),
            claimed_at=row[at + 2],
            expires_at=row[at + 3],
        )
    except (ValidationError, ValueError) as exc:
        raise CorruptCheckpoint(run_id, f"lease: {exc}") from exc


def save_params(run: RunRecord) -> dict[str, Any]:
    """The columns a save writes, as named parameters of the save statements."""
    resume = run.resume
    ended_at: datetime | None = run.ended_at
    if run.status != "paused" and ended_at is None:
        ended_at = utcnow()  # a record saved as ended: it needs a time to be pruned by
    return {
        "run_id": run.run_id,
        "record": run.model_dump_json(exclude={"lease"}),
        "status": run.status,
        "task_name": text(run.task_name),
        "step": text(run.step),
        "pause_seq": run.pause_seq,
        "paused_at": run.paused_at,
        "expires_at": run.expires_at,
        "on_timeout": run.on_timeout,
        "key": run.key if run.status == "paused" else None,
        "last_token": run.last_token,
        "lease_ended_by": run.lease_ended_by,
        "recoveries": run.recoveries,
        "ended_reason": text(run.ended_reason),
        "ended_at": ended_at,
        "result": run.result,
        "resume": None if resume is None else resume.model_dump_json(),
        "resume_id": None if resume is None else resume.request_id,
        "resume_seq": None if resume is None else resume.pause_seq,
        "resume_status": None if resume is None else resume.status,
        "resume_error": None if resume is None else text(resume.error),
        "pending": resume is not None and resume.status == "pending",
    }
