"""Moving runs between stores, in the PostgreSQL store: a run restored as it was,
and every tombstone read back in pages."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ...exceptions import CheckpointExists
from ...model import RunRecord
from ._codec import save_params
from ._records import Records
from ._sweeps import PAGE

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["Moving"]


class Moving(Records):
    """``restore`` and ``iter_ended``: what ``celery checkpoint migrate`` moves runs with."""

    def _restore(self, run: RunRecord) -> bool:
        """Write ``run`` exactly as given (paused or ended) where the run has no row.

        True if written, False if the run already had a record. A paused record's
        key must be free (``CheckpointExists`` otherwise); it does not take an
        early answer waiting for its key: it is restored as it was.
        """
        if run.lease is not None:
            raise ValueError(
                f"restore of run {run.run_id!r}: it carries a lease, and in-flight runs are "
                "never migrated"
            )
        params = save_params(run)
        key = params["key"]

        def restore(conn: PgConnection[Any]) -> bool:
            with conn.transaction():
                if key is not None:
                    conn.execute(self._q["lock_key"], (key,))
                    holder = self._one(conn, "key_holder", (key, run.run_id))
                    if holder is not None:
                        raise CheckpointExists(
                            run.run_id, f"key {key!r} is held by run {holder[0]!r}"
                        )
                return self._one(conn, "restore", params) is not None

        return self._conn.write("restore", run.run_id, restore)

    def _iter_ended(self) -> Iterator[RunRecord]:
        """Every ended record (tombstone), by when it ended, in pages."""
        position: tuple[datetime, str] = (datetime.min.replace(tzinfo=timezone.utc), "")
        while True:
            params = (*position, PAGE)
            rows = self._conn.read(
                "iter_ended",
                "*",
                lambda conn: conn.execute(self._q["iter_ended"], params).fetchall(),  # noqa: B023
            )
            for row in rows:
                run = self._decode_or_quarantine(row[0], row, 2, "while reading ended runs")
                if run is not None:
                    yield run
            if len(rows) < PAGE:
                return
            position = (rows[-1][1], rows[-1][0])
