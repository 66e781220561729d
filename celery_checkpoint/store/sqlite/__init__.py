"""The SQLite store: the default, for one machine, with no server to run.

Open it with ``CheckpointStore.open("sqlite:////abs/path/app.db")`` (four
slashes: an absolute path) or ``"sqlite:///relative/app.db"`` (three: relative
to the working directory when opened), SQLAlchemy's convention. The standard
library's ``sqlite3`` is the only driver. ``?busy_timeout=SECONDS`` (default
60) is how long a transition waits for another process's write lock before
``StoreUnavailable``; the other options (``durable_leases``,
``allow_network_fs``, ``lease_seconds``) may be given in the URL's query too.

Atomicity and durability
    Every transition -- save, claim, request_resume, heartbeat, complete,
    release, end, the re-arm of one orphaned run -- is one transaction whose
    checks and write are one compare-and-set, so of any number of processes
    (a prefork worker's children, the CLI, a web app) exactly one claim wins.
    The hot ones (save, claim, complete) are one statement each, its
    ``WHERE`` the compare-and-set (see :mod:`._sql`); the others read, decide
    and write inside ``BEGIN IMMEDIATE``, which holds the write lock from the
    first read.
    The database runs in WAL mode with ``synchronous=FULL``: the WAL is fsynced
    at each commit, so a returned transition survives a power cut, and a
    process killed at any instant leaves each run before or after its last
    transition. Readers never wait for writers and never see half of one.

    Two transitions commit without that fsync: ``claim`` and ``heartbeat``,
    which write only the lease, as the file store does. A lease matters only
    while its holder lives, and on one machine a power cut kills every
    holder: a claim lost that way leaves the run paused with its request
    pending, so it is re-sent and runs again -- what recovery would do with a
    lease that had survived (its owner proved dead by the new boot). The
    commit is still atomic and survives any crash of the process, and the
    next durable commit of any process makes it durable too (the WAL is
    fsynced up to its end). This saves one fsync in three of a resumed run.
    ``durable_leases=True`` (or ``?durable_leases=1``) fsyncs those too.

Layout
    See :mod:`._schema`: one ``runs`` row per run (paused, in flight or
    ended), the record JSON plus the columns transitions change and the
    indexes read; ``corrupt`` for rows moved aside; ``early_answers`` for
    answers that came before their pause. Tables are built by numbered
    migrations recorded in the database: a newer package upgrades an older
    database on open, an older one refuses a newer database.

Costs
    Recovery reads the in-flight rows by lease expiry (and those of this
    host, to prove their owners dead); due
    timeouts, due resumes and undelivered results read their own partial
    indexes; ``count`` and ``stats`` count index entries; ``list`` pages
    through an index in order. None of them reads a paused run it does not
    return.

Local disks only
    WAL needs shared memory and POSIX locks that work across processes; on
    NFS or SMB they may not, so such mounts are refused (for several machines
    use PostgreSQL or Redis). The database, its ``-wal`` and ``-shm`` files are
    created 0600 and a missing directory 0700: records hold personal data.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImproperlyConfigured,
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
)
from ..base import CheckpointStore, RunFilter, RunInfo, StoreStats, make_stats
from ._codec import (
    LEASE_COLUMNS,
    RUN_COLUMNS,
    from_us,
    lease_from,
    now_us,
    resume_from,
    run_from,
    us,
)
from ._connection import Connection
from ._extensions import BATCH, PAGE, Extensions, GroupCounts
from ._sql import CLAIM, COMPLETE, CREATE, NO_LEASE, PUT, REPAUSE, SAVE, row_values

__all__ = ["GroupCounts", "SqliteStore", "sqlite_path"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")

_ORDERS = {
    None: ("paused_at", "ASC"),
    "oldest": ("paused_at", "ASC"),
    "newest": ("paused_at", "DESC"),
    "deadline": ("expires_at", "ASC"),
}
_OPTIONS = {"busy_timeout", "allow_network_fs", "durable_leases", "lease_seconds"}


def sqlite_path(target: str | os.PathLike[str]) -> tuple[Path, dict[str, str]]:
    """The database path and URL options of ``sqlite:///rel.db``,
    ``sqlite:////abs.db`` or a plain path; ``ImproperlyConfigured`` otherwise."""
    text = os.fspath(target)
    options: dict[str, str] = {}
    if text[:7].lower() == "sqlite:":
        parts = urlsplit(text)
        if not text[7:].startswith("///") or parts.netloc:
            raise ImproperlyConfigured(
                f"SQLite store URL {text!r}: write sqlite:////absolute/path.db (four slashes) "
                "or sqlite:///relative/path.db (three); the store is local, with no host"
            )
        text = unquote(parts.path)[1:]
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ImproperlyConfigured(
                f"SQLite store URL: unknown option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_OPTIONS))}"
            )
    if not text or text == ":memory:" or text.startswith("file:"):
        raise ImproperlyConfigured(
            f"SQLite store needs a database file path, not {text!r}: every worker process "
            "and the CLI must open the same file"
        )
    return Path(text).expanduser().absolute(), options


