"""The SQLite store's transitions of one run, and its reads: each transition one
transaction, its checks and write one compare-and-set (see "Atomicity and
durability" in the package docstring)."""

from __future__ import annotations

import sqlite3

from ...exceptions import (
    AlreadyResumed,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
)
from ...model import EndStatus, Lease, Owner, ResumeRequest, RunRecord, process_owner
from ._codec import LEASE_COLUMNS, RUN_COLUMNS, from_us, lease_from, now_us, resume_from, run_from
from ._records import Records
from ._sql import CLAIM, COMPLETE, NO_LEASE

__all__ = ["Transitions"]


class Transitions(Records):
    """Claim, request_resume, heartbeat, complete, release and end of one run, and its reads."""

    def _exists(self, run_id: str) -> bool:
        return (
            self._conn.one("exists", run_id, "SELECT 1 FROM runs WHERE run_id = ?", (run_id,))
            is not None
        )

    def _load(self, run_id: str) -> RunRecord | None:
        row = self._conn.one(
            "load",
            run_id,
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
            (run_id,),
        )
        return None if row is None else run_from(row)

    def _lease(self, run_id: str) -> Lease | None:
        row = self._conn.one(
            "lease",
            run_id,
            f"SELECT {LEASE_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
            (run_id,),
        )
        return None if row is None else lease_from(run_id, *row)

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        if owner is None:
            owner, owner_json = process_owner()
        else:
            owner_json = owner.model_dump_json()
        claimed = now_us()
        expires = claimed + round(lease_seconds * 1_000_000)
        rows, _ = self._conn.change(
            "claim",
            run_id,
            CLAIM,
            (owner_json, owner.host, claimed, expires, run_id, pause_seq, pause_seq),
            durable=self.durable_leases,
        )
        if not rows:
            return None  # unknown, ended, in flight, or at another pause
        row = rows[0]
        token = row[3] + 1
        try:
            run = run_from(row)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, corrupt, for list/recovery to move aside).
            self._conn.change(
                "claim",
                run_id,
                f"UPDATE runs SET last_token = ?, lease_ended_by = 'release', {NO_LEASE} "
                "WHERE run_id = ? AND lease_token = ?",
                (token, run_id, token),
            )
            raise
        # Built without validation: every value is ours.
        run.lease = Lease.model_construct(
            token=token, owner=owner, claimed_at=from_us(claimed), expires_at=from_us(expires)
        )
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        with self._conn.write("request_resume", run_id) as db:
            return self._resume_in(db, run_id, request, pause_seq)

    def _resume_in(
        self, db: sqlite3.Connection, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        """request_resume inside an open write transaction (answer_key shares it)."""
        row = db.execute(
            "SELECT status, pause_seq, step, resume, resume_seq, lease_token, on_timeout, "
            "expires_at FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise CheckpointNotFound(run_id)
        status, seq, step, resume, resume_seq, live, on_timeout, expires_at = row
        request_id = request.request_id
        if status != "paused":
            ended = run_from(
                db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            )
            done = ended.resume if ended.status == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise ended.ended_error()
        if pause_seq is not None and pause_seq != seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {seq} "
                f"(step {step!r})",
            )
        current = resume_from(run_id, resume) if resume is not None and resume_seq == seq else None
        if current is not None and current.request_id == request_id:
            return current
        # Past the deadline of an expiring pause only the timer's own request
        # gets in: any other answer is too late, whatever else it would meet.
        now = now_us()
        if (
            not request.timed_out
            and on_timeout == "expire"
            and expires_at is not None
            and now >= expires_at
        ):
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {step!r} at "
                f"{from_us(expires_at).isoformat()}: the answer came too late"
            )
        # In flight with no request of this pause (a timeout or a redelivery
        # claimed it): accepting would be lost when the holder completes.
        if current is not None and (current.status == "pending" or live is not None):
            raise AlreadyResumed(run_id, current.request_id)
        if live is not None:
            raise AlreadyResumed(run_id, f"<none: in flight under token {live}>")
        accepted = request.model_copy(update={"pause_seq": seq})
        db.execute(
            "UPDATE runs SET resume = ?, resume_seq = ?, resume_status = 'pending', "
            "resume_sent_at = ? WHERE run_id = ?",
            (accepted.model_dump_json(), seq, now, run_id),
        )
        return accepted

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        with self._conn.write("heartbeat", run_id, durable=self.durable_leases) as db:
            row = db.execute(
                f"SELECT {LEASE_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
                (run_id,),
            ).fetchone()
            if row is None or row[0] != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            lease = lease_from(run_id, *row)
            expires = now_us() + round(lease_seconds * 1_000_000)
            db.execute("UPDATE runs SET lease_expires = ? WHERE run_id = ?", (expires, run_id))
        assert lease is not None
        return lease.model_copy(update={"expires_at": from_us(expires)})

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        now = now_us()
        completion = (now, result, None if result is None else now, run_id, token)
        if token is not None and self._conn.change("complete", run_id, COMPLETE, completion)[1]:
            return  # the holder's completion: one compare-and-set
        with self._conn.write("complete", run_id) as db:
            row = db.execute(
                "SELECT status, last_token, lease_ended_by, lease_token FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                return
            status, last, ended_by, live = row
            if status != "paused":
                if token is None or (status == "completed" and last == token):
                    return  # this holder completed it: complete() is idempotent
                if last >= token:
                    raise LeaseLost(run_id, f"the run was {status}")
                return
            if token is not None:
                if live is None:
                    if last == token and ended_by == "repause":
                        return  # re-paused by this very holder: the paused record stays
                    if last >= token:
                        raise LeaseLost(
                            run_id, f"token {token} ended by {ended_by or 'a later claim'}"
                        )
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
                if live != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
            elif live is None:
                return  # not in flight: a paused record (a fresh re-pause) stays as it is
            # A tombstone: a late writer with an older token, a redelivered first
            # execution and a repeated resume must see that the run completed.
            db.execute(COMPLETE, (*completion[:4], live))

    def _mark_delivered(self, run_id: str) -> None:
        # Not fsynced: a mark lost to a power cut only makes a recovery pass
        # look at the result backend again, which shows the result delivered.
        with self._conn.write("mark_delivered", run_id, durable=False) as db:
            db.execute(
                "UPDATE runs SET undelivered_at = NULL WHERE run_id = ? "
                "AND undelivered_at IS NOT NULL",
                (run_id,),
            )

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        with self._conn.write("release", run_id) as db:
            row = db.execute(
                "SELECT lease_token, resume FROM runs WHERE run_id = ? AND status = 'paused'",
                (run_id,),
            ).fetchone()
            if row is None or row[0] != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            resume = row[1]
            if resume is not None:
                failed = resume_from(run_id, resume).model_copy(
                    update={"status": "failed", "error": error}
                )
                resume = failed.model_dump_json()
            db.execute(
                "UPDATE runs SET last_token = ?, lease_ended_by = 'release', resume = ?, "
                "resume_status = CASE WHEN resume IS NULL THEN NULL ELSE 'failed' END, "
                f"resume_sent_at = NULL, {NO_LEASE} WHERE run_id = ?",
                (token, resume, run_id),
            )

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        with self._conn.write("end", run_id) as db:
            row = db.execute(
                f"SELECT {RUN_COLUMNS}, lease_token FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None or row[1] != "paused":
                return None
            live = row[10]
            if token is not None and live != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            run = run_from(row)
            last = row[3] if live is None else live  # fence the holder
            now = now_us()
            db.execute(
                "UPDATE runs SET status = ?, ended_reason = ?, lease_ended_by = 'cancel', "
                f"last_token = ?, ended_at = ?, resume_sent_at = NULL, {NO_LEASE} "
                "WHERE run_id = ?",
                (status, reason, last, now, run_id),
            )
        run.status = status
        run.ended_reason = reason
        run.lease_ended_by = "cancel"
        run.last_token = last
        run.ended_at = from_us(now)
        return run

    def _ended(self, run_id: str) -> RunRecord | None:
        row = self._conn.one(
            "ended",
            run_id,
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ? AND status <> 'paused'",
            (run_id,),
        )
        return None if row is None else run_from(row)
