"""The SQLite store's primitives of the planned contract extensions E1-E7.

E1 (the deadline in ``request_resume``) and the E4 parts of ``save`` live with
the transitions they change; the primitives here are new ones, kept apart until
``base.py`` grows their public wrappers:
results kept until delivered (E2), the earliest deadline (E3), business keys
and early answers (E4), counts by task and step (E6), restoring records as
they are and streaming tombstones (E7). Ordered listing (E5) is ``_list``.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict

from ...exceptions import AlreadyResumed, CheckpointExists, CorruptCheckpoint
from ...model import ResumeRequest, RunRecord
from ._codec import RUN_COLUMNS, from_us, now_us, resume_from, run_from, us
from ._connection import Connection
from ._sql import INSERT, row_values

__all__ = ["BATCH", "PAGE", "Extensions", "GroupCounts"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")

PAGE = 200  # rows read per statement by list() and _iter_ended()
BATCH = 500  # rows changed per transaction by the background passes


class GroupCounts(TypedDict):
    """Live runs of one (task, step), as :meth:`Extensions._summary` counts them."""

    task: str
    step: str
    paused: int  #: not in flight
    in_flight: int
    pending: int  #: paused with a pending request of the current pause
    overdue: int  #: deadline passed, not in flight
    oldest_paused_at: datetime | None  #: among the paused (not in flight)


class Extensions:
    """The extension primitives and the due-index pass they share with ``due_resumes``."""

    _conn: Connection

    if TYPE_CHECKING:

        def _resume_in(
            self,
            db: sqlite3.Connection,
            run_id: str,
            request: ResumeRequest,
            pause_seq: int | None,
        ) -> ResumeRequest: ...

        def _quarantine(self, run_id: str, seen: Any, why: CorruptCheckpoint) -> None: ...

    def _due(
        self, action: str, column: str, older_than: float, extra: str = ""
    ) -> builtins.list[str]:
        """Ids whose ``column`` time is over ``older_than`` seconds old, each re-dated now."""
        now = now_us()
        bound = now - round(older_than * 1_000_000)
        mark = max(now, bound + 1)  # never examined again by this pass
        due: builtins.list[str] = []
        select = (
            f"SELECT run_id FROM runs WHERE {column} IS NOT NULL AND {column} <= ?{extra} LIMIT ?"
        )
        if not self._conn.all(action, "*", select, (bound, 1)):
            return due  # the usual answer, found without taking the write lock
        while True:
            with self._conn.write(action, "*") as db:
                ids = [r[0] for r in db.execute(select, (bound, BATCH))]
                db.executemany(
                    f"UPDATE runs SET {column} = ? WHERE run_id = ?", [(mark, i) for i in ids]
                )
            due.extend(ids)
            if len(ids) < BATCH:
                return due

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        """Completed runs whose result was kept and not yet marked delivered (E2)."""
        return self._due("due_deliveries", "undelivered_at", older_than)

    def _mark_delivered(self, run_id: str) -> None:
        # Not fsynced: a mark lost to a power cut only makes a recovery pass
        # look at the result backend again, which shows the result delivered.
        with self._conn.write("mark_delivered", run_id, durable=False) as db:
            db.execute(
                "UPDATE runs SET undelivered_at = NULL WHERE run_id = ? "
                "AND undelivered_at IS NOT NULL",
                (run_id,),
            )

    def _next_deadline(self) -> datetime | None:
        """The earliest ``expires_at`` among paused runs, from the deadline index (E3)."""
        row = self._conn.one(
            "next_deadline",
            "*",
            "SELECT expires_at FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
            "ORDER BY expires_at LIMIT 1",
        )
        return None if row is None else from_us(row[0])

    def _find_key(self, key: str) -> str | None:
        """The live run holding business key ``key`` (E4)."""
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
        until a pause names the key (E4). One transaction: a racing save of a pause
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
                raise AlreadyResumed(key, existing.request_id)
            db.execute(
                "INSERT OR REPLACE INTO early_answers (key, request, expires_at, created_at) "
                "VALUES (?, ?, ?, ?)",
                (key, request.model_dump_json(), now + round(ttl * 1_000_000), now),
            )
            return None, request

    def _summary(self, now: datetime) -> builtins.list[GroupCounts]:
        """Live runs counted by (task, step) in one aggregate query (E6)."""
        rows = self._conn.all(
            "summary",
            "*",
            "SELECT task_name, step, "
            "sum(lease_token IS NULL), "
            "sum(lease_token IS NOT NULL), "
            "sum(lease_token IS NULL AND resume_sent_at IS NOT NULL AND resume_seq = pause_seq), "
            "sum(lease_token IS NULL AND expires_at IS NOT NULL AND expires_at < ?), "
            "min(CASE WHEN lease_token IS NULL THEN paused_at END) "
            "FROM runs WHERE status = 'paused' GROUP BY task_name, step ORDER BY task_name, step",
            (us(now),),
        )
        return [
            GroupCounts(
                task=task,
                step=step,
                paused=int(paused),
                in_flight=int(in_flight),
                pending=int(pending),
                overdue=int(overdue),
                oldest_paused_at=None if oldest is None else from_us(oldest),
            )
            for task, step, paused, in_flight, pending, overdue, oldest in rows
        ]

    def _restore(self, run: RunRecord) -> bool:
        """Write ``run`` exactly as given if the store has no record of it at all (E7)."""
        if run.lease is not None:
            raise ValueError(
                f"run {run.run_id!r} is in flight (it has a lease): in-flight runs are not restored"
            )
        with self._conn.write("restore", run.run_id) as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run.run_id,)).fetchone():
                return False
            now = now_us()
            ended = run.status != "paused"
            if run.key is not None and not ended:
                other = db.execute(
                    "SELECT run_id FROM runs WHERE key = ? AND status = 'paused'", (run.key,)
                ).fetchone()
                if other is not None:
                    raise CheckpointExists(
                        run.run_id, f"key {run.key!r} is held by run {other[0]!r}"
                    )
            ended_at = None
            if run.ended_at is not None:
                ended_at = us(run.ended_at)
            elif ended:
                ended_at = now
            db.execute(
                INSERT,
                row_values(
                    run,
                    status=run.status,
                    last_token=run.last_token,
                    ended_by=run.lease_ended_by,
                    resume=run.resume,
                    now=now,
                    ended_at=ended_at,
                ),
            )
        return True

    def _iter_ended(self) -> Iterator[RunRecord]:
        """Every tombstone, streaming in pages by when it ended (E7)."""
        position: tuple[Any, ...] | None = None
        while True:
            beyond = "" if position is None else " AND (ended_at, run_id) > (?, ?)"
            rows = self._conn.all(
                "iter_ended",
                "*",
                f"SELECT {RUN_COLUMNS}, ended_at FROM runs WHERE status <> 'paused'"
                f"{beyond} ORDER BY ended_at, run_id LIMIT {PAGE}",
                position or (),
            )
            for row in rows:
                try:
                    yield run_from(row)
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt tombstone: %s", exc)
                    self._quarantine(row[0], (row[2], row[8], None), exc)
            if len(rows) < PAGE:
                return
            position = (rows[-1][-1], rows[-1][0])
