"""Moving runs between stores, in the SQLite store: a run restored as it was, and
every tombstone read back in pages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from ...exceptions import CheckpointExists, CorruptCheckpoint
from ...model import RunRecord
from ._codec import RUN_COLUMNS, now_us, run_from, us
from ._records import Records
from ._sql import INSERT, row_values
from ._sweeps import PAGE

__all__ = ["Moving"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")


class Moving(Records):
    """``restore`` and ``iter_ended``: what ``celery checkpoint migrate`` moves runs with."""

    def _restore(self, run: RunRecord) -> bool:
        """Write ``run`` exactly as given if the store has no record of it at all."""
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
        """Every tombstone, streaming in pages by when it ended."""
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
