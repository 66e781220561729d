"""What the PostgreSQL store's transitions and passes share: running one
statement, the default lease owner, and moving a corrupt run aside."""

from __future__ import annotations

import builtins
import logging
from typing import TYPE_CHECKING, Any

from ...exceptions import CorruptCheckpoint
from ...model import RunRecord
from ._codec import decode
from ._connection import Connection

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["Records"]

logger = logging.getLogger("celery_checkpoint.store.postgres")


class Records:
    """Helpers shared by the PostgreSQL store's transitions and passes over many runs."""

    _conn: Connection
    #: the statements, rendered for the store's schema (see ``_sql.py``)
    _q: dict[str, bytes]
    schema: str

    def _one(self, conn: PgConnection[Any], name: str, params: Any = None) -> Any:
        """The first row of statement ``name``, or None."""
        return conn.execute(self._q[name], params).fetchone()

    def _read_one(self, action: str, run_id: str, name: str, params: Any) -> Any:
        return self._conn.read(action, run_id, lambda conn: self._one(conn, name, params))

    def _write_one(self, action: str, run_id: str, name: str, params: Any) -> Any:
        return self._conn.write(action, run_id, lambda conn: self._one(conn, name, params))

    def _write_all(
        self, action: str, name: str, params: Any, *, rows: bool = True
    ) -> builtins.list[Any]:
        """One statement of a pass over many runs; its rows (none if ``rows`` is False)."""

        def do(conn: PgConnection[Any]) -> builtins.list[Any]:
            cursor = conn.execute(self._q[name], params)
            return cursor.fetchall() if rows else []

        return self._conn.write(action, "*", do)

    def _quarantine(self, run_id: str, body: str, exc: CorruptCheckpoint) -> None:
        """Move a corrupt run to ``corrupt_runs``, unless its record changed meanwhile."""
        try:
            moved = self._write_one("quarantine", run_id, "quarantine", (run_id, body, exc.detail))
        except Exception as err:  # the pass goes on; the run stays as it is
            logger.warning("could not move corrupt checkpoint %s aside: %s", run_id, err)
            return
        if moved is not None:
            logger.warning(
                "moved corrupt checkpoint aside to %s.corrupt_runs (id %d): %s",
                self.schema,
                moved[0],
                exc,
            )

    def _decode_or_quarantine(self, run_id: str, row: Any, at: int, doing: str) -> RunRecord | None:
        try:
            return decode(run_id, row, at)
        except CorruptCheckpoint as exc:
            logger.warning("skipping corrupt checkpoint %s: %s", doing, exc)
            self._quarantine(run_id, row[at], exc)
            return None
