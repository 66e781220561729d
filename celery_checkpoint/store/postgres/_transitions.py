"""The PostgreSQL store's transitions of one run, and its reads: each transition
one statement (see "Atomicity and contention" in the package docstring)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
)
from ...model import EndStatus, Lease, Owner, ResumeRequest, RunRecord, process_owner
from ._codec import ROW_WIDTH, decode, lease_of, resume_of, save_params, text
from ._records import Records

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["Transitions"]


class Transitions(Records):
    """Save, claim, request_resume, heartbeat, complete, release and end of one run,
    and its reads."""

    def _save_on(
        self, conn: PgConnection[Any], run: RunRecord, token: int | None, create: bool
    ) -> None:
        run_id = run.run_id
        params = save_params(run)
        if token is not None:
            params["token"] = token
            if self._one(conn, "save_token", params) is None:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            return
        if self._one(conn, "save_create" if create else "save", params) is not None:
            return
        # Refused; the row as it is now, for the message (it may have moved on since).
        found = self._one(conn, "save_refused", (run_id,))
        if create:
            status = "paused" if found is not None and found[0] == "paused" else "ended"
            raise CheckpointExists(run_id, status)
        in_flight = "?" if found is None or found[1] is None else found[1]
        raise LeaseLost(run_id, f"the run is in flight under token {in_flight}; save with it")

    def _exists(self, run_id: str) -> bool:
        return bool(self._read_one("exists", run_id, "exists", (run_id,))[0])

    def _load(self, run_id: str) -> RunRecord | None:
        row = self._read_one("load", run_id, "load", (run_id,))
        return None if row is None else decode(run_id, row)

    def _lease(self, run_id: str) -> Lease | None:
        row = self._read_one("lease", run_id, "lease", (run_id,))
        return None if row is None else lease_of(run_id, row, 0)

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        if owner is None:
            owner, owner_json = process_owner()
        else:
            owner_json = owner.model_dump_json()
        params = (owner_json, text(owner.host), lease_seconds, run_id, pause_seq)
        row = self._write_one("claim", run_id, "claim", params)
        if row is None:
            return None
        try:
            run = decode(run_id, row)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, for list or recovery to move aside).
            with contextlib.suppress(Exception):
                self._write_one("claim", run_id, "unclaim", (run_id, row[ROW_WIDTH - 4]))
            raise
        run.lease = lease_of(run_id, row, owner=owner)
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        return self._conn.write(
            "request_resume",
            run_id,
            lambda conn: self._request_resume_on(conn, run_id, request, pause_seq),
        )

    def _request_resume_on(
        self, conn: PgConnection[Any], run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        params = {
            "run_id": run_id,
            "request": request.model_dump_json(),
            "request_id": request.request_id,
            "pause_seq": pause_seq,
            "timed_out": request.timed_out,
        }
        row = self._one(conn, "request_resume", params)
        (accepted, status, seq, step, lease_token, *resume, ended_reason, expired) = row
        if accepted:
            return request.model_copy(update={"pause_seq": seq})
        if status is None:
            raise CheckpointNotFound(run_id)
        try:
            current = resume_of(*resume)
        except ValueError as exc:
            raise CorruptCheckpoint(run_id, f"resume request: {exc}") from exc
        if status != "paused":
            done = current if status == "completed" else None
            if done is not None and done.request_id == request.request_id:
                return done  # the same resume again, after it ran to completion
            ended = RunRecord.model_construct(
                run_id=run_id, status=status, step=step, ended_reason=ended_reason, resume=current
            )
            raise ended.ended_error()
        if pause_seq is not None and pause_seq != seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {seq} "
                f"(step {step!r})",
            )
        if current is not None and current.pause_seq != seq:
            current = None  # a request of an earlier pause is no answer to this one
        if current is not None and current.request_id == request.request_id:
            return current
        if expired and not request.timed_out:
            raise PauseExpired(f"run {run_id!r} expired at step {step!r}: its deadline passed")
        if current is not None:
            raise AlreadyResumed(run_id, current.request_id)
        raise AlreadyResumed(run_id, f"<none: in flight under token {lease_token}>")

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        row = self._write_one("heartbeat", run_id, "heartbeat", (lease_seconds, run_id, token))
        if row is None:
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        lease = lease_of(run_id, (token, *row), 0)
        assert lease is not None
        return lease

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        params = (result, result, run_id, token)
        if self._write_one("complete", run_id, "complete", params) is not None or token is None:
            return  # completed; or, without a token, a run not in flight stays as it is
        found = self._read_one("complete", run_id, "complete_refused", (run_id,))
        if found is None:
            return
        status, last, ended_by, lease_token = found
        if status != "paused":
            if status == "completed" and last == token:
                return  # this holder completed it: complete() is idempotent
            if last >= token:
                raise LeaseLost(run_id, f"the run was {status}")
            return
        if lease_token is None:
            if last == token and ended_by == "repause":
                return  # re-paused by this very holder: the fresh pause stays
            if last >= token:
                raise LeaseLost(run_id, f"token {token} ended by {ended_by or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _mark_delivered(self, run_id: str) -> None:
        """The run's result was delivered: it leaves the undelivered index. Idempotent."""
        self._conn.write(
            "mark_delivered",
            run_id,
            lambda conn: conn.execute(self._q["mark_delivered"], (run_id,)),
        )

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        if self._write_one("release", run_id, "release", (text(error), run_id, token)) is None:
            raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        row = self._write_one("end", run_id, "end", (status, text(reason), run_id, token))
        if row is None:
            if token is not None and self._read_one("end", run_id, "is_live", (run_id,))[0]:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            return None
        try:
            return decode(run_id, row)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def _ended(self, run_id: str) -> RunRecord | None:
        row = self._read_one("ended", run_id, "ended", (run_id,))
        return None if row is None else decode(run_id, row)
