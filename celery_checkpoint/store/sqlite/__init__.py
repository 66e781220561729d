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

Modules
    :mod:`._connection` opens the database and runs transactions,
    :mod:`._schema` migrates it, :mod:`._sql` and :mod:`._codec` hold the hot
    statements and the rows; :mod:`._records` the helpers the others share,
    :mod:`._transitions` the transitions of one run, :mod:`._keys` business
    keys and early answers, :mod:`._moving` ``restore`` and ``iter_ended``,
    :mod:`._sweeps` the passes over many runs; this module opens the store and
    saves.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from ...exceptions import CheckpointExists, ImproperlyConfigured, LeaseLost
from ...model import DEFAULT_LEASE_SECONDS, ResumeRequest, RunRecord
from ..base import CheckpointStore, GroupCounts
from ._codec import now_us
from ._connection import Connection
from ._keys import Keys
from ._moving import Moving
from ._sql import CREATE, REPAUSE, SAVE, row_values
from ._sweeps import Sweeps

__all__ = ["GroupCounts", "SqliteStore", "sqlite_path"]

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


class SqliteStore(Moving, Sweeps, Keys, CheckpointStore):
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

    def __repr__(self) -> str:
        return f"SqliteStore({f'sqlite:///{self.path}'!r})"

    def close(self) -> None:
        self._conn.close()

    # -- the contract (its other primitives: the mixins, see the package docstring) --

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
