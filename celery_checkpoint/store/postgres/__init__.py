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
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypedDict

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
)
from ...model import (
    DEFAULT_LEASE_SECONDS,
    EndStatus,
    Lease,
    Owner,
    ResumeRequest,
    RunRecord,
    validate_run_id,
)
from ..base import CheckpointStore, RunFilter, RunInfo, StoreStats, make_stats
from ._codec import ROW_WIDTH, decode, lease_of, resume_of, save_params, text
from ._connection import DEFAULT_SCHEMA, Connection
from ._schema import migrate
from ._sql import render, render_list

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["DEFAULT_SCHEMA", "GroupCounts", "PostgresStore"]

logger = logging.getLogger("celery_checkpoint.store.postgres")

_PAGE = 200  # runs read per round trip by list() (and the walk over tombstones)
_FIRST_PAGE = 50  # list()'s first page: a page of an inbox or an API is often all it takes
_BATCH = 500  # runs taken per statement by the passes over many runs


class PostgresStore(CheckpointStore):
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
        self._owner: tuple[int, Owner, str] | None = None
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

    # -- plumbing ----------------------------------------------------------------

    def _one(self, conn: PgConnection[Any], name: str, params: Any = None) -> Any:
        """The first row of statement ``name``, or None."""
        return conn.execute(self._q[name], params).fetchone()

    def _read_one(self, action: str, run_id: str, name: str, params: Any) -> Any:
        return self._conn.read(action, run_id, lambda conn: self._one(conn, name, params))

    def _write_one(self, action: str, run_id: str, name: str, params: Any) -> Any:
        return self._conn.write(action, run_id, lambda conn: self._one(conn, name, params))

    def _default_owner(self) -> tuple[Owner, str]:
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            owner = Owner.current()
            self._owner = (pid, owner, owner.model_dump_json())
        return self._owner[1], self._owner[2]

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

    # -- the contract ------------------------------------------------------------

    # The extensions' contract: a save returns the early answer it consumed, if
    # any. The base's public save() drops it until it grows the same return value.
    def _save(self, run: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        if run.key is None or run.status != "paused":
            self._conn.write(
                "save", run.run_id, lambda conn: self._save_on(conn, run, token, create)
            )
            return None
        return self._conn.write(
            "save", run.run_id, lambda conn: self._save_keyed(conn, run, token, create)
        )

    def _save_on(
        self, conn: PgConnection[Any], run: RunRecord, token: int | None, create: bool
    ) -> None:
        run_id = run.run_id
        params = save_params(run)
        if token is not None:
            params["token"] = token
            if self._one(conn, "save_token", params) is None:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            return
        if self._one(conn, "save_create" if create else "save", params) is not None:
            return
        # Refused; the row as it is now, for the message (it may have moved on since).
        found = self._one(conn, "save_refused", (run_id,))
        if create:
            status = "paused" if found is not None and found[0] == "paused" else "ended"
            raise CheckpointExists(run_id, status)
        in_flight = "?" if found is None or found[1] is None else found[1]
        raise LeaseLost(run_id, f"the run is in flight under token {in_flight}; save with it")

    def _save_keyed(
        self, conn: PgConnection[Any], run: RunRecord, token: int | None, create: bool
    ) -> ResumeRequest | None:
        """A pause naming a business key: unique among live runs, and it takes the
        early answer waiting for the key, in one transaction under the key's lock."""
        key = run.key
        try:
            with conn.transaction():
                conn.execute(self._q["lock_key"], (key,))
                holder = self._one(conn, "key_holder", (key, run.run_id))
                if holder is not None:
                    raise CheckpointExists(run.run_id, f"key {key!r} is held by run {holder[0]!r}")
                self._save_on(conn, run, token, create)
                row = self._one(conn, "consume_early_answer", (key, run.run_id, run.run_id))
        except self._conn.psycopg.errors.UniqueViolation as exc:  # the index, as a backstop
            raise CheckpointExists(run.run_id, f"key {key!r} is held by another run") from exc
        if row is None:
            return None
        try:
            return resume_of(row[0], row[1], "pending", None)
        except ValueError as exc:
            raise CorruptCheckpoint(run.run_id, f"early answer: {exc}") from exc

    def _exists(self, run_id: str) -> bool:
        return bool(self._read_one("exists", run_id, "exists", (run_id,))[0])

    def _load(self, run_id: str) -> RunRecord | None:
        row = self._read_one("load", run_id, "load", (run_id,))
        return None if row is None else decode(run_id, row)

    def _lease(self, run_id: str) -> Lease | None:
        row = self._read_one("lease", run_id, "lease", (run_id,))
        return None if row is None else lease_of(run_id, row, 0)

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        if owner is None:
            owner, owner_json = self._default_owner()
        else:
            owner_json = owner.model_dump_json()
        params = (owner_json, text(owner.host), lease_seconds, run_id, pause_seq)
        row = self._write_one("claim", run_id, "claim", params)
        if row is None:
            return None
        try:
            run = decode(run_id, row)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, for list or recovery to move aside).
            with contextlib.suppress(Exception):
                self._write_one("claim", run_id, "unclaim", (run_id, row[ROW_WIDTH - 4]))
            raise
        run.lease = lease_of(run_id, row, owner=owner)
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        return self._conn.write(
            "request_resume",
            run_id,
            lambda conn: self._request_resume_on(conn, run_id, request, pause_seq),
        )

    def _request_resume_on(
        self, conn: PgConnection[Any], run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        params = {
            "run_id": run_id,
            "request": request.model_dump_json(),
            "request_id": request.request_id,
            "pause_seq": pause_seq,
            "timed_out": request.timed_out,
        }
        row = self._one(conn, "request_resume", params)
        (accepted, status, seq, step, lease_token, *resume, ended_reason, expired) = row
        if accepted:
            return request.model_copy(update={"pause_seq": seq})
        if status is None:
            raise CheckpointNotFound(run_id)
        try:
            current = resume_of(*resume)
        except ValueError as exc:
            raise CorruptCheckpoint(run_id, f"resume request: {exc}") from exc
        if status != "paused":
            done = current if status == "completed" else None
            if done is not None and done.request_id == request.request_id:
                return done  # the same resume again, after it ran to completion
            ended = RunRecord.model_construct(
                run_id=run_id, status=status, step=step, ended_reason=ended_reason, resume=current
            )
            raise ended.ended_error()
        if pause_seq is not None and pause_seq != seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {seq} "
                f"(step {step!r})",
            )
        if current is not None and current.pause_seq != seq:
            current = None  # a request of an earlier pause is no answer to this one
        if current is not None and current.request_id == request.request_id:
            return current
        if expired and not request.timed_out:
            raise PauseExpired(f"run {run_id!r} expired at step {step!r}: its deadline passed")
        if current is not None:
            raise AlreadyResumed(run_id, current.request_id)
        raise AlreadyResumed(run_id, f"<none: in flight under token {lease_token}>")

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        row = self._write_one("heartbeat", run_id, "heartbeat", (lease_seconds, run_id, token))
        if row is None:
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        lease = lease_of(run_id, (token, *row), 0)
        assert lease is not None
        return lease

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        params = (result, result, run_id, token)
        if self._write_one("complete", run_id, "complete", params) is not None or token is None:
            return  # completed; or, without a token, a run not in flight stays as it is
        found = self._read_one("complete", run_id, "complete_refused", (run_id,))
        if found is None:
            return
        status, last, ended_by, lease_token = found
        if status != "paused":
            if status == "completed" and last == token:
                return  # this holder completed it: complete() is idempotent
            if last >= token:
                raise LeaseLost(run_id, f"the run was {status}")
            return
        if lease_token is None:
            if last == token and ended_by == "repause":
                return  # re-paused by this very holder: the fresh pause stays
            if last >= token:
                raise LeaseLost(run_id, f"token {token} ended by {ended_by or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        if self._write_one("release", run_id, "release", (text(error), run_id, token)) is None:
            raise LeaseLost(run_id, f"token {token} is not the current lease")

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

    def _write_all(
        self, action: str, name: str, params: Any, *, rows: bool = True
    ) -> builtins.list[Any]:
        """One statement of a pass over many runs; its rows (none if ``rows`` is False)."""

        def do(conn: PgConnection[Any]) -> builtins.list[Any]:
            cursor = conn.execute(self._q[name], params)
            return cursor.fetchall() if rows else []

        return self._conn.write(action, "*", do)

    def _rearmed(self, rows: builtins.list[Any], recovered: builtins.list[RunRecord]) -> None:
        for row in rows:
            run_id = row[0]
            run = self._decode_or_quarantine(run_id, row, 1, "during recovery")
            if run is not None:
                logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
                recovered.append(run)

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        row = self._write_one("end", run_id, "end", (status, text(reason), run_id, token))
        if row is None:
            if token is not None and self._read_one("end", run_id, "is_live", (run_id,))[0]:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            return None
        try:
            return decode(run_id, row)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def _ended(self, run_id: str) -> RunRecord | None:
        row = self._read_one("ended", run_id, "ended", (run_id,))
        return None if row is None else decode(run_id, row)

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

    # -- reading many runs ---------------------------------------------------------

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
            size = _PAGE

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

    # -- the extensions (STORE_EXTENSIONS.md): primitives the base calls later ------

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

    def _mark_delivered(self, run_id: str) -> None:
        """The run's result was delivered: it leaves the undelivered index. Idempotent."""
        self._conn.write(
            "mark_delivered",
            run_id,
            lambda conn: conn.execute(self._q["mark_delivered"], (run_id,)),
        )

    def _next_deadline(self) -> datetime | None:
        """The earliest ``expires_at`` of a live run, from the deadline index."""
        found: datetime | None = self._read_one("next_deadline", "*", "next_deadline", None)[0]
        return found

    def _find_key(self, key: str) -> str | None:
        """The live run holding business key ``key``, if any."""
        row = self._read_one("find_key", "*", "find_key", (key,))
        return None if row is None else str(row[0])

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        """Answer the live run holding ``key``, or keep the answer for the pause that
        will name it (``ttl`` seconds); one transaction under the key's lock."""

        def answer(conn: PgConnection[Any]) -> tuple[str | None, ResumeRequest]:
            with conn.transaction():
                conn.execute(self._q["lock_key"], (key,))
                holder = self._one(conn, "find_key", (key,))
                if holder is not None:
                    run_id = str(holder[0])
                    return run_id, self._request_resume_on(conn, run_id, request, None)
                kept = self._one(conn, "early_answer", (key,))
                if kept is not None:
                    existing = ResumeRequest.model_validate_json(kept[0])
                    if existing.request_id != request.request_id:
                        raise AlreadyResumed(key, existing.request_id)
                    return None, existing
                conn.execute(
                    self._q["put_early_answer"],
                    (key, request.request_id, request.model_dump_json(), ttl),
                )
                return None, request

        return self._conn.write("answer_key", "*", answer)

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
            params = (*position, _PAGE)
            rows = self._conn.read(
                "iter_ended",
                "*",
                lambda conn: conn.execute(self._q["iter_ended"], params).fetchall(),  # noqa: B023
            )
            for row in rows:
                run = self._decode_or_quarantine(row[0], row, 2, "while reading ended runs")
                if run is not None:
                    yield run
            if len(rows) < _PAGE:
                return
            position = (rows[-1][1], rows[-1][0])


class GroupCounts(TypedDict):
    """One (task, step) of ``_summary``; moves to the store contract with its public method."""

    task: str
    step: str
    paused: int
    in_flight: int
    pending: int
    overdue: int
    oldest_paused_at: datetime | None


def _valid(run_id: str) -> bool:
    """Whether an id read back from the table is a run id (anything else is skipped)."""
    try:
        validate_run_id(run_id)
    except ValueError:
        return False
    return True
