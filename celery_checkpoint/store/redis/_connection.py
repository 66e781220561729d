"""Opening a Redis store: the URL, the client, and the server checks.

:class:`Connection` turns a URL (``redis://``, ``rediss://``, ``unix://``, with
``?prefix=``) or a user's client into a client with no automatic retries,
checks the server (version, cluster mode, eviction policy, persistence), loads
the Lua scripts, and makes the calls: idempotent reads retried with backoff,
transitions sent once (``EVALSHA``, reloading a script the server lost). A
password in the URL never appears in a message: it is shown as ``***``.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import logging
import socket
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ...exceptions import ImproperlyConfigured, StoreUnavailable
from .._urls import redact
from ._codec import text

__all__ = ["Connection", "import_redis", "redact"]

logger = logging.getLogger("celery_checkpoint.store.redis")

T = TypeVar("T")

_MIN_VERSION = (5, 0)
_CLUSTER_DB = (
    "{} is a Redis Cluster node: cluster mode has database 0 only; drop the database from the URL"
)
#: Scripts that act on one run: they get the run prelude (see scripts.lua).
_RUN_SCRIPTS = frozenset(
    {
        "save",
        "claim",
        "request_resume",
        "heartbeat",
        "complete",
        "release",
        "cancel",
        "rearm",
        "quarantine",
        "key_check",
        "restore",
        "mark_delivered",
    }
)
#: Scripts that act on one business key: they get the key prelude.
_KEY_SCRIPTS = frozenset({"key_bind", "key_settle", "key_answer"})


def import_redis() -> Any:
    try:
        return importlib.import_module("redis")
    except ImportError as exc:
        raise ImproperlyConfigured(
            "the Redis checkpoint store needs the redis driver: "
            "pip install 'celery-checkpoint[redis]'"
        ) from exc


def _scripts_source() -> dict[str, str]:
    """The scripts of ``scripts.lua``, each with the preludes it needs."""
    source = resources.files(__package__).joinpath("scripts.lua").read_text("utf-8")
    sections: dict[str, builtins.list[str]] = {}
    current: builtins.list[str] = []
    for line in source.splitlines():
        if line.startswith("--- @"):
            current = sections.setdefault(line[len("--- @") :].split()[0], [])
            continue
        current.append(line)
    prelude = "\n".join(sections.pop("prelude"))
    run_prelude = "\n".join(sections.pop("run-prelude"))
    key_prelude = "\n".join(sections.pop("key-prelude"))
    out: dict[str, str] = {}
    for name, lines in sections.items():
        parts = [prelude]
        if name in _RUN_SCRIPTS:
            parts.append(run_prelude)
        elif name in _KEY_SCRIPTS:
            parts.append(key_prelude)
        out[name] = "\n".join([*parts, *lines])
    return out


class Connection:
    """A checked client of one Redis server or cluster, and the store's scripts."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        eviction: Literal["refuse", "warn"],
        client: Any,
    ) -> None:
        redis = import_redis()
        if eviction not in ("refuse", "warn"):
            raise ImproperlyConfigured(
                f"eviction={eviction!r}: use 'refuse' (the default) or 'warn'"
            )
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_prefix = [value for key, value in query if key == "prefix"]
        # Cut the query by hand: urlunsplit would turn "unix:///path" into "unix:/path".
        kept = urlencode([(k, v) for k, v in query if k != "prefix"])
        client_url = url.partition("?")[0] + (f"?{kept}" if kept else "")
        if url_prefix:
            if prefix != "checkpoint" and prefix != url_prefix[-1]:
                raise ImproperlyConfigured(
                    f"two key prefixes for the Redis store: {url_prefix[-1]!r} in the URL and "
                    f"prefix={prefix!r}; give one"
                )
            prefix = url_prefix[-1]
        if not prefix or "{" in prefix or "}" in prefix:
            raise ImproperlyConfigured(
                f"invalid Redis key prefix {prefix!r}: give a non-empty prefix without braces "
                "(braces would change the hash tag of every key)"
            )
        self.prefix = prefix
        self.display = redact(url)
        self.errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            redis.exceptions.RedisClusterException,
            OSError,
        )
        self._no_script: type[BaseException] = redis.exceptions.NoScriptError
        self._conn_errors: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            socket.timeout,
        )
        retry_mod = importlib.import_module("redis.retry")
        backoff = importlib.import_module("redis.backoff")
        #: reads only: a transition is never re-sent behind the caller's back
        self._read_retry: Any = retry_mod.Retry(
            backoff.ExponentialBackoff(cap=1.0, base=0.05), 4, self._conn_errors
        )
        self._owns_client = client is None
        if client is None:
            try:
                client = redis.Redis.from_url(
                    client_url, retry=retry_mod.Retry(backoff.NoBackoff(), 0)
                )
            except ValueError as exc:
                raise ImproperlyConfigured(f"bad Redis URL {self.display!r}: {exc}") from exc
        else:
            self._check_client(client)
        self.client: Any = client
        try:
            self._check_server(eviction, client_url if self._owns_client else None)
        except BaseException:
            self.close()
            raise
        self.scripts: dict[str, Any] = {
            name: self.client.register_script(source) for name, source in _scripts_source().items()
        }

    # -- opening ---------------------------------------------------------------

    def _check_client(self, client: Any) -> None:
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            kwargs = pool.connection_kwargs
            retry = kwargs.get("retry")
        else:  # a cluster client: no single pool
            kwargs = client.get_connection_kwargs()
            retry = getattr(client, "retry", None)
            if getattr(client, "cluster_error_retry_attempts", 0):
                logger.warning(
                    "the Redis Cluster client given to the checkpoint store re-sends commands "
                    "after connection errors (cluster_error_retry_attempts=%d): a transition "
                    "whose reply was lost may be applied twice. Set it to 0",
                    client.cluster_error_retry_attempts,
                )
        if kwargs.get("decode_responses"):
            raise ImproperlyConfigured(
                "the Redis client given to the checkpoint store has decode_responses=True: "
                "give it a client with decode_responses=False (records are bytes)"
            )
        if retry is not None and retry.get_retries() > 0:
            logger.warning(
                "the Redis client given to the checkpoint store retries commands "
                "(%d retries): a transition whose reply was lost may be re-sent and applied "
                "twice. Give it retry=Retry(NoBackoff(), 0)",
                retry.get_retries(),
            )

    def _check_server(self, eviction: str, client_url: str | None) -> None:
        redis = import_redis()
        try:
            with self.io("open", "*"):
                self.client.ping()
                info = self.client.info("server")
        except StoreUnavailable as exc:
            if isinstance(exc.cause, redis.ResponseError) and "cluster mode" in str(exc.cause):
                raise ImproperlyConfigured(_CLUSTER_DB.format(self.display)) from exc
            raise
        version = str(info.get("redis_version", "0"))
        parsed = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parsed < _MIN_VERSION:
            raise ImproperlyConfigured(
                f"Redis {version} at {self.display} is too old for the checkpoint store: "
                "it needs 5.0 or newer (scripts must replicate their effects)"
            )
        if info.get("redis_mode") == "cluster" and not self._is_cluster_client():
            if client_url is None:
                raise ImproperlyConfigured(
                    f"{self.display} is a Redis Cluster node but the client given to the "
                    "checkpoint store is not a cluster client: pass a redis.cluster.RedisCluster"
                )
            self._open_cluster(redis, client_url)
        try:
            with self.io("open", "*"):
                policy = text(self.client.config_get("maxmemory-policy")["maxmemory-policy"])
        except (StoreUnavailable, KeyError) as exc:
            cause = exc.cause if isinstance(exc, StoreUnavailable) else exc
            if isinstance(cause, redis.ResponseError) or isinstance(exc, KeyError):
                logger.warning(
                    "cannot read maxmemory-policy from %s (%s): make sure it is noeviction, "
                    "or Redis may evict checkpoints",
                    self.display,
                    cause,
                )
                return
            raise
        if policy.startswith("allkeys-"):
            message = (
                f"Redis at {self.display} has maxmemory-policy {policy}: it may evict "
                "checkpoints when memory runs short, losing paused runs. Set "
                "maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in "
                "redis.conf), or use a Redis instance of its own for checkpoints"
            )
            if eviction == "refuse":
                raise ImproperlyConfigured(message + " (or open with eviction='warn')")
            logger.warning("%s", message)
        elif policy.startswith("volatile-"):
            logger.info(
                "Redis maxmemory-policy is %s: accepted, since checkpoint keys have no TTL",
                policy,
            )
        self._check_persistence()

    def _check_persistence(self) -> None:
        try:
            with self.io("open", "*"):
                aof = self.client.info("persistence").get("aof_enabled")
                save = text(self.client.config_get("save").get("save", ""))
        except StoreUnavailable:
            return  # CONFIG disabled: the eviction warning said so
        if not aof and not save.strip():
            logger.warning(
                "Redis at %s has no persistence (no AOF, no RDB snapshots): a restart of the "
                "server loses every checkpoint. Use appendonly yes with appendfsync always "
                "(or everysec, losing up to ~1 s on a crash)",
                self.display,
            )

    def _is_cluster_client(self) -> bool:
        cluster = importlib.import_module("redis.cluster")
        return isinstance(self.client, cluster.RedisCluster)

    def _open_cluster(self, redis: Any, client_url: str) -> None:
        """Replace the single-node client by a cluster client on the same URL."""
        cluster = importlib.import_module("redis.cluster")
        parts = urlsplit(client_url)
        if parts.path.strip("/") not in ("", "0"):
            raise ImproperlyConfigured(_CLUSTER_DB.format(self.display))
        self.client.close()
        retry_mod = importlib.import_module("redis.retry")
        backoff = importlib.import_module("redis.backoff")
        with self.io("open", "*"):
            # No automatic retries: a transition whose reply was lost must not be
            # re-sent behind the caller's back (redirections are still followed).
            self.client = cluster.RedisCluster.from_url(
                urlunsplit(parts._replace(path="")), retry=retry_mod.Retry(backoff.NoBackoff(), 0)
            )
        if hasattr(self.client, "cluster_error_retry_attempts"):
            # redis-py 5 re-sends on connection errors by this count, whatever ``retry`` says.
            self.client.cluster_error_retry_attempts = 0
        # A failover in progress is worth waiting out, for an idempotent read.
        self._read_retry.update_supported_errors([redis.exceptions.ClusterDownError])

    def close(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.client.close()

    # -- calls -----------------------------------------------------------------

    @contextlib.contextmanager
    def io(self, action: str, run_id: str) -> Iterator[None]:
        try:
            yield
        except self.errors as exc:
            raise self.unavailable(action, run_id, exc) from exc

    def unavailable(self, action: str, run_id: str, exc: BaseException) -> StoreUnavailable:
        what = action if run_id == "*" else f"{action} of run {run_id!r}"
        return StoreUnavailable(f"checkpoint store {self.display}: {what} failed", exc)

    def read(self, action: str, run_id: str, do: Callable[[], T]) -> T:
        """An idempotent read, retried with backoff on connection errors."""
        with self.io(action, run_id):
            result: T = self._read_retry.call_with_retry(do, lambda _error: None)
            return result

    def evalsha(self, script: str, key: str, *args: Any) -> builtins.list[Any]:
        """Run a script once on one declared key; never retried. Raises redis' errors."""
        code = self.scripts[script]
        try:
            # EVALSHA straight through the client: redis-py's Script wrapper costs
            # a noticeable share of a round trip here (it imports on every call).
            result: builtins.list[Any] = self.client.evalsha(code.sha, 1, key, *args)
        except self._no_script:
            # The server lost its scripts (restart, SCRIPT FLUSH, failover) and ran
            # nothing: load the script and send the call again.
            code.sha = self.client.script_load(code.script)
            result = self.client.evalsha(code.sha, 1, key, *args)
        return result
