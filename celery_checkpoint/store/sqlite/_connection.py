"""The SQLite store's connection: opening the file, transactions, waiting out locks.

One connection per store per process, shared by its threads under a lock
(``check_same_thread=False``). SQLite lets one writer in at a time whatever
the number of connections, so a connection per thread would buy no write
concurrency; it would cost a file descriptor, a WAL reader slot and a statement
cache per thread, and connections left behind by threads that end (a Celery
thread pool, the heartbeat thread). The price: one process's threads take
turns, a read waiting out a write's fsync (a fraction of a millisecond); a
process serving many concurrent readers can open a store per thread. A child
process never uses the
connection it inherited across ``fork`` (SQLite forbids it): it opens its own
on first use, and keeps the inherited one referenced but untouched, because
closing it in the child could checkpoint or delete the WAL under the parent.

A transition is one statement (:meth:`Connection.change`, its ``WHERE`` the
compare-and-set) or one ``BEGIN IMMEDIATE`` transaction
(:meth:`Connection.write`): either way the write lock is taken before the
first read, so the reads and checks that decide a compare-and-set see what the
write replaces. ``synchronous=FULL`` in WAL mode fsyncs the WAL at each
commit: a returned transition survives a power cut.
SQLite's busy handler waits for the lock; a ``SQLITE_BUSY`` that comes back
anyway (the handler is skipped while another connection recovers the WAL
after a crash) is retried here until ``busy_timeout`` has passed, then raised
as ``StoreUnavailable`` naming the lock: "database is locked" never reaches a
caller as a bare ``sqlite3`` error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...exceptions import ImproperlyConfigured, StoreUnavailable
from .._local import refuse_network_fs
from ._schema import migrate

__all__ = ["Connection"]

logger = logging.getLogger("celery_checkpoint.store.sqlite")

_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_NEEDS = (3, 35, 0)
# Connections inherited across fork: referenced for ever, never closed (see above).
_INHERITED: list[sqlite3.Connection] = []


def _step(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> tuple[list[Any], int]:
    # Every row is fetched: an autocommit statement commits only when it has run to the end.
    cursor = db.execute(sql, params)
    rows = cursor.fetchall()
    return rows, cursor.rowcount


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc)
    return "locked" in text or "busy" in text


class Connection:
    """The database file and this process's connection to it."""

    def __init__(self, path: Path, *, busy_timeout: float, allow_network_fs: bool) -> None:
        if sqlite3.sqlite_version_info < _NEEDS:
            raise ImproperlyConfigured(
                f"the SQLite store needs SQLite {'.'.join(map(str, _NEEDS))} or newer (for "
                f"UPDATE ... RETURNING); this Python links SQLite {sqlite3.sqlite_version}"
            )
        self.path = path
        self.busy_timeout = float(busy_timeout)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        _OPEN.add(self)
        self._create_file(allow_network_fs)
        db = self._connection()
        try:
            before, after = self._retry(lambda: migrate(db, where=str(path)))
        except sqlite3.Error as exc:
            raise self._unavailable("open", "*", exc) from exc
        if before != after:
            logger.info("checkpoint store %s: schema %d -> %d", path, before, after)

    def _create_file(self, allow_network_fs: bool) -> None:
        """Create the directory (0700) and the database file (0600) if missing.

        SQLite gives its ``-wal`` and ``-shm`` files the database file's mode,
        so all three stay private: records hold personal data.
        """
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not allow_network_fs:
                refuse_network_fs(
                    directory,
                    "the SQLite store",
                    "POSIX locks and fsync shared by every process",
                    "the PostgreSQL or Redis store",
                )
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if not os.access(self.path, os.R_OK | os.W_OK):
                raise StoreUnavailable(
                    f"cannot open the checkpoint store at {self.path}",
                    PermissionError(errno.EACCES, "database file is not writable", str(self.path)),
                ) from None
            return
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the checkpoint store at {self.path}", exc) from exc
        os.close(fd)

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path,
                # No SQLite busy handler: it sleeps 1, 2, 5, 10... ms between tries,
                # several times the length of a transition here. _retry waits
                # from 100 us up instead, with jitter, until busy_timeout.
                timeout=0,
                isolation_level=None,  # autocommit: transactions are begun explicitly
                check_same_thread=False,  # shared by threads under self._lock
                cached_statements=256,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the checkpoint store at {self.path}", exc) from exc
        try:
            mode = self._retry(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone())
            if mode is None or str(mode[0]).lower() != "wal":
                raise ImproperlyConfigured(
                    f"checkpoint store {self.path}: SQLite refused WAL mode ({mode and mode[0]}); "
                    "the store needs a local filesystem with shared memory"
                )
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            db.close()
            if "not a database" in str(exc):
                raise ImproperlyConfigured(
                    f"checkpoint store {self.path} is not an SQLite database ({exc})"
                ) from exc
            raise self._unavailable("open", "*", exc) from exc
        except BaseException:
            db.close()
            raise
        return db

    def _connection(self) -> sqlite3.Connection:
        """This process's connection (opened again in a forked child). Under the lock."""
        pid = os.getpid()
        if self._db is None or self._pid != pid:
            if self._db is not None:
                _INHERITED.append(self._db)  # the parent's: never closed here
            self._db = None
            self._db = self._open()
            self._pid = pid
        return self._db

    def after_fork_in_child(self) -> None:
        """A lock held by another thread at the fork stays held for ever in the child:
        take a new one; and set the parent's connection aside before anything in the
        child can use or close it."""
        self._lock = threading.Lock()
        if self._db is not None:
            _INHERITED.append(self._db)
            self._db = None

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            elif self._db is not None:
                _INHERITED.append(self._db)
            self._db = None

    # -- errors and waiting ------------------------------------------------------------

    def _unavailable(self, action: str, run_id: str, exc: BaseException) -> StoreUnavailable:
        what = f"{action} of run {run_id!r}" if run_id != "*" else action
        if isinstance(exc, sqlite3.Error) and _is_busy(exc):
            return StoreUnavailable(
                f"checkpoint store {self.path}: {what} waited {self.busy_timeout:g} s for the "
                "database lock, held by another process (a long transaction or a stuck "
                "one); nothing was changed",
                exc,
            )
        return StoreUnavailable(f"checkpoint store {self.path}: {what} failed", exc)

    def _retry(self, call: Any, *args: Any) -> Any:
        """``call(*args)``, again while SQLite says busy, until ``busy_timeout`` has passed."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.0001
        while True:
            try:
                return call(*args)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 1.5, 0.01)

    # -- what the store calls ------------------------------------------------------------

    @contextlib.contextmanager
    def write(
        self, action: str, run_id: str, *, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), durable when it returns.

        An exception inside rolls it back and nothing is changed; an ``sqlite3``
        error becomes ``StoreUnavailable``. ``durable=False`` commits without
        the fsync (``synchronous=NORMAL`` for this transaction): still atomic,
        and kept through any crash of the process, but a power cut may lose it
        -- together with nothing else, since the next durable commit of any
        process fsyncs the WAL up to its own end.
        """
        with self._lock:
            db: sqlite3.Connection | None = None
            try:
                db = self._connection()
                if not durable:
                    db.execute("PRAGMA synchronous=NORMAL")
                self._retry(db.execute, "BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._durable_again(db, durable)
                raise self._unavailable(action, run_id, exc) from exc
            try:
                try:
                    yield db
                except BaseException as exc:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise self._unavailable(action, run_id, exc) from exc
                    raise
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise self._unavailable(action, run_id, exc) from exc
            finally:
                self._durable_again(db, durable)

    @staticmethod
    def _durable_again(db: sqlite3.Connection | None, durable: bool) -> None:
        if not durable and db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA synchronous=FULL")

    def change(
        self,
        action: str,
        run_id: str,
        sql: str,
        params: Sequence[Any] = (),
        *,
        durable: bool = True,
    ) -> tuple[list[Any], int]:
        """One statement as its own transaction (its rows if it returns any, and how
        many rows it changed); ``durable`` as for :meth:`write`.

        SQLite takes the write lock before the statement reads, so its ``WHERE``
        is a compare-and-set. ``sqlite3.IntegrityError`` (a constraint) is the
        caller's to handle; other ``sqlite3`` errors become ``StoreUnavailable``.
        """
        with self._lock:
            db: sqlite3.Connection | None = None
            try:
                db = self._connection()
                if not durable:
                    db.execute("PRAGMA synchronous=NORMAL")
                result: tuple[list[Any], int] = self._retry(_step, db, sql, params)
                return result
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise self._unavailable(action, run_id, exc) from exc
            finally:
                self._durable_again(db, durable)

    def one(self, action: str, run_id: str, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a read (one statement: one consistent snapshot), or None."""
        with self._lock:
            try:
                db = self._connection()
                return self._retry(lambda: db.execute(sql, params).fetchone())
            except sqlite3.Error as exc:
                raise self._unavailable(action, run_id, exc) from exc

    def all(self, action: str, run_id: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read (one statement: one consistent snapshot)."""
        with self._lock:
            try:
                db = self._connection()
                rows: list[Any] = self._retry(lambda: db.execute(sql, params).fetchall())
                return rows
            except sqlite3.Error as exc:
                raise self._unavailable(action, run_id, exc) from exc


_OPEN: weakref.WeakSet[Connection] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for conn in list(_OPEN):
        conn.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