def _flag(value: bool | str) -> bool:
    if isinstance(value, str):
        return value.lower() not in ("0", "false", "no", "off", "")
    return bool(value)


class SqliteStore(Extensions, CheckpointStore):
    """Checkpoints in one SQLite database file. See the package docstring."""

    url = "sqlite:///"
    ordered_listing = True

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        busy_timeout: float | str = 60.0,
        allow_network_fs: bool | str = False,
        durable_leases: bool | str = False,
    ) -> None:
        path, options = sqlite_path(target)
        super().__init__(lease_seconds=float(options.get("lease_seconds", lease_seconds)))
        try:
            timeout = float(options.get("busy_timeout", busy_timeout))
        except ValueError:
            raise ImproperlyConfigured(
                f"SQLite store busy_timeout must be a number of seconds, not {busy_timeout!r}"
            ) from None
        self.path = path
        #: False (the default) commits a claim or a heartbeat without an fsync;
        #: see "Atomicity and durability" in the package docstring.
        self.durable_leases = _flag(options.get("durable_leases", durable_leases))
        self._conn = Connection(
            path,
            busy_timeout=timeout,
            allow_network_fs=_flag(options.get("allow_network_fs", allow_network_fs)),
        )
        self._owner: tuple[int, Owner, str] | None = None

    def __repr__(self) -> str:
        return f"SqliteStore({f'sqlite:///{self.path}'!r})"

    def close(self) -> None:
        self._conn.close()

    # -- plumbing ----------------------------------------------------------------

    def _default_owner(self) -> tuple[Owner, str]:
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            owner = Owner.current()
            self._owner = (pid, owner, owner.model_dump_json())
        return self._owner[1], self._owner[2]

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

    # -- transitions -----------------------------------------------------------------

    def _save(  # returns the early answer it consumed
        self, run: RunRecord, token: int | None, create: bool
    ) -> ResumeRequest | None:
        run_id = run.run_id
        if run.key is not None:
            return self._save_keyed(run, token, create)
        now = now_us()
        if token is not None:
            values = row_values(
                run,
                status="paused",
                last_token=token,
                ended_by="repause",
                resume=run.resume,
                now=now,
            )
            _, changed = self._conn.change("save", run_id, REPAUSE, (*values[1:], run_id, token))
            if not changed:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            return None
        values = row_values(
            run,
            status="paused",
            last_token=run.last_token,
            ended_by=run.lease_ended_by,
            resume=run.resume,
            now=now,
        )
        try:
            _, changed = self._conn.change("save", run_id, CREATE if create else SAVE, values)
        except sqlite3.IntegrityError:
            changed = 0  # create: the run has a row already
        if not changed:
            row = self._conn.one(
                "save",
                run_id,
                "SELECT status, lease_token FROM runs WHERE run_id = ?",
                (run_id,),
            )
            if row is None or (not create and row[1] is None):
                return self._save(run, token, create)  # changed in between: decide again
            if create:
                raise CheckpointExists(run_id, "paused" if row[0] == "paused" else "ended")
            raise LeaseLost(run_id, f"the run is in flight under token {row[1]}; save with it")
        return None

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

    def _exists(self, run_id: str) -> bool:
        return (
            self._conn.one("exists", run_id, "SELECT 1 FROM runs WHERE run_id = ?", (run_id,))
            is not None
        )

    def _load(self, run_id: str) -> RunRecord | None:
        row = self._conn.one(
            "load",
            run_id,
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
            (run_id,),
        )
        return None if row is None else run_from(row)

    def _lease(self, run_id: str) -> Lease | None:
        row = self._conn.one(
            "lease",
            run_id,
            f"SELECT {LEASE_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
            (run_id,),
        )
        return None if row is None else lease_from(run_id, *row)

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        if owner is None:
            owner, owner_json = self._default_owner()
        else:
            owner_json = owner.model_dump_json()
        claimed = now_us()
        expires = claimed + round(lease_seconds * 1_000_000)
        rows, _ = self._conn.change(
            "claim",
            run_id,
            CLAIM,
            (owner_json, owner.host, claimed, expires, run_id, pause_seq, pause_seq),
            durable=self.durable_leases,
        )
        if not rows:
            return None  # unknown, ended, in flight, or at another pause
        row = rows[0]
        token = row[3] + 1
        try:
            run = run_from(row)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, corrupt, for list/recovery to move aside).
            self._conn.change(
                "claim",
                run_id,
                f"UPDATE runs SET last_token = ?, lease_ended_by = 'release', {NO_LEASE} "
                "WHERE run_id = ? AND lease_token = ?",
                (token, run_id, token),
            )
            raise
        # Built without validation: every value is ours.
        run.lease = Lease.model_construct(
            token=token, owner=owner, claimed_at=from_us(claimed), expires_at=from_us(expires)
        )
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        with self._conn.write("request_resume", run_id) as db:
            return self._resume_in(db, run_id, request, pause_seq)

    def _resume_in(
        self, db: sqlite3.Connection, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        """request_resume inside an open write transaction (answer_key shares it)."""
        row = db.execute(
            "SELECT status, pause_seq, step, resume, resume_seq, lease_token, on_timeout, "
            "expires_at FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise CheckpointNotFound(run_id)
        status, seq, step, resume, resume_seq, live, on_timeout, expires_at = row
        request_id = request.request_id
        if status != "paused":
            ended = run_from(
                db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            )
            done = ended.resume if ended.status == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise ended.ended_error()
        if pause_seq is not None and pause_seq != seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause {seq} "
                f"(step {step!r})",
            )
        current = resume_from(run_id, resume) if resume is not None and resume_seq == seq else None
        if current is not None and current.request_id == request_id:
            return current
        # Past the deadline of an expiring pause only the timer's own request
        # gets in: any other answer is too late, whatever else it would meet.
        now = now_us()
        if (
            not request.timed_out
            and on_timeout == "expire"
            and expires_at is not None
            and now >= expires_at
        ):
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {step!r} at "
                f"{from_us(expires_at).isoformat()}: the answer came too late"
            )
        # In flight with no request of this pause (a timeout or a redelivery
        # claimed it): accepting would be lost when the holder completes.
        if current is not None and (current.status == "pending" or live is not None):
            raise AlreadyResumed(run_id, current.request_id)
        if live is not None:
            raise AlreadyResumed(run_id, f"<none: in flight under token {live}>")
        accepted = request.model_copy(update={"pause_seq": seq})
        db.execute(
            "UPDATE runs SET resume = ?, resume_seq = ?, resume_status = 'pending', "
            "resume_sent_at = ? WHERE run_id = ?",
            (accepted.model_dump_json(), seq, now, run_id),
        )
        return accepted

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        with self._conn.write("heartbeat", run_id, durable=self.durable_leases) as db:
            row = db.execute(
                f"SELECT {LEASE_COLUMNS} FROM runs WHERE run_id = ? AND status = 'paused'",
                (run_id,),
            ).fetchone()
            if row is None or row[0] != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            lease = lease_from(run_id, *row)
            expires = now_us() + round(lease_seconds * 1_000_000)
            db.execute("UPDATE runs SET lease_expires = ? WHERE run_id = ?", (expires, run_id))
        assert lease is not None
        return lease.model_copy(update={"expires_at": from_us(expires)})

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        now = now_us()
        completion = (now, result, None if result is None else now, run_id, token)
        if token is not None and self._conn.change("complete", run_id, COMPLETE, completion)[1]:
            return  # the holder's completion: one compare-and-set
        with self._conn.write("complete", run_id) as db:
            row = db.execute(
                "SELECT status, last_token, lease_ended_by, lease_token FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                return
            status, last, ended_by, live = row
            if status != "paused":
                if token is None or (status == "completed" and last == token):
                    return  # this holder completed it: complete() is idempotent
                if last >= token:
                    raise LeaseLost(run_id, f"the run was {status}")
                return
            if token is not None:
                if live is None:
                    if last == token and ended_by == "repause":
                        return  # re-paused by this very holder: the paused record stays
                    if last >= token:
                        raise LeaseLost(
                            run_id, f"token {token} ended by {ended_by or 'a later claim'}"
                        )
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
                if live != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
            elif live is None:
                return  # not in flight: a paused record (a fresh re-pause) stays as it is
            # A tombstone: a late writer with an older token, a redelivered first
            # execution and a repeated resume must see that the run completed.
            db.execute(COMPLETE, (*completion[:4], live))

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        with self._conn.write("release", run_id) as db:
            row = db.execute(
                "SELECT lease_token, resume FROM runs WHERE run_id = ? AND status = 'paused'",
                (run_id,),
            ).fetchone()
            if row is None or row[0] != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            resume = row[1]
            if resume is not None:
                failed = resume_from(run_id, resume).model_copy(
                    update={"status": "failed", "error": error}
                )
                resume = failed.model_dump_json()
            db.execute(
                "UPDATE runs SET last_token = ?, lease_ended_by = 'release', resume = ?, "
                "resume_status = CASE WHEN resume IS NULL THEN NULL ELSE 'failed' END, "
                f"resume_sent_at = NULL, {NO_LEASE} WHERE run_id = ?",
                (token, resume, run_id),
            )

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

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        with self._conn.write("end", run_id) as db:
            row = db.execute(
                f"SELECT {RUN_COLUMNS}, lease_token FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None or row[1] != "paused":
                return None
            live = row[10]
            if token is not None and live != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            run = run_from(row)
            last = row[3] if live is None else live  # fence the holder
            now = now_us()
            db.execute(
                "UPDATE runs SET status = ?, ended_reason = ?, lease_ended_by = 'cancel', "
                f"last_token = ?, ended_at = ?, resume_sent_at = NULL, {NO_LEASE} "
                "WHERE run_id = ?",
                (status, reason, last, now, run_id),
            )
        run.status = status
        run.ended_reason = reason
        run.lease_ended_by = "cancel"
        run.last_token = last
        run.ended_at = from_us(now)
        return run

    def _ended(self, run_id: str) -> RunRecord | None:
        row = self._conn.one(
            "ended",
            run_id,
            f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ? AND status <> 'paused'",
            (run_id,),
        )
        return None if row is None else run_from(row)

    def _prune_ended(self, older_than: float) -> int:
        now = now_us()
        cutoff = now - round(older_than * 1_000_000)
        pruned = 0
        while True:
            with self._conn.write("prune_ended", "*") as db:
                n = db.execute(
                    "DELETE FROM runs WHERE run_id IN (SELECT run_id FROM runs "
                    "WHERE status <> 'paused' AND ended_at <= ? LIMIT ?)",
                    (cutoff, BATCH),
                ).rowcount
            pruned += n
            if n < BATCH:
                break
        with self._conn.write("prune_ended", "*") as db:
            db.execute("DELETE FROM early_answers WHERE expires_at <= ?", (now,))
        return pruned

    # -- reading many runs ---------------------------------------------------------

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
