"""The PostgreSQL store: checkpoints shared by a fleet of workers, inspectable with SQL.

Open it with ``CheckpointStore.open("postgresql://user:pass@host:5432/db")``
(``postgres://`` too; libpq's URL options such as ``?sslmode=require`` pass
through). Tables live in the schema ``?schema=`` names (default
``celery_checkpoint``), created with them on first open. Needs
``pip install 'celery-checkpoint[postgres]'`` (psycopg 3 and psycopg_pool) and
PostgreSQL 12 or newer (tested with 15). Pass ``schema=`` in code instead of the
URL if you like; ``pool_size`` (default 4) sizes the connection pool and
``timeout`` (seconds, default 10) bounds the wait for a free connection.

Atomicity and contention
    Every transition -- save, claim, request_resume, heartbeat, complete,
    release, end, the re-arm of an orphaned run -- is one SQL statement (see
    ``_sql.py``): a conditional ``UPDATE ... RETURNING``, or a ``WITH ... FOR
    UPDATE`` that locks the run's row, decides and writes in the same statement.
    Of concurrent claims exactly one updates the row; the others wait on its
    lock for the length of one statement and then find it taken. A statement
    locks one run row; the passes over many runs (recovery, due resumes,
    pruning) take their batches with ``FOR UPDATE SKIP LOCKED``. No transaction
    waits for a lock while holding another run's, so workers on many machines
    never deadlock. A pause naming a business key, and an answer to a key, are
    short transactions under an advisory lock on the key, taken first: of a
    racing pause and answer, one sees the other.

Clocks
    Lease expiry, deadlines (``expires_at`` in ``request_resume``, due
    timeouts), the pending-request and ended-run ages are compared with the
    database server's ``now()``, never a worker's clock.

Faults
    A dropped connection raises ``StoreUnavailable`` carrying the driver's
    error. Reads are retried twice with backoff; a transition is never sent
    again behind the caller's back: if its reply is lost it was applied whole or
    not at all, and the caller decides (``complete`` and ``request_resume`` are
    idempotent by contract, so sending them again is safe). A pooled connection
    the server closed while it sat idle (a restart, ``pg_terminate_backend``) is
    noticed without a round trip and replaced before a call is sent on it.

Durability
    A returned write is committed. With the server's defaults (``fsync = on``,
    ``synchronous_commit = on``) it survives a crash or power cut of the
    database server; ``synchronous_commit = off`` (for the database, the role
    or the server) can lose the last fraction of a second of writes, and a
    replica promoted after an asynchronous failover can lose what it had not
    received. Never run checkpoints with ``fsync = off``. Opening the store logs
    a warning when the session it gets has either turned off.

Layout (see ``_schema.py``)
    ``runs``: one row per run, paused, in flight (the ``lease_*`` columns set)
    or ended (a tombstone, ``status`` completed, cancelled, expired or failed),
    its record JSON as saved plus the columns transitions change;
    ``corrupt_runs``: records moved aside because they did not parse;
    ``run_counts``: live runs per task and step, kept by triggers;
    ``early_answers``: answers for a business key that came before its pause;
    ``schema_migrations``: the schema's version. Every secondary index is
    partial, so recovery, due timeouts and resumes, key lookups and ``list``
    never read the paused runs at large, and ``count`` reads a few counter rows.
    ``record`` is TEXT holding JSON: query it with ``record::jsonb``.

Forks
    The connection pool is made again in a forked child (prefork workers); the
    parent's connections are left alone.

Modules
    :mod:`._connection` opens the pool and makes the calls, :mod:`._schema`
    migrates the tables, :mod:`._sql` holds the statements and :mod:`._codec`
    the rows; :mod:`._records` the helpers the others share,
    :mod:`._transitions` the transitions of one run, :mod:`._keys` business
    keys and early answers, :mod:`._moving` ``restore`` and ``iter_ended``,
    :mod:`._sweeps` the passes over many runs; this module opens the store and
    saves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...model import DEFAULT_LEASE_SECONDS, ResumeRequest, RunRecord
from ..base import CheckpointStore, GroupCounts
from ._connection import DEFAULT_SCHEMA, Connection
from ._keys import Keys
from ._moving import Moving
from ._schema import migrate
from ._sql import render
from ._sweeps import Sweeps

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["DEFAULT_SCHEMA", "GroupCounts", "PostgresStore"]

logger = logging.getLogger("celery_checkpoint.store.postgres")


class PostgresStore(Moving, Sweeps, Keys, CheckpointStore):
    """Checkpoints in PostgreSQL, each transition one statement. See the package docstring."""

    url = "postgresql://, postgres://"
    ordered_listing = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        pool_size: int = 4,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(lease_seconds=lease_seconds)
        self._conn = Connection(url, schema=schema, pool_size=int(pool_size), timeout=timeout)
        self.schema = self._conn.schema
        conn = self._conn.connect()
        try:
            try:
                self.schema_version = migrate(conn, self.schema)
            except self._conn.errors as exc:
                raise self._conn.unavailable("open", "*", exc) from exc
            self._q = render(conn, self.schema)
            self._warn_if_not_durable(conn)
        finally:
            conn.close()
        self._lists: dict[tuple[Any, ...], bytes] = {}
        self._conn.open_pool()

    def __repr__(self) -> str:
        return f"PostgresStore({self._conn.display!r}, schema={self.schema!r})"

    def _warn_if_not_durable(self, conn: PgConnection[Any]) -> None:
        try:
            row = conn.execute(
                "SELECT current_setting('fsync'), current_setting('synchronous_commit')"
            ).fetchone()
        except self._conn.errors as exc:
            raise self._conn.unavailable("open", "*", exc) from exc
        fsync, synchronous = row if row is not None else ("on", "on")
        if fsync == "off":
            logger.warning(
                "PostgreSQL at %s runs with fsync = off: a crash of the server can lose or "
                "corrupt checkpoints. Turn it on for any database that holds them",
                self._conn.display,
            )
        if synchronous == "off":
            logger.warning(
                "PostgreSQL at %s commits checkpoint writes with synchronous_commit = off: a "
                "crash of the server loses the last writes it acknowledged",
                self._conn.display,
            )

    def close(self) -> None:
        self._conn.close()

    # -- the contract (its other primitives: the mixins, see the package docstring) --

    def _save(self, run: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        if run.key is None or run.status != "paused":
            self._conn.write(
                "save", run.run_id, lambda conn: self._save_on(conn, run, token, create)
            )
            return None
        return self._conn.write(
            "save", run.run_id, lambda conn: self._save_keyed(conn, run, token, create)
        )
