"""Passes over many runs of the PostgreSQL store: recovery, listing, counts, the
due indexes and pruning. Each reads a partial index or the counter table, never
the paused runs at large, and takes its batches with ``FOR UPDATE SKIP LOCKED``."""

from __future__ import annotations

import builtins
import logging
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ...exceptions import CorruptCheckpoint
from ...model import Owner, RunRecord, validate_run_id
from ..base import GroupCounts, RunFilter, RunInfo, StoreStats, make_stats
from ._codec import ROW_WIDTH, lease_of, text
from ._records import Records
from ._sql import render_list

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["PAGE", "Sweeps"]

logger = logging.getLogger("celery_checkpoint.store.postgres")

PAGE = 200  # runs read per round trip by list() (and the walk over tombstones)
_FIRST_PAGE = 50  # list()'s first page: a page of an inbox or an API is often all it takes
_BATCH = 500  # runs taken per statement by the passes over many runs


class Sweeps(Records):
    """The store's passes over its indexes; see the module docstring."""

    _lists: dict[tuple[Any, ...], bytes]

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        recovered: builtins.list[RunRecord] = []
        while True:  # leases past their expiry, by the server's clock
            rows = self._write_all("recover_orphaned", "recover_expired", (_BATCH,))
            self._rearmed(rows, recovered)
            if len(rows) < _BATCH:
                break
        host = socket.gethostname()
        held = self._conn.read(
            "recover_orphaned",
            "*",
            lambda conn: conn.execute(self._q["host_leases"], (text(host),)).fetchall(),
        )
        dead_ids: builtins.list[str] = []
        dead_tokens: builtins.list[int] = []
        for run_id, token, owner_json in held:
            try:
                dead = Owner.model_validate_json(owner_json).is_dead_here()
            except ValueError:
                dead = False  # an owner we cannot read is not proved dead
            if dead:
                dead_ids.append(run_id)
                dead_tokens.append(token)
        for start in range(0, len(dead_ids), _BATCH):
            batch = (dead_ids[start : start + _BATCH], dead_tokens[start : start + _BATCH])
            self._rearmed(self._write_all("recover_orphaned", "recover_dead", batch), recovered)
        return recovered

    def _rearmed(self, rows: builtins.list[Any], recovered: builtins.list[RunRecord]) -> None:
        for row in rows:
            run_id = row[0]
            run = self._decode_or_quarantine(run_id, row, 1, "during recovery")
            if run is not None:
                logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
                recovered.append(run)

    def _prune_ended(self, older_than: float) -> int:
        self._write_all("prune_ended", "prune_early_answers", None, rows=False)
        pruned = 0
        while True:
            # Each batch is one statement: a lost reply leaves it applied whole or
            # not at all, and pruning again is harmless.
            n = len(self._write_all("prune_ended", "prune_ended", (older_than, _BATCH)))
            pruned += n
            if n < _BATCH:
                return pruned

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        order: str | None = where.order
        after = where.after
        position: tuple[Any, str] | None = None
        if after is not None:
            position = (datetime.fromisoformat(after[0]), after[1])
        size = _FIRST_PAGE
        while True:
            rows = self._list_page(where, order, position, size)
            for row in rows:
                run_id = row[0]
                run = self._decode_or_quarantine(run_id, row, 2, "while listing")
                if run is None:
                    continue
                try:
                    lease = lease_of(run_id, row, 2 + ROW_WIDTH - 4)
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt checkpoint while listing: %s", exc)
                    self._quarantine(run_id, row[2], exc)
                    continue
                # Filtered again here: the columns hold names with NUL replaced.
                if where.matches(run, None):
                    yield RunInfo(run=run, lease=lease)
            if len(rows) < size:
                return
            position = (rows[-1][1], rows[-1][0])
            size = PAGE

    def _list_page(
        self, where: RunFilter, order: str | None, position: tuple[Any, str] | None, size: int
    ) -> builtins.list[Any]:
        """One page of ``list`` from where the previous one ended (``position``)."""
        shape = (
            order,
            where.task is not None,
            where.step is not None,
            where.older_than is not None,
            position is not None,
        )
        params: builtins.list[Any] = []
        if where.task is not None:
            params.append(text(where.task))
        if where.step is not None:
            params.append(text(where.step))
        if where.older_than is not None:
            params.append(float(where.older_than))
        if position is not None:
            params.extend(position)
        params.append(size)

        def page(conn: PgConnection[Any]) -> builtins.list[Any]:
            query = self._lists.get(shape)
            if query is None:
                _, task, step, cutoff, after = shape
                query = render_list(
                    conn, self.schema, order, task=task, step=step, cutoff=cutoff, after=after
                )
                self._lists[shape] = query
            return conn.execute(query, params).fetchall()

        return self._conn.read("list", "*", page)

    def _count(self) -> int:
        return int(self._read_one("count", "*", "count", None)[0])

    def _stats(self) -> StoreStats:
        """Counted from the counter table and partial indexes: cheap with any number of runs."""
        runs, in_flight, pending, due = self._read_one("stats", "*", "stats", None)
        return make_stats(int(runs), int(in_flight), int(pending), int(due))

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        bound: datetime | None = None
        while True:
            rows = self._write_all("due_resumes", "due_resumes", (older_than, bound, _BATCH))
            due.extend(row[0] for row in rows)
            if len(rows) < _BATCH:
                return due
            if bound is None:
                bound = rows[0][1] - timedelta(microseconds=1)

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        rows = self._conn.read(
            "due_timeouts",
            "*",
            lambda conn: conn.execute(self._q["due_timeouts"], (now,)).fetchall(),
        )
        return [row[0] for row in rows if _valid(row[0])]

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        """Completed runs whose result was not delivered, last tried over
        ``older_than`` seconds ago; each returned one is marked tried now."""
        due: builtins.list[str] = []
        bound: datetime | None = None
        while True:
            rows = self._write_all("due_deliveries", "due_deliveries", (older_than, bound, _BATCH))
            due.extend(row[0] for row in rows)
            if len(rows) < _BATCH:
                return due
            if bound is None:
                bound = rows[0][1] - timedelta(microseconds=1)

    def _next_deadline(self) -> datetime | None:
        """The earliest ``expires_at`` of a live run, from the deadline index."""
        found: datetime | None = self._read_one("next_deadline", "*", "next_deadline", None)[0]
        return found

    def _summary(self, now: datetime) -> builtins.list[GroupCounts]:
        """Per (task, step) with live runs: paused, in flight, pending, overdue, and
        the oldest pause; from the counters and partial indexes."""
        rows = self._conn.read(
            "summary", "*", lambda conn: conn.execute(self._q["summary"], (now,)).fetchall()
        )
        return [
            GroupCounts(
                task=task,
                step=step,
                paused=int(paused),
                in_flight=int(in_flight),
                pending=int(pending),
                overdue=int(overdue),
                oldest_paused_at=oldest,
            )
            for task, step, paused, in_flight, pending, overdue, oldest in rows
        ]


def _valid(run_id: str) -> bool:
    """Whether an id read back from the table is a run id (anything else is skipped)."""
    try:
        validate_run_id(run_id)
    except ValueError:
        return False
    return True
