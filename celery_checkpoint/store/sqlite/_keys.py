"""Business keys in the SQLite store: a pause naming a key, and an answer by key,
each one transaction, so of a racing pause and answer one sees the other."""

from __future__ import annotations

import sqlite3

from ...exceptions import AlreadyResumed, CheckpointExists, LeaseLost
from ...model import ResumeRequest, RunRecord
from ._codec import now_us, resume_from, us
from ._sql import PUT, row_values
from ._transitions import Transitions

__all__ = ["Keys"]


class Keys(Transitions):
    """A pause naming a business key, ``find_key``, ``answer_key``."""

    def _save_keyed(self, run: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        """save() of a pause naming a business key: the key's checks and its early
        answer join the compare-and-set, in one transaction."""
        run_id = run.run_id
        with self._conn.write("save", run_id) as db:
            row = db.execute(
                "SELECT status, last_token, lease_token FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if create and row is not None:
                raise CheckpointExists(run_id, "paused" if row[0] == "paused" else "ended")
            live = row[2] if row is not None and row[0] == "paused" else None
            ended_by = run.lease_ended_by
            if token is not None:
                if live is None or live != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
                last, ended_by = token, "repause"
            elif live is not None:
                raise LeaseLost(run_id, f"the run is in flight under token {live}; save with it")
            else:
                last = run.last_token if row is None else max(run.last_token, row[1])
            now = now_us()
            answer = self._claim_key(db, run, now)
            values = row_values(
                run,
                status="paused",
                last_token=last,
                ended_by=ended_by,
                resume=run.resume if answer is None else answer,
                now=now,
            )
            db.execute(PUT, values)
        return answer

    def _claim_key(self, db: sqlite3.Connection, run: RunRecord, now: int) -> ResumeRequest | None:
        """Refuse a key held by another live run; take the key's early answer, if any."""
        key = run.key
        other = db.execute(
            "SELECT run_id FROM runs WHERE key = ? AND status = 'paused' AND run_id <> ?",
            (key, run.run_id),
        ).fetchone()
        if other is not None:
            raise CheckpointExists(run.run_id, f"key {key!r} is held by run {other[0]!r}")
        current = run.current_resume
        if current is not None and current.status == "pending":
            return None  # answered already: the early answer waits for a later pause
        if run.on_timeout == "expire" and run.expires_at is not None and now >= us(run.expires_at):
            return None  # too late for any answer: request_resume would refuse it
        early = db.execute(
            "SELECT request FROM early_answers WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchone()
        if early is None:
            return None
        db.execute("DELETE FROM early_answers WHERE key = ?", (key,))
        request = resume_from(run.run_id, early[0])
        return request.model_copy(
            update={"pause_seq": run.pause_seq, "status": "pending", "error": None}
        )

    def _find_key(self, key: str) -> str | None:
        """The live run holding business key ``key``."""
        row = self._conn.one(
            "find_key",
            "*",
            "SELECT run_id FROM runs WHERE key = ? AND status = 'paused'",
            (key,),
        )
        return None if row is None else str(row[0])

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        """Answer the live run holding ``key``, or keep the answer for ``ttl`` seconds
        until a pause names the key. One transaction: a racing save of a pause
        with the key either comes before (and is answered) or after (and consumes)."""
        with self._conn.write("answer_key", key) as db:
            row = db.execute(
                "SELECT run_id FROM runs WHERE key = ? AND status = 'paused'", (key,)
            ).fetchone()
            if row is not None:
                return row[0], self._resume_in(db, row[0], request, None)
            now = now_us()
            early = db.execute(
                "SELECT request FROM early_answers WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
            if early is not None:
                existing = resume_from(key, early[0])
                if existing.request_id == request.request_id:
                    return None, existing
                raise AlreadyResumed(key, existing.request_id, key=True)
            db.execute(
                "INSERT OR REPLACE INTO early_answers (key, request, expires_at, created_at) "
                "VALUES (?, ?, ?, ?)",
                (key, request.model_dump_json(), now + round(ttl * 1_000_000), now),
            )
            return None, request
