"""The Redis store: checkpoints shared by workers on several machines.

Open it with ``CheckpointStore.open("redis://host:6379/0")`` (also ``rediss://``
for TLS and ``unix:///path/redis.sock?db=0``); keys live under ``prefix``
(default ``checkpoint``, or ``?prefix=...`` in the URL). Needs
``pip install 'celery-checkpoint[redis]'`` and Redis 5 or newer (or Valkey).

Atomicity
    Every transition -- save, claim, request_resume, heartbeat, complete,
    release, cancel and the re-arm of one orphaned run -- is one Lua script
    (``scripts.lua`` in this package) run in one round trip. Redis runs a script
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
per group, ``next_deadline`` one ``ZRANGE deadlines 0 0`` per group in one
pipeline); ``list`` pages through each group's ``paused`` index with ``ZSCAN``;
recovery reads each group's ``inflight`` index up to the server's now and this
host's ``owners`` sets -- never the whole keyspace (no ``KEYS``/``SCAN``).
Times: lease expiry in server milliseconds, as asked of a lease; the pending
index in server microseconds; ``paused_at`` and ``expires_at`` (the record's
own times) in microseconds.

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

import contextlib
import logging
from typing import Any, Literal

from pydantic import ValidationError

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    ResumeRejected,
    StoreUnavailable,
)
from ...model import (
    DEFAULT_LEASE_SECONDS,
    EndStatus,
    Lease,
    Owner,
    ResumeRequest,
    RunRecord,
)
from ..base import CheckpointStore
from ._codec import (
    GROUPS,
    from_ms,
    group_of,
    lease_from,
    resume_from,
    split_flat,
    text,
    us,
)
from ._connection import Connection
from ._sweeps import Sweeps

__all__ = ["RedisStore", "group_of"]

logger = logging.getLogger("celery_checkpoint.store.redis")


class RedisStore(Sweeps, CheckpointStore):
    """Checkpoints in Redis, each transition one Lua script. See the package docstring."""

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
        self._conn = Connection(url, prefix=prefix, eviction=eviction, client=client)
        self.prefix = self._conn.prefix
        #: the key base of each run group; see "Key layout" in the package docstring
        self._groups = [f"{self.prefix}:{{{g:02x}}}:" for g in range(GROUPS)]
        self._owner: tuple[int, Owner, str] | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self._conn.display!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._conn.close()

    # -- the contract --------------------------------------------------------------

    def _save(self, paused: RunRecord, token: int | None, create: bool) -> None:
        run_id = paused.run_id
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
            us(paused.paused_at),
            "" if paused.expires_at is None else us(paused.expires_at),
            "" if resume is None else resume.status,
            *fields,
        )
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        if result[0] == "exists":
            raise CheckpointExists(run_id, text(result[1]))
        if result[0] == "inflight":
            raise LeaseLost(
                run_id, f"the run is in flight under token {int(result[1])}; save with it"
            )

    def _exists(self, run_id: str) -> bool:
        keys = (self._key(run_id), self._key(run_id, "/ended"))  # one hash slot
        found: int = self._conn.read("exists", run_id, lambda: self._conn.client.exists(*keys))
        return found > 0

    def _load(self, run_id: str) -> RunRecord | None:
        body, ctl = self._read_run("load", run_id)
        return None if body is None else self._record(run_id, body, ctl)

    def _lease(self, run_id: str) -> Lease | None:
        body, ctl = self._read_run("lease", run_id)
        run = None if body is None else self._record(run_id, body, ctl)
        if run is None or "lease_token" not in ctl:
            return None
        try:
            if int(ctl["lease_token"]) <= run.last_token:
                return None  # superseded by a later write
            return lease_from(ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"lease: {exc}") from exc

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
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
            round(lease_seconds * 1000),
            "" if pause_seq is None else pause_seq,
        )
        if result[0] != "ok":
            return None
        _, flat, token, claimed_ms, expires_ms = result
        body, fields = split_flat(flat)
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
            claimed_at=from_ms(claimed_ms),
            expires_at=from_ms(expires_ms),
        )
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        request_id = request.request_id
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
            body, fields = split_flat(result[1])
            ended = self._record(run_id, body or b"", fields)
            done = ended.resume if ended.status == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise ended.ended_error()
        if status == "rejected":
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause "
                f"{int(result[1])} (step {text(result[2])!r})",
            )
        if status == "already":
            raise AlreadyResumed(run_id, text(result[1]))
        if status == "busy":
            raise AlreadyResumed(run_id, f"<none: in flight under token {int(result[1])}>")
        try:
            accepted = resume_from(split_flat(result[1])[1])
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"resume request: {exc}") from exc
        assert accepted is not None
        return accepted

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        result = self._run("heartbeat", "heartbeat", run_id, token, round(lease_seconds * 1000))
        if result[0] != "ok":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        _, owner, claimed, expires = result
        return Lease(
            token=token,
            owner=Owner.model_validate_json(owner),
            claimed_at=from_ms(int(claimed)),
            expires_at=from_ms(int(expires)),
        )

    def _complete(self, run_id: str, token: int | None) -> None:
        result = self._run("complete", "complete", run_id, "" if token is None else token)
        if result[0] == "ok":
            return
        why = text(result[1])
        if why == "ended":
            raise LeaseLost(run_id, f"the run was {text(result[2])}")
        if why == "ended_by":
            raise LeaseLost(run_id, f"token {token} ended by {text(result[2]) or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _release(self, run_id: str, token: int, error: str | None) -> None:
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

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
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
        body, fields = split_flat(result[1])
        assert body is not None  # the script cancels only a run with a record
        try:
            return self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def _ended(self, run_id: str) -> RunRecord | None:
        body, ctl = self._read_run("ended", run_id, ended=True)
        return None if body is None else self._record(run_id, body, ctl)
