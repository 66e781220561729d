"""The statements of the SQLite store's hot transitions, and the row a save writes.

A transition that one statement can decide is that one statement, run as its
own transaction: its ``WHERE`` is the compare-and-set, and SQLite takes the
write lock before the statement reads, so nothing can come in between.
When the statement changes nothing, the store finds out why with a read (or
redoes the decision in a ``BEGIN IMMEDIATE`` transaction where the answer
matters). One statement instead of four (begin, read, write, commit) is most
of the store's cost per transition once the fsync is paid.
"""

from __future__ import annotations

from typing import Any

from ...model import ResumeRequest, RunRecord
from ._codec import RUN_COLUMNS, us

__all__ = [
    "CLAIM",
    "COMPLETE",
    "CREATE",
    "INSERT",
    "NO_LEASE",
    "PUT",
    "REPAUSE",
    "SAVE",
    "WRITTEN",
    "row_values",
]

NO_LEASE = (
    "lease_token = NULL, lease_owner = NULL, lease_host = NULL, lease_claimed = NULL, "
    "lease_expires = NULL"
)
#: What a save writes (the lease columns are cleared beside them), in this order.
WRITTEN = (
    "run_id",
    "status",
    "record",
    "task_name",
    "step",
    "pause_seq",
    "paused_at",
    "expires_at",
    "last_token",
    "lease_ended_by",
    "recoveries",
    "ended_reason",
    "ended_at",
    "resume",
    "resume_seq",
    "resume_status",
    "resume_sent_at",
    "on_timeout",
    "key",
    "result",
    "undelivered_at",
)
_LAST_TOKEN = WRITTEN.index("last_token")
# A run saved under the id of a run moved aside as corrupt goes on past its tokens.
_VALUES = ", ".join(
    "max(?, coalesce((SELECT max(c.last_token) FROM corrupt c WHERE c.run_id = ?1), 0))"
    if i == _LAST_TOKEN
    else "?"
    for i in range(len(WRITTEN))
)
_UPDATE_ALL = ", ".join(f"{c} = excluded.{c}" for c in WRITTEN[1:])

#: A row for a run that has none (create-only; ``IntegrityError`` if it has one).
INSERT = CREATE = f"INSERT INTO runs ({', '.join(WRITTEN)}) VALUES ({_VALUES})"
#: An untokened save: creates, or replaces a paused or ended row unless it is in
#: flight (then nothing changes); the tokens go on from the row's.
_GROWING = _UPDATE_ALL.replace(
    "last_token = excluded.last_token", "last_token = max(excluded.last_token, runs.last_token)"
)
SAVE = (
    f"{INSERT} ON CONFLICT (run_id) DO UPDATE SET {_GROWING}, {NO_LEASE} "
    "WHERE runs.lease_token IS NULL"
)
#: Creates or replaces whatever is there: for callers that checked inside a transaction.
PUT = f"{INSERT} ON CONFLICT (run_id) DO UPDATE SET {_UPDATE_ALL}, {NO_LEASE}"
#: A re-pause by the lease holder: the new record, and the lease ends. Parameters:
#: the written values but the run id, then the run id and the token.
REPAUSE = (
    "UPDATE runs SET "
    + ", ".join(f"{c} = ?" for c in WRITTEN[1:])
    + f", {NO_LEASE} WHERE run_id = ? AND status = 'paused' AND lease_token = ?"
)
#: PAUSED -> IN-FLIGHT; returns the record as claimed (its last_token + 1 is the token).
#: Parameters: owner JSON, host, claimed, expires, run id, pause_seq twice.
CLAIM = (
    "UPDATE runs SET lease_token = last_token + 1, lease_owner = ?, lease_host = ?, "
    "lease_claimed = ?, lease_expires = ? WHERE run_id = ? AND status = 'paused' "
    f"AND lease_token IS NULL AND (? IS NULL OR pause_seq = ?) RETURNING {RUN_COLUMNS}"
)
#: The lease holder completes: the row becomes a tombstone. Parameters: ended_at,
#: result, undelivered_at, run id, the holder's token.
COMPLETE = (
    "UPDATE runs SET status = 'completed', lease_ended_by = 'complete', "
    "last_token = lease_token, ended_at = ?, result = ?, undelivered_at = ?, "
    f"resume_sent_at = NULL, {NO_LEASE} WHERE run_id = ? AND status = 'paused' "
    "AND lease_token = ?"
)


def row_values(
    run: RunRecord,
    *,
    status: str,
    last_token: int,
    ended_by: str | None,
    resume: ResumeRequest | None,
    now: int,
    ended_at: int | None = None,
) -> tuple[Any, ...]:
    """The values of :data:`WRITTEN` for ``run``; a pending request is sent ``now``."""
    pending = resume is not None and resume.status == "pending" and status == "paused"
    if ended_at is None and run.ended_at is not None:
        ended_at = us(run.ended_at)
    return (
        run.run_id,
        status,
        run.model_dump_json(exclude={"lease", "resume"}),
        run.task_name,
        run.step,
        run.pause_seq,
        us(run.paused_at),
        None if run.expires_at is None else us(run.expires_at),
        last_token,
        ended_by,
        run.recoveries,
        run.ended_reason,
        ended_at,
        None if resume is None else resume.model_dump_json(),
        None if resume is None else resume.pause_seq,
        None if resume is None else resume.status,
        now if pending else None,
        run.on_timeout,
        run.key,
        run.result,
        None,
    )
