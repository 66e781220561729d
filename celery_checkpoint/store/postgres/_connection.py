"""Opening a PostgreSQL store: the URL, the connection pool, and how calls meet errors.

:class:`Connection` turns a ``postgresql://`` (or ``postgres://``) URL into a
small ``psycopg_pool.ConnectionPool`` of autocommit connections whose session
time zone is UTC. The pool is made when the store opens, and made again in a
process forked from the one that made it: a child must never talk over its
parent's sockets, nor close them (closing sends the server a Terminate that
would end the parent's session), so the inherited sockets are pointed at
``/dev/null`` and the child opens its own.

Calls come in two kinds. An idempotent read is retried a couple of times with
backoff when the connection fails. A transition is sent once: if its reply is
lost it may or may not have been applied -- whole, since every transition is
one statement or one transaction -- and the caller gets ``StoreUnavailable``
with the cause. Before a connection leaves the pool, a non-blocking look at its
socket drops one the server has closed meanwhile (a restart,
``pg_terminate_backend``), so that a transition is not sent on it in vain; the
pool replaces it in the background.

A password in the URL (``user:secret@`` or ``?password=``) never appears in a
message or a log line: it is shown as ``***``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from ...exceptions import ImproperlyConfigured, StoreUnavailable
from .._urls import redact
from ._schema import SCHEMA_NAME

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["DEFAULT_SCHEMA", "Connection", "import_driver", "redact"]

logger = logging.getLogger("celery_checkpoint.store.postgres")

T = TypeVar("T")

DEFAULT_SCHEMA = "celery_checkpoint"
#: Delays before the retries of a read whose connection failed.
_READ_BACKOFF = (0.05, 0.2)
#: Pools left behind by a fork: kept referenced so that collecting them never
#: runs their shutdown code in the child (their sockets already point at /dev/null).
_ABANDONED: list[Any] = []
_fork_lock = threading.Lock()


def _reset_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_fork_lock)


def import_driver() -> tuple[ModuleType, ModuleType]:
    """psycopg and psycopg_pool, or ``ImproperlyConfigured`` naming the extra."""
    try:
        return importlib.import_module("psycopg"), importlib.import_module("psycopg_pool")
    except ImportError as exc:
        raise ImproperlyConfigured(
            "the PostgreSQL checkpoint store needs psycopg 3 and psycopg_pool: "
            "pip install 'celery-checkpoint[postgres]'"
        ) from exc


def _split_url(url: str, schema: str | None) -> tuple[str, str]:
    """The libpq connection URL (our own parameters taken out) and the schema.

    The other parameters are passed on byte for byte: libpq decodes only %XX,
    so re-encoding them (a space as '+') would change what they say.
    """
    base, _, query = url.partition("?")
    items = [item for item in query.split("&") if item]
    ours = [item for item in items if item.partition("=")[0] == "schema"]
    in_url = [unquote(item.partition("=")[2]) for item in ours]
    if in_url and schema is not None and schema != in_url[-1]:
        raise ImproperlyConfigured(
            f"two schemas for the PostgreSQL store: {in_url[-1]!r} in the URL and "
            f"schema={schema!r}; give one"
        )
    chosen = in_url[-1] if in_url else (schema or DEFAULT_SCHEMA)
    if not SCHEMA_NAME.fullmatch(chosen):
        raise ImproperlyConfigured(
            f"invalid schema name {chosen!r} for the PostgreSQL store: use 1-63 characters "
            "of [A-Za-z0-9_], not starting with a digit"
        )
    kept = [item for item in items if item not in ours]
    if not any(item.partition("=")[0] == "connect_timeout" for item in kept):
        kept.append("connect_timeout=10")
    # Cut the query by hand: urlunsplit would turn "postgresql:///db" into "postgresql:/db".
    return f"{base}?{'&'.join(kept)}", chosen


class Connection:
    """A pool of connections to one PostgreSQL database, and the calls made through it."""

    def __init__(self, url: str, *, schema: str | None, pool_size: int, timeout: float) -> None:
        self.psycopg, self._pool_module = import_driver()
        if pool_size < 1:
            raise ImproperlyConfigured(f"pool_size={pool_size!r}: give at least 1")
        self.display = redact(url)
        self.conninfo, self.schema = _split_url(url, schema)
        self.pool_size = pool_size
        self.timeout = float(timeout)
        errors = self.psycopg.errors
        #: the driver's errors, all mapped to StoreUnavailable
        self.errors: tuple[type[BaseException], ...] = (self.psycopg.Error,)
        #: failures after which a read is worth sending again (not a pool timeout:
        #: that already waited)
        self._retryable: tuple[type[BaseException], ...] = (
            self.psycopg.OperationalError,
            self.psycopg.InterfaceError,
        )
        self._not_retryable: tuple[type[BaseException], ...] = (
            self._pool_module.PoolTimeout,
            self._pool_module.PoolClosed,
            errors.QueryCanceled,
        )
        self._ok = self.psycopg.pq.ConnStatus.OK
        self._pid = os.getpid()
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pool: Any = None
        self.closed = False

    # -- opening -----------------------------------------------------------------

    def connect(self) -> PgConnection[Any]:
        """One connection outside the pool (to open the store): its failure names the cause."""
        try:
            conn: PgConnection[Any] = self.psycopg.connect(self.conninfo, autocommit=True)
        except self.psycopg.ProgrammingError as exc:  # a malformed URL or unknown option
            raise ImproperlyConfigured(f"bad PostgreSQL URL {self.display!r}: {exc}") from exc
        except self.errors as exc:
            raise self.unavailable("open", "*", exc) from exc
        try:
            self._configure(conn)
        except self.errors as exc:
            conn.close()
            raise self.unavailable("open", "*", exc) from exc
        return conn

    def open_pool(self) -> None:
        self._pool = self._pool_module.ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=self.timeout,
            name=f"celery-checkpoint {self.display}",
            num_workers=1,
            open=True,
        )

    def _configure(self, conn: PgConnection[Any]) -> None:
        # Timestamps come back as UTC datetimes. Each statement is prepared on its
        # second use and then runs a generic plan: every one is a lookup by key or a
        # walk of a partial index, so planning it again per call (PostgreSQL's
        # default for the first executions) would only cost time.
        conn.execute("SET TIME ZONE 'UTC'; SET plan_cache_mode = force_generic_plan")
        conn.prepare_threshold = 1
        self._connections.add(conn)

    def _alive(self, conn: PgConnection[Any]) -> bool:
        """Whether the server kept ``conn`` open while it sat in the pool; no round trip.

        An idle connection has nothing to read unless the server is leaving (a
        restart, ``pg_terminate_backend``): then libpq reads its notice and the
        end of the stream and calls the connection broken.
        """
        pgconn = conn.pgconn
        if pgconn.status != self._ok:
            return False
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        if not poller.poll(0):
            return True
        try:
            pgconn.consume_input()
        except self.psycopg.OperationalError:
            return False
        return False  # something arrived unasked: the notice of a session ending

    # -- after a fork ------------------------------------------------------------

    def _pool_here(self) -> Any:
        if self._pid != os.getpid():
            with _fork_lock:
                if self._pid != os.getpid():
                    self._leave_parents_pool()
        if self._pool is None:
            raise self.psycopg.OperationalError("the checkpoint store is closed")
        return self._pool

    def _leave_parents_pool(self) -> None:
        """In a forked child: abandon the parent's connections without a word to the server."""
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for conn in list(self._connections):
                with contextlib.suppress(Exception):
                    os.dup2(devnull, conn.pgconn.socket)
        finally:
            os.close(devnull)
        _ABANDONED.append((self._pool, list(self._connections)))
        self._connections = weakref.WeakSet()
        self._pid = os.getpid()
        self._pool = None
        if not self.closed:
            self.open_pool()

    def close(self) -> None:
        self.closed = True
        if self._pid != os.getpid():
            return  # the parent's pool: not ours to close
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.close()

    # -- calls -------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[PgConnection[Any]]:
        """A pooled connection the server has not closed meanwhile, as far as can be told."""
        pool = self._pool_here()
        conn = pool.getconn()
        # Dead ones are closed and handed back (the pool replaces them), at once:
        # the pool's own check would wait a second or more after each one.
        for _ in range(self.pool_size + 1):
            if self._alive(conn):
                break
            conn.close()
            pool.putconn(conn)
            conn = pool.getconn()
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def unavailable(self, action: str, run_id: str, exc: BaseException) -> StoreUnavailable:
        what = action if run_id == "*" else f"{action} of run {run_id!r}"
        return StoreUnavailable(f"checkpoint store {self.display}: {what} failed", exc)

    def read(self, action: str, run_id: str, do: Callable[[PgConnection[Any]], T]) -> T:
        """An idempotent read, sent again (after a short wait) if its connection failed."""
        for delay in (*_READ_BACKOFF, None):
            try:
                with self.connection() as conn:
                    return do(conn)
            except self._not_retryable as exc:
                raise self.unavailable(action, run_id, exc) from exc
            except self._retryable as exc:
                if delay is None:
                    raise self.unavailable(action, run_id, exc) from exc
                logger.debug("%s failed, trying again in %.2fs: %s", action, delay, exc)
                time.sleep(delay)
            except self.errors as exc:
                raise self.unavailable(action, run_id, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def write(self, action: str, run_id: str, do: Callable[[PgConnection[Any]], T]) -> T:
        """A transition: sent once. A lost reply raises ``StoreUnavailable``; it may
        have been applied, whole, or not at all."""
        try:
            with self.connection() as conn:
                return do(conn)
        except self.errors as exc:
            raise self.unavailable(action, run_id, exc) from exc
