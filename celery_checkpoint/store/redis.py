"""The Redis store: checkpoints shared by workers on several machines.

Open it with ``CheckpointStore.open("redis://host:6379/0")`` (also ``rediss://``
for TLS and ``unix:///path/redis.sock?db=0``); keys live under ``prefix``
(default ``checkpoint``, or ``?prefix=...`` in the URL). Needs
``pip install 'celery-checkpoint[redis]'`` and Redis 5 or newer (or Valkey).

Atomicity
    Every transition -- save, claim, request_resume, heartbeat, complete,
    release, cancel and the re-arm of one orphaned run -- is one Lua script
    (``redis.lua`` beside this module) run in one round trip. Redis runs a script
    alone, so of concurrent claims exactly one wins and no caller sees half a
    transition. Each script does its reads and checks before its first write, so
    an error leaves nothing half-applied. Lease expiry is taken from the server's
    ``TIME`` inside the scripts, never from a worker's clock, and is stored as
    server milliseconds. A transition that fails in flight (connection lost,
    timeout) raises ``StoreUnavailable`` and is *not* retried: it may or may not
    have been applied, whole. Idempotent reads are retried with backoff.

Durability -- configure the server, this module cannot
    A returned write is in the server's memory; whether it survives the server
    dying depends on its persistence:

    * ``appendonly yes`` + ``appendfsync always``: nothing acknowledged is lost.
    * ``appendonly yes`` + ``appendfsync everysec`` (Redis' default for AOF): a
      crash or power cut of the server loses up to about one second of writes.
    * RDB snapshots only, or no persistence: a crash loses everything since the
      last snapshot -- or everything. The shared test server runs this way
      (no persistence); never run production checkpoints like that.

    Replication is asynchronous: a failover to a replica can lose the last
    writes the old primary acknowledged.

Eviction
    A checkpoint must never be evicted. Opening the store reads
    ``maxmemory-policy``: ``noeviction`` is right; ``volatile-*`` only evicts keys
    with a TTL and this store sets none, so it is accepted (and logged);
    ``allkeys-*`` is refused with ``ImproperlyConfigured`` (``eviction="warn"``
    opens anyway with a warning). If ``CONFIG`` is disabled the policy cannot be
    read and a warning says so.

Key layout (``P`` is the prefix; ``G`` the run's group, ``P:{gg}:``)::

    G:run:<id>              HASH: the record JSON as last saved (field ``record``);
                            the fields transitions change without rewriting it
                            (last_token, ended_by, recoveries, status, pause_seq,
                            step, deadline, ended_reason, resume, resume_id,
                            resume_seq, resume_status, resume_error), which
                            override the JSON; and the lease (lease_token, lease_owner,
                            lease_host, lease_claimed, lease_expires)
    G:run:<id>/ended        the same hash, renamed, of a completed, cancelled,
                            expired or failed run
    G:run:<id>/corrupt      an unparsable run moved aside, as it was; a later one
                            goes to ``/corrupt.1``, ``/corrupt.2``...
    G:paused                ZSET of the group's runs (paused or in flight) by paused_at (us)
    G:inflight              ZSET of the group's claimed runs by lease expiry (server ms)
    G:owners:<host>         SET of the group's runs claimed by workers on <host>
    G:pending               ZSET of pending resume requests by last sent (server us)
    G:deadlines             ZSET of pauses with a timeout by expires_at (us)
    G:ended                 ZSET of ended runs by when they ended (server ms), for
                            ``prune_ended``

A run belongs to one of 16 groups, ``crc32(run_id) % 16`` written as two hex
digits; ``{gg}`` is the hash tag of every key of the group -- the run's own
keys and the indexes that list it. Each script therefore touches keys of a
single hash slot: it runs unchanged on **Redis Cluster**, where the 16 groups
spread over the primaries. ``'/'`` cannot occur in a run id, so no run's key is
another run's suffixed key. A URL pointing at a cluster node opens a
``RedisCluster`` client by itself (cluster mode has database 0 only); every
primary should have the eviction policy and persistence described above, which
are checked on the node the URL names.

``count`` is one ``ZCARD`` per group in one pipeline (``stats`` one small script
per group); ``list`` pages through each group's ``paused`` index with
``ZSCAN``; recovery reads each group's ``inflight`` index up to the server's now
and this host's ``owners`` sets -- never the whole keyspace (no ``KEYS``/
``SCAN``). Times: lease expiry in server milliseconds, as asked of a lease; the
pending index in server microseconds; ``paused_at`` and ``expires_at`` (the
record's own times) in microseconds.

Each script is called with one declared key, the run's hash key, and derives
the run's other keys and its group's index keys from the group prefix: one
declared key instead of nine saves a noticeable share of each round trip's
cost in redis-py. Redis Cluster allows a script to reach keys it did not
declare when they are in the declared key's slot, which the shared hash tag
guarantees. Sentinel works too: pass a client made by
``redis.sentinel.Sentinel`` as ``client=``.

Pass your own ``client=`` (a ``redis.Redis`` with ``decode_responses=False``) to
control pooling or Sentinel. Give it no automatic retries
(``retry=Retry(NoBackoff(), 0)``): a client that silently re-sends a transition
after a lost reply may run it twice.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import importlib
import logging
import os
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import JsonValue, ValidationError

from ..exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImproperlyConfigured,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
    StoreUnavailable,
)
from ..model import Lease, Owner, PausedWorkflow, ResumeRequest, utcnow, validate_run_id
from .base import DEFAULT_LEASE_SECONDS, CheckpointStore, RunInfo

__all__ = ["RedisStore", "group_of"]

logger = logging.getLogger("celery_checkpoint.store.redis")

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_MIN_VERSION = (5, 0)
_PAGE = 100  # runs read per round trip by list()
_DUE_BATCH = 500  # pending requests examined per script run by due_resumes()
_CLUSTER_DB = (
    "{} is a Redis Cluster node: cluster mode has database 0 only; drop the database from the URL"
)
_GROUPS = 16  # run groups, each one hash tag (part of the key layout: never change it)
_ENDED_BY = frozenset({"repause", "release", "recovery", "cancel", "complete"})
_STATUSES = frozenset({"paused", "cancelled", "expired", "failed", "completed"})
_RESUME_STATUSES = frozenset({"pending", "failed"})
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
    }
)


def _import_redis() -> Any:
    try:
        return importlib.import_module("redis")
    except ImportError as exc:
        raise ImproperlyConfigured(
            "the Redis checkpoint store needs the redis driver: "
            "pip install 'celery-checkpoint[redis]'"
        ) from exc


def _scripts_source() -> dict[str, str]:
    """The scripts of ``redis.lua``, each with the preludes it needs."""
    text = resources.files(__package__).joinpath("redis.lua").read_text("utf-8")
    sections: dict[str, builtins.list[str]] = {}
    current: builtins.list[str] = []
    for line in text.splitlines():
        if line.startswith("--- @"):
            current = sections.setdefault(line[len("--- @") :].split()[0], [])
            continue
        current.append(line)
    prelude = "\n".join(sections.pop("prelude"))
    run_prelude = "\n".join(sections.pop("run-prelude"))
    out: dict[str, str] = {}
    for name, lines in sections.items():
        parts = [prelude, run_prelude] if name in _RUN_SCRIPTS else [prelude]
        out[name] = "\n".join([*parts, *lines])
    return out


def _us(when: datetime) -> int:
    """Microseconds since the epoch, exactly (naive datetimes are UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // _US


def _from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _wrong_type(error: BaseException | None) -> bool:
    """Whether Redis refused a command because the key holds another type."""
    return error is not None and "WRONGTYPE" in str(error)


def _not_a_hash(run_id: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(run_id, "its key is not a run hash")


def _split(pairs: Iterable[tuple[Any, Any]]) -> tuple[bytes | None, dict[str, str]]:
    """A run's hash: its record JSON, as stored (bytes: a corrupt record is moved
    aside unchanged), and its other fields as text."""
    record: bytes | None = None
    fields: dict[str, str] = {}
    for name, value in pairs:
        key = _text(name)
        if key == "record":
            record = value if isinstance(value, bytes) else str(value).encode()
        else:
            fields[key] = _text(value)
    return record, fields


def _split_flat(flat: builtins.list[Any]) -> tuple[bytes | None, dict[str, str]]:
    """:func:`_split` of a hash as a script returns it: a flat array of names and values."""
    it = iter(flat)
    return _split(zip(it, it, strict=True))


def _short(exc: Exception, data: bytes | str) -> str:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{first} ({len(data)} bytes)"


def _literal(value: str, allowed: frozenset[str], what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}")
    return value


def _resume_from(ctl: dict[str, str]) -> ResumeRequest | None:
    raw = ctl.get("resume")
    if raw is None:
        return None
    request = ResumeRequest.model_validate_json(raw)
    request.pause_seq = int(ctl["resume_seq"])
    request.status = _literal(ctl["resume_status"], _RESUME_STATUSES, "resume status")
    request.error = ctl.get("resume_error")
    return request


def _overlay(run: PausedWorkflow, ctl: dict[str, str]) -> None:
    """Apply the control fields, which transitions change after the JSON was written.

    Only fields that differ are assigned: a model's ``__setattr__`` is slow, and on
    the common path (claim of a fresh pause) nothing differs.
    """
    if not ctl:
        return
    ended_by = ctl.get("ended_by")
    updates: dict[str, Any] = {
        "last_token": int(ctl.get("last_token", run.last_token)),
        "lease_ended_by": None if ended_by is None else _literal(ended_by, _ENDED_BY, "lease end"),
        "recoveries": int(ctl.get("recoveries", run.recoveries)),
        "status": _literal(ctl.get("status", run.status), _STATUSES, "status"),
        "ended_reason": ctl.get("ended_reason"),
    }
    if "resume" in ctl or run.resume is not None:
        updates["resume"] = _resume_from(ctl)
    for name, value in updates.items():
        if getattr(run, name) != value:
            setattr(run, name, value)


def _lease_from(ctl: dict[str, str]) -> Lease:
    """The lease held in a run hash's ``lease_*`` fields."""
    return Lease(
        token=int(ctl["lease_token"]),
        owner=Owner.model_validate_json(ctl["lease_owner"]),
        claimed_at=_from_ms(int(ctl["lease_claimed"])),
        expires_at=_from_ms(int(ctl["lease_expires"])),
    )


def _ended_error(run_id: str, ctl: dict[str, str]) -> Exception:
    reason = ctl.get("ended_reason")
    why = f": {reason}" if reason else ""
    status = ctl.get("status", "cancelled")
    if status == "completed":
        done = _resume_from(ctl)
        return AlreadyResumed(
            run_id, done.request_id if done is not None else "<none>", completed=True
        )
    if status == "expired":
        return PauseExpired(f"run {run_id!r} expired at step {ctl.get('step')!r}{why}")
    return RunCancelled(f"run {run_id!r} was {status}{why}")


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStore(CheckpointStore):
    """Checkpoints in Redis, each transition one Lua script. See the module docstring."""

    url = "redis://, rediss://, unix://"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "checkpoint",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        eviction: Literal["refuse", "warn"] = "refuse",
        client: Any = None,
    ) -> None:
        super().__init__(lease_seconds=lease_seconds)
        redis = _import_redis()
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
        self._display = _redact(url)
        self._errors: tuple[type[BaseException], ...] = (
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
                raise ImproperlyConfigured(f"bad Redis URL {self._display!r}: {exc}") from exc
        else:
            self._check_client(client)
        self._client: Any = client
        #: the key base of each run group; see "Key layout" in the module docstring
        self._groups = [f"{prefix}:{{{g:02x}}}:" for g in range(_GROUPS)]
        self._owner: tuple[int, Owner, str] | None = None

        try:
            self._check_server(eviction, client_url if self._owns_client else None)
        except BaseException:
            self.close()
            raise
        self._scripts: dict[str, Any] = {
            name: self._client.register_script(source) for name, source in _scripts_source().items()
        }

    def __repr__(self) -> str:
        return f"RedisStore({self._display!r}, prefix={self.prefix!r})"

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
        redis = _import_redis()
        try:
            with self._io("open", "*"):
                self._client.ping()
                info = self._client.info("server")
        except StoreUnavailable as exc:
            if isinstance(exc.cause, redis.ResponseError) and "cluster mode" in str(exc.cause):
                raise ImproperlyConfigured(_CLUSTER_DB.format(self._display)) from exc
            raise
        version = str(info.get("redis_version", "0"))
        parsed = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parsed < _MIN_VERSION:
            raise ImproperlyConfigured(
                f"Redis {version} at {self._display} is too old for the checkpoint store: "
                "it needs 5.0 or newer (scripts must replicate their effects)"
            )
        if info.get("redis_mode") == "cluster" and not self._is_cluster_client():
            if client_url is None:
                raise ImproperlyConfigured(
                    f"{self._display} is a Redis Cluster node but the client given to the "
                    "checkpoint store is not a cluster client: pass a redis.cluster.RedisCluster"
                )
            self._open_cluster(redis, client_url)
        try:
            with self._io("open", "*"):
                policy = _text(self._client.config_get("maxmemory-policy")["maxmemory-policy"])
        except (StoreUnavailable, KeyError) as exc:
            cause = exc.cause if isinstance(exc, StoreUnavailable) else exc
            if isinstance(cause, redis.ResponseError) or isinstance(exc, KeyError):
                logger.warning(
                    "cannot read maxmemory-policy from %s (%s): make sure it is noeviction, "
                    "or Redis may evict checkpoints",
                    self._display,
                    cause,
                )
                return
            raise
        if policy.startswith("allkeys-"):
            message = (
                f"Redis at {self._display} has maxmemory-policy {policy}: it may evict "
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
            with self._io("open", "*"):
                aof = self._client.info("persistence").get("aof_enabled")
                save = _text(self._client.config_get("save").get("save", ""))
        except StoreUnavailable:
            return  # CONFIG disabled: the eviction warning said so
        if not aof and not save.strip():
            logger.warning(
                "Redis at %s has no persistence (no AOF, no RDB snapshots): a restart of the "
                "server loses every checkpoint. Use appendonly yes with appendfsync always "
                "(or everysec, losing up to ~1 s on a crash)",
                self._display,
            )

    def _is_cluster_client(self) -> bool:
        cluster = importlib.import_module("redis.cluster")
        return isinstance(self._client, cluster.RedisCluster)

    def _open_cluster(self, redis: Any, client_url: str) -> None:
        """Replace the single-node client by a cluster client on the same URL."""
        cluster = importlib.import_module("redis.cluster")
        parts = urlsplit(client_url)
        if parts.path.strip("/") not in ("", "0"):
            raise ImproperlyConfigured(_CLUSTER_DB.format(self._display))
        self._client.close()
        retry_mod = importlib.import_module("redis.retry")
        backoff = importlib.import_module("redis.backoff")
        with self._io("open", "*"):
            # No automatic retries: a transition whose reply was lost must not be
            # re-sent behind the caller's back (redirections are still followed).
            self._client = cluster.RedisCluster.from_url(
                urlunsplit(parts._replace(path="")), retry=retry_mod.Retry(backoff.NoBackoff(), 0)
            )
        if hasattr(self._client, "cluster_error_retry_attempts"):
            # redis-py 5 re-sends on connection errors by this count, whatever ``retry`` says.
            self._client.cluster_error_retry_attempts = 0
        # A failover in progress is worth waiting out, for an idempotent read.
        self._read_retry.update_supported_errors([redis.exceptions.ClusterDownError])

    def close(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                self._client.close()

    # -- plumbing ----------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, action: str, run_id: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise self._unavailable(action, run_id, exc) from exc

    def _unavailable(self, action: str, run_id: str, exc: BaseException) -> StoreUnavailable:
        what = action if run_id == "*" else f"{action} of run {run_id!r}"
        return StoreUnavailable(f"checkpoint store {self._display}: {what} failed", exc)

    def _read(self, action: str, run_id: str, do: Callable[[], T]) -> T:
        """An idempotent read, retried with backoff on connection errors."""
        with self._io(action, run_id):
            result: T = self._read_retry.call_with_retry(do, lambda _error: None)
            return result

    def _group(self, run_id: str) -> str:
        """The key base of the run's group (its hash tag)."""
        return self._groups[group_of(run_id)]

    def _run(self, script: str, action: str, run_id: str, *args: Any) -> builtins.list[Any]:
        """One transition: one script, one round trip, never retried."""
        group = self._group(run_id)
        code = self._scripts[script]
        call = (f"{group}run:{run_id}", run_id, group, *args)
        try:
            # EVALSHA straight through the client: redis-py's Script wrapper costs
            # a noticeable share of a round trip here (it imports on every call).
            try:
                result: builtins.list[Any] = self._client.evalsha(code.sha, 1, *call)
            except self._no_script:
                # The server lost its scripts (restart, SCRIPT FLUSH, failover) and ran
                # nothing: load the script and send the call again.
                code.sha = self._client.script_load(code.script)
                result = self._client.evalsha(code.sha, 1, *call)
        except self._errors as exc:
            if _wrong_type(exc):
                raise _not_a_hash(run_id) from exc
            raise self._unavailable(action, run_id, exc) from exc
        result[0] = _text(result[0])
        return result

    def _key(self, run_id: str, suffix: str = "") -> str:
        """A key of the run: its hash (no suffix), ``/ended``, ``/corrupt``..."""
        return f"{self._group(run_id)}run:{run_id}{suffix}"

    def _default_owner(self) -> tuple[Owner, str]:
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            owner = Owner.current()
            self._owner = (pid, owner, owner.model_dump_json())
        return self._owner[1], self._owner[2]

    def _record(self, run_id: str, body: bytes | str, ctl: dict[str, str]) -> PausedWorkflow:
        try:
            run = PausedWorkflow.from_json(body)
            _overlay(run, ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, _short(exc, body)) from exc
        if run.run_id != run_id:
            raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
        return run

    def _read_run(
        self, action: str, run_id: str, *, ended: bool = False
    ) -> tuple[bytes | None, dict[str, str]]:
        """The run's record JSON (None if there is no run) and its other fields."""
        key = self._key(run_id, "/ended" if ended else "")
        try:
            raw = self._read(action, run_id, lambda: self._client.hgetall(key))
        except StoreUnavailable as exc:
            if _wrong_type(exc.cause):
                raise _not_a_hash(run_id) from exc
            raise
        return _split(cast("dict[Any, Any]", raw).items())

    def _raw_value(self, run_id: str) -> bytes:
        """What a key that is not a run hash holds, if a string (to move it aside)."""
        with contextlib.suppress(Exception):
            value = self._client.get(self._key(run_id))
            if isinstance(value, bytes):
                return value
        return b""

    def _quarantine(self, run_id: str, body: bytes | str, exc: CorruptCheckpoint) -> None:
        """Move a corrupt run aside to ``.../corrupt`` (``/corrupt.1``... if taken),
        unless it changed meanwhile."""
        data = body.encode() if isinstance(body, str) else body
        try:
            result = self._run("quarantine", "quarantine", run_id, hashlib.sha1(data).hexdigest())
        except StoreUnavailable as err:
            logger.warning("could not move corrupt checkpoint %s aside: %s", run_id, err)
            return
        if result[0] == "ok":
            logger.warning("moved corrupt checkpoint aside to %s: %s", _text(result[1]), exc)

    # -- the contract --------------------------------------------------------------

    def save(
        self, paused: PausedWorkflow, *, token: int | None = None, create: bool = False
    ) -> None:
        run_id = validate_run_id(paused.run_id)
        if create and token is not None:
            raise ValueError("save(create=True) is a first pause: it takes no token")
        # The JSON is written as given. The control fields written beside it, and
        # last_token / lease_ended_by which the script decides, override it on read;
        # a field at its default (status paused, no recoveries) is left out.
        fields = ["pause_seq", str(paused.pause_seq), "step", paused.step]
        if paused.status != "paused":
            fields += ["status", paused.status]
        if paused.recoveries:
            fields += ["recoveries", str(paused.recoveries)]
        if paused.lease_ended_by is not None:
            fields += ["ended_by", paused.lease_ended_by]
        if paused.ended_reason is not None:
            fields += ["ended_reason", paused.ended_reason]
        if paused.expires_at is not None:
            fields += ["deadline", "1"]  # the run is in the deadline index
        resume = paused.resume
        if resume is not None:
            fields += [
                "resume",
                resume.model_dump_json(),
                "resume_id",
                resume.request_id,
                "resume_seq",
                str(resume.pause_seq),
                "resume_status",
                resume.status,
            ]
            if resume.error is not None:
                fields += ["resume_error", resume.error]
        if token is not None:
            fields += ["ended_by", "repause"]  # after the record's own, so it wins
        result = self._run(
            "save",
            "save",
            run_id,
            "create" if create else ("" if token is None else token),
            paused.to_json(),
            paused.last_token,
            _us(paused.paused_at),
            "" if paused.expires_at is None else _us(paused.expires_at),
            "" if resume is None else resume.status,
            *fields,
        )
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        if result[0] == "exists":
            raise CheckpointExists(run_id, _text(result[1]))
        if result[0] == "inflight":
            raise LeaseLost(
                run_id, f"the run is in flight under token {int(result[1])}; save with it"
            )

    def exists(self, run_id: str) -> bool:
        validate_run_id(run_id)
        keys = (self._key(run_id), self._key(run_id, "/ended"))  # one hash slot
        found: int = self._read("exists", run_id, lambda: self._client.exists(*keys))
        return found > 0

    def load(self, run_id: str) -> PausedWorkflow | None:
        validate_run_id(run_id)
        body, ctl = self._read_run("load", run_id)
        return None if body is None else self._record(run_id, body, ctl)

    def lease(self, run_id: str) -> Lease | None:
        validate_run_id(run_id)
        body, ctl = self._read_run("lease", run_id)
        run = None if body is None else self._record(run_id, body, ctl)
        if run is None or "lease_token" not in ctl:
            return None
        try:
            if int(ctl["lease_token"]) <= run.last_token:
                return None  # superseded by a later write
            return _lease_from(ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"lease: {exc}") from exc

    def claim(
        self,
        run_id: str,
        *,
        owner: Owner | None = None,
        lease_seconds: float | None = None,
        pause_seq: int | None = None,
    ) -> PausedWorkflow | None:
        validate_run_id(run_id)
        if owner is None:
            owner, owner_json = self._default_owner()
        else:
            owner_json = owner.model_dump_json()
        result = self._run(
            "claim",
            "claim",
            run_id,
            owner_json,
            owner.host,
            round(self._lease_seconds(lease_seconds) * 1000),
            "" if pause_seq is None else pause_seq,
        )
        if result[0] != "ok":
            return None
        _, flat, token, claimed_ms, expires_ms = result
        body, fields = _split_flat(flat)
        assert body is not None  # the script claims only a run with a record
        try:
            run = self._record(run_id, body, fields)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, corrupt, for list/recovery to move aside).
            with contextlib.suppress(StoreUnavailable):
                self._run("release", "claim", run_id, token, "0", "0", "")
            raise
        # Built without validation: every value is ours or the script's integers.
        run.lease = Lease.model_construct(
            token=token,
            owner=owner,
            claimed_at=_from_ms(claimed_ms),
            expires_at=_from_ms(expires_ms),
        )
        return run

    def request_resume(
        self,
        run_id: str,
        input: JsonValue,
        request_id: str,
        *,
        pause_seq: int | None = None,
        timed_out: bool = False,
    ) -> ResumeRequest:
        validate_run_id(run_id)
        request = ResumeRequest(
            request_id=request_id, input=input, pause_seq=pause_seq or 0, timed_out=timed_out
        )
        result = self._run(
            "request_resume",
            "request_resume",
            run_id,
            request_id,
            request.model_dump_json(),
            "" if pause_seq is None else pause_seq,
        )
        status = result[0]
        if status == "notfound":
            raise CheckpointNotFound(run_id)
        if status == "ended":
            _, ended = _split_flat(result[1])
            done = _resume_from(ended) if ended.get("status") == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise _ended_error(run_id, ended)
        if status == "rejected":
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause "
                f"{int(result[1])} (step {_text(result[2])!r})",
            )
        if status == "already":
            raise AlreadyResumed(run_id, _text(result[1]))
        if status == "busy":
            raise AlreadyResumed(run_id, f"<none: in flight under token {int(result[1])}>")
        try:
            accepted = _resume_from(_split_flat(result[1])[1])
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"resume request: {exc}") from exc
        assert accepted is not None
        return accepted

    def heartbeat(self, run_id: str, token: int, *, lease_seconds: float | None = None) -> Lease:
        validate_run_id(run_id)
        result = self._run(
            "heartbeat",
            "heartbeat",
            run_id,
            token,
            round(self._lease_seconds(lease_seconds) * 1000),
        )
        if result[0] != "ok":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        _, owner, claimed, expires = result
        return Lease(
            token=token,
            owner=Owner.model_validate_json(owner),
            claimed_at=_from_ms(int(claimed)),
            expires_at=_from_ms(int(expires)),
        )

    def complete(self, run_id: str, *, token: int | None = None) -> None:
        validate_run_id(run_id)
        result = self._run("complete", "complete", run_id, "" if token is None else token)
        if result[0] == "ok":
            return
        why = _text(result[1])
        if why == "ended":
            raise LeaseLost(run_id, f"the run was {_text(result[2])}")
        if why == "ended_by":
            raise LeaseLost(run_id, f"token {token} ended by {_text(result[2]) or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def release(self, run_id: str, token: int, *, error: str | None = None) -> None:
        validate_run_id(run_id)
        result = self._run(
            "release",
            "release",
            run_id,
            token,
            "1",
            "0" if error is None else "1",
            error or "",
        )
        if result[0] != "ok":
            raise LeaseLost(run_id, f"token {token} is not the current lease")

    def recover_orphaned(self) -> builtins.list[PausedWorkflow]:
        recovered: builtins.list[PausedWorkflow] = []
        host = socket.gethostname()
        for group in self._groups:
            self._recover_group(group, host, recovered)
        return recovered

    def _recover_group(
        self, group: str, host: str, recovered: builtins.list[PausedWorkflow]
    ) -> None:
        """Re-arm the group's runs whose lease expired or whose owner on this host died."""
        expired = self._read(
            "recover_orphaned",
            "*",
            lambda: self._scripts["due"](keys=[group + "inflight"], args=["", "ms"]),
        )
        seen: set[str] = set()
        for raw in expired:
            run_id = _text(raw)
            seen.add(run_id)
            self._rearm(run_id, "expired", "", "", recovered)
        members: set[Any] = self._read(
            "recover_orphaned", "*", lambda: self._client.smembers(f"{group}owners:{host}")
        )
        ours = sorted(run_id for run_id in ({_text(m) for m in members} - seen) if _valid(run_id))
        if not ours:
            return

        def leases() -> builtins.list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for run_id in ours:
                pipe.hmget(f"{group}run:{run_id}", "lease_token", "lease_owner")
            # A key of the wrong type is one corrupt run (_rearm moves it aside).
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        for run_id, reply in zip(ours, self._read("recover_orphaned", "*", leases), strict=True):
            if isinstance(reply, Exception):
                if not _wrong_type(reply):
                    raise self._unavailable("recover_orphaned", run_id, reply)
                self._rearm(run_id, "dead", "", host, recovered)
                continue
            token, owner_json = reply
            if token is None:
                self._rearm(run_id, "dead", "", host, recovered)  # drops the stale entry
                continue
            try:
                dead = Owner.model_validate_json(owner_json).is_dead_here()
            except (ValidationError, ValueError):
                dead = False
            if dead:
                self._rearm(run_id, "dead", int(token), host, recovered)

    def _rearm(
        self,
        run_id: str,
        mode: str,
        token: int | str,
        host: str,
        recovered: builtins.list[PausedWorkflow],
    ) -> None:
        if not _valid(run_id):
            return
        try:
            result = self._run("rearm", "recover_orphaned", run_id, mode, token, host)
        except CorruptCheckpoint as exc:  # its key is not a run hash
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, self._raw_value(run_id), exc)
            return
        if result[0] != "ok":
            return
        body, fields = _split_flat(result[1])
        assert body is not None  # the script re-arms only a run with a record
        try:
            run = self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, body, exc)
            return
        logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
        recovered.append(run)

    def cancel(
        self,
        run_id: str,
        *,
        reason: str | None = None,
        status: Literal["cancelled", "expired", "failed"] = "cancelled",
        token: int | None = None,
    ) -> PausedWorkflow | None:
        validate_run_id(run_id)
        if status not in ("cancelled", "expired", "failed"):
            raise ValueError(f"cancel status must be cancelled, expired or failed, not {status!r}")
        result = self._run(
            "cancel",
            "cancel",
            run_id,
            status,
            "0" if reason is None else "1",
            reason or "",
            "" if token is None else token,
        )
        if result[0] == "none":
            return None
        if result[0] == "corrupt":
            raise CorruptCheckpoint(run_id, f"the record is not JSON ({int(result[1])} bytes)")
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        body, fields = _split_flat(result[1])
        assert body is not None  # the script cancels only a run with a record
        try:
            return self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def ended(self, run_id: str) -> PausedWorkflow | None:
        validate_run_id(run_id)
        body, ctl = self._read_run("ended", run_id, ended=True)
        return None if body is None else self._record(run_id, body, ctl)

    def list(
        self,
        *,
        task: str | None = None,
        step: str | None = None,
        older_than: float | None = None,
    ) -> Iterator[RunInfo]:
        cutoff = None if older_than is None else utcnow() - timedelta(seconds=older_than)
        cutoff_us = None if cutoff is None else _us(cutoff)
        for group in self._groups:
            seen: set[str] = set()  # ZSCAN may return a member twice while the set rehashes
            cursor = 0

            def scan() -> tuple[int, builtins.list[tuple[bytes, float]]]:
                page: tuple[int, builtins.list[tuple[bytes, float]]]
                page = self._client.zscan(group + "paused", cursor, count=_PAGE)  # noqa: B023
                return page

            while True:
                cursor, page = self._read("list", "*", scan)
                batch: builtins.list[str] = []
                for member, score in page:
                    run_id = _text(member)
                    if run_id in seen or not _valid(run_id):
                        continue
                    seen.add(run_id)
                    if cutoff_us is not None and score > cutoff_us:
                        continue
                    batch.append(run_id)
                yield from self._list_batch(group, batch, task, step, cutoff)
                if int(cursor) == 0:
                    break

    def _list_batch(
        self,
        group: str,
        batch: builtins.list[str],
        task: str | None,
        step: str | None,
        cutoff: datetime | None,
    ) -> Iterator[RunInfo]:
        if not batch:
            return

        def do() -> builtins.list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for run_id in batch:
                pipe.hgetall(f"{group}run:{run_id}")
            # A key of the wrong type is one corrupt run, not a failed listing.
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        reply = self._read("list", "*", do)
        for run_id, raw in zip(batch, reply, strict=True):
            if isinstance(raw, Exception) and _wrong_type(raw):
                wrong = _not_a_hash(run_id)
                logger.warning("skipping corrupt checkpoint while listing: %s", wrong)
                self._quarantine(run_id, self._raw_value(run_id), wrong)
                continue
            if isinstance(raw, Exception):
                raise self._unavailable("list", run_id, raw)
            body, ctl = _split(cast("dict[Any, Any]", raw).items())
            if body is None:
                continue  # completed or cancelled while we listed
            try:
                run = self._record(run_id, body, ctl)
                lease = None
                if "lease_token" in ctl and int(ctl["lease_token"]) > run.last_token:
                    lease = _lease_from(ctl)
            except (CorruptCheckpoint, ValidationError, ValueError, KeyError) as exc:
                err = (
                    exc
                    if isinstance(exc, CorruptCheckpoint)
                    else CorruptCheckpoint(run_id, f"lease: {exc}")
                )
                logger.warning("skipping corrupt checkpoint while listing: %s", err)
                self._quarantine(run_id, body, err)
                continue
            if task is not None and run.task_name != task:
                continue
            if step is not None and run.step != step:
                continue
            if cutoff is not None and run.paused_at > cutoff:
                continue
            yield RunInfo(run=run, lease=lease)

    def count(self) -> int:
        def do() -> int:
            pipe = self._client.pipeline(transaction=False)
            for group in self._groups:
                pipe.zcard(group + "paused")
            return sum(int(n) for n in pipe.execute())

        return self._read("count", "*", do)

    def stats(self) -> dict[str, int]:
        """Counted from the indexes, one small script per group: cheap with any number of runs."""
        totals = [0, 0, 0, 0]
        for group in self._groups:
            keys = [group + name for name in ("paused", "inflight", "pending", "deadlines")]
            counts = self._read("stats", "*", functools.partial(self._scripts["stats"], keys))
            totals = [total + int(n) for total, n in zip(totals, counts, strict=True)]
        runs, in_flight, pending, due = totals
        return {
            "runs": runs,
            "paused": runs - in_flight,
            "in_flight": in_flight,
            "pending_resumes": pending,
            "due_timeouts": due,
        }

    def due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        for group in self._groups:
            bound: int | str = ""
            while True:
                with self._io("due_resumes", "*"):
                    now, used, examined, ids = self._scripts["due_resumes"](
                        keys=[group + "pending"],
                        args=[bound, round(older_than * 1_000_000), _DUE_BATCH, group + "run:"],
                    )
                due.extend(_text(run_id) for run_id in ids)
                if int(examined) < _DUE_BATCH:
                    break
                if bound == "":
                    # Later batches stay below the first one's time (server us), so a
                    # request marked sent by this sweep is never examined again by it.
                    bound = min(int(used), int(now) - 1)
        return [run_id for run_id in due if _valid(run_id)]

    def prune_ended(self, older_than: float) -> int:
        if older_than < 0:
            raise ValueError(f"older_than must be >= 0 seconds, not {older_than!r}")
        pruned = 0
        for group in self._groups:
            while True:
                # Each batch is one script: a lost reply leaves it applied whole or
                # not at all, and running it again is harmless.
                with self._io("prune_ended", "*"):
                    n = int(
                        self._scripts["prune"](
                            keys=[group + "ended"],
                            args=[round(older_than * 1000), _DUE_BATCH, group + "run:"],
                        )
                    )
                pruned += n
                if n < _DUE_BATCH:
                    break
        return pruned

    def due_timeouts(self, now: datetime | None = None) -> builtins.list[str]:
        bound = "" if now is None else _us(now)
        ids: builtins.list[Any] = []
        for group in self._groups:
            due = functools.partial(self._scripts["due"], [group + "deadlines"], [bound, "us"])
            ids += self._read("due_timeouts", "*", due)
        return [run_id for run_id in (_text(raw) for raw in ids) if _valid(run_id)]


def group_of(run_id: str) -> int:
    """The group of a run: its keys are ``<prefix>:{<group as 2 hex digits>}:...``."""
    return zlib.crc32(run_id.encode()) % _GROUPS


def _valid(run_id: str) -> bool:
    try:
        validate_run_id(run_id)
    except ValueError:
        return False
    return True
