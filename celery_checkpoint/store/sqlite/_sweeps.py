"""Passes over many runs of the SQLite store: recovery, listing, counts, the due
indexes and pruning. Each reads an index (a partial one where it can), never a
paused run it does not return, and writes in batches of short transactions."""

from __future__ import annotations

import builtins
import logging
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ...exceptions import CorruptCheckpoint
from ...model import Owner, RunRecord
from ..base import GroupCounts, RunFilter, RunInfo, StoreStats, make_stats
from ._codec import LEASE_COLUMNS, RUN_COLUMNS, from_us, lease_from, now_us, run_from, us
from ._records import Records
from ._sql import NO_LEASE

__all__ = ["PAGE", "Sweeps"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")

PAGE = 200  # rows read per statement by list() and iter_ended()
_BATCH = 500  # rows changed per transaction by the background passes

_ORDERS = {
    None: ("paused_at", "ASC"),
    "oldest": ("paused_at", "ASC"),
    "newest": ("paused_at", "DESC"),
    "deadline": ("expires_at", "ASC"),
}


class Sweeps(Records):
    """The store's passes over its indexes; see the module docstring."""

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        """Re-arm leases that expired (by the local clock) or whose owner is proved dead."""
        now = now_us()
        expired = self._conn.all(
            "recover_orphaned",
            "*",
            "SELECT run_id, lease_token FROM runs WHERE lease_token IS NOT NULL "
            "AND lease_expires <= ?",
            (now,),
        )
        here = self._conn.all(
            "recover_orphaned",
            "*",
            "SELECT run_id, lease_token, lease_owner FROM runs WHERE lease_token IS NOT NULL "
            "AND lease_host = ? AND lease_expires > ?",
            (socket.gethostname(), now),
        )
        recovered: builtins.list[RunRecord] = []
        for run_id, token in expired:
            self._rearm(run_id, token, recovered, expired=True)
        for run_id, token, owner in here:
            try:
                dead = Owner.model_validate_json(owner).is_dead_here()
            except (ValueError, TypeError):
                dead = False  # an unreadable owner proves nothing: wait for the expiry
            if dead:
                self._rearm(run_id, token, recovered, expired=False)
        return recovered

    def _rearm(
        self, run_id: str, token: int, recovered: builtins.list[RunRecord], *, expired: bool
    ) -> None:
        """Re-arm one run if it still holds the lease ``token`` that was found lost."""
        with self._conn.write("recover_orphaned", run_id) as db:
            row = db.execute(
                f"SELECT {RUN_COLUMNS}, lease_token, lease_expires FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None or row[10] != token:
                return  # completed, re-paused or released meanwhile
            if expired and row[11] > now_us():
                return  # the holder sent a heartbeat meanwhile
            try:
                run = run_from(row)
            except CorruptCheckpoint as exc:
                self._move_aside(db, run_id, exc)
                return
            db.execute(
                "UPDATE runs SET last_token = ?, lease_ended_by = 'recovery', "
                f"recoveries = recoveries + 1, {NO_LEASE}, resume_sent_at = CASE "
                "WHEN resume_status = 'pending' THEN 0 ELSE resume_sent_at END WHERE run_id = ?",
                (token, run_id),
            )
        run.last_token = token
        run.lease_ended_by = "recovery"
        run.recoveries += 1
        logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
        recovered.append(run)

    def _prune_ended(self, older_than: float) -> int:
        now = now_us()
        cutoff = now - round(older_than * 1_000_000)
        pruned = 0
        while True:
            with self._conn.write("prune_ended", "*") as db:
                n = db.execute(
                    "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs "
                    "WHERE status <> 'paused' AND ended_at <= ? LIMIT ?)",
                    (cutoff, _BATCH),
                ).rowcount
            pruned += n
            if n < _BATCH:
                break
        with self._conn.write("prune_ended", "*") as db:
            db.execute("DELETE FROM early_answers WHERE expires_at <= ?", (now,))
        return pruned

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        """Pages of live runs through an index, in order: by age unless the filter's
        ``order`` says ``newest`` or ``deadline``; ``after`` starts past a position."""
        order = where.order
        after = where.after
        if order not in _ORDERS:
            raise ValueError(f"list order must be oldest, newest or deadline, not {order!r}")
        sort, direction = _ORDERS[order]
        conds: builtins.list[str] = ["status = 'paused'"]
        params: builtins.list[Any] = []
        if where.task is not None:
            conds.append("task_name = ?")
            params.append(where.task)
        if where.step is not None:
            conds.append("step = ?")
            params.append(where.step)
        cutoff = where.cutoff
        if cutoff is not None:
            conds.append("paused_at <= ?")
            params.append(us(cutoff))
        if sort == "expires_at":
            conds.append("expires_at IS NOT NULL")
        position: tuple[Any, ...] | None = None
        if after is not None:
            position = (us(datetime.fromisoformat(after[0])), after[1])
        beyond = f"({sort}, run_id) {'<' if direction == 'DESC' else '>'} (?, ?)"
        while True:
            sql = (
                f"SELECT {RUN_COLUMNS}, {LEASE_COLUMNS}, {sort} FROM runs WHERE "
                + " AND ".join(conds if position is None else [*conds, beyond])
                + f" ORDER BY {sort} {direction}, run_id {direction} LIMIT {PAGE}"
            )
            rows = self._conn.all("list", "*", sql, [*params, *(position or ())])
            for row in rows:
                try:
                    run = run_from(row)
                    lease = lease_from(row[0], *row[10:14])
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt checkpoint while listing: %s", exc)
                    self._quarantine(row[0], (row[2], row[8], row[11]), exc)
                    continue
                yield RunInfo(run=run, lease=lease)
            if len(rows) < PAGE:
                return
            position = (rows[-1][-1], rows[-1][0])

    def _count(self) -> int:
        row = self._conn.one("count", "*", "SELECT count(*) FROM runs WHERE status = 'paused'")
        return int(row[0])

    def _stats(self) -> StoreStats:
        """Counted from the indexes: cheap with any number of paused runs."""
        row = self._conn.one(
            "stats",
            "*",
            "SELECT (SELECT count(*) FROM runs WHERE status = 'paused'), "
            "(SELECT count(*) FROM runs WHERE lease_token IS NOT NULL), "
            "(SELECT count(*) FROM runs WHERE resume_sent_at IS NOT NULL "
            "AND lease_token IS NULL AND resume_seq = pause_seq AND status = 'paused'), "
            "(SELECT count(*) FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
            "AND expires_at <= ?)",
            (now_us(),),
        )
        return make_stats(*(int(n) for n in row))

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        return self._due(
            "due_resumes",
            "resume_sent_at",
            older_than,
            " AND lease_token IS NULL AND status = 'paused'",
        )

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        at = now_us() if now is None else us(now)
        rows = self._conn.all(
            "due_timeouts",
            "*",
            "SELECT run_id FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
            "AND expires_at <= ? ORDER BY expires_at, run_id",
            (at,),
        )
        return [r[0] for r in rows]

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
                ids = [r[0] for r in db.execute(select, (bound, _BATCH))]
                db.executemany(
                    f"UPDATE runs SET {column} = ? WHERE run_id = ?", [(mark, i) for i in ids]
                )
            due.extend(ids)
            if len(ids) < _BATCH:
                return due

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        """Completed runs whose result was kept and not yet marked delivered."""
        return self._due("due_deliveries", "undelivered_at", older_than)

    def _next_deadline(self) -> datetime | None:
        """The earliest ``expires_at`` among paused runs, from the deadline index."""
        row = self._conn.one(
            "next_deadline",
            "*",
            "SELECT expires_at FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
            "ORDER BY expires_at LIMIT 1",
        )
        return None if row is None else from_us(row[0])

    def _summary(self, now: datetime) -> builtins.list[GroupCounts]:
        """Live runs counted by (task, step) in one aggregate query."""
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
