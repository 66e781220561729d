"""What the SQLite store's transitions and passes share: the connection, the
default lease owner, and moving a corrupt row aside."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from ...exceptions import CorruptCheckpoint
from ._codec import now_us
from ._connection import Connection

__all__ = ["Records"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")


class Records:
    """Helpers shared by the SQLite store's transitions and passes over many runs."""

    _conn: Connection
    #: see "Atomicity and durability" in the package docstring
    durable_leases: bool

    def _move_aside(self, db: sqlite3.Connection, run_id: str, why: CorruptCheckpoint) -> None:
        """Move the run's row to ``corrupt`` as it is (inside a write transaction).

        The copy keeps the highest token the run handed out, so a run saved
        again under the id goes on past it.
        """
        db.execute(
            "INSERT INTO corrupt (run_id, moved_at, reason, status, last_token, record, resume, "
            "lease_owner) SELECT run_id, ?, ?, status, max(last_token, coalesce(lease_token, 0)), "
            "record, resume, lease_owner FROM runs WHERE run_id = ?",
            (now_us(), why.detail, run_id),
        )
        db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        logger.warning("moved corrupt checkpoint %s aside to the corrupt table: %s", run_id, why)

    def _quarantine(self, run_id: str, seen: Any, why: CorruptCheckpoint) -> None:
        """Move a row found corrupt by a read aside, unless a writer replaced it meanwhile."""
        with self._conn.write("quarantine", run_id) as db:
            row = db.execute(
                "SELECT record, resume, lease_owner FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is not None and tuple(row) == tuple(seen):
                self._move_aside(db, run_id, why)
