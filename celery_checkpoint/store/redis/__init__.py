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
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal, cast

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
    corrupt_detail,
)
from ..base import CheckpointStore, RunFilter, RunInfo, StoreStats, make_stats
from ._codec import (
    GROUPS,
    from_ms,
    group_of,
    lease_from,
    not_a_hash,
    overlay,
    resume_from,
    split,
    split_flat,
    text,
    us,
    valid,
    wrong_type,
)
from ._connection import Connection

__all__ = ["RedisStore", "group_of"]

logger = logging.getLogger("celery_checkpoint.store.redis")

_PAGE = 100  # runs read per round trip by list()
_DUE_BATCH = 500  # pending requests examined per script run by due_resumes()


class RedisStore(CheckpointStore):
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

    # -- plumbing ----------------------------------------------------------------

    def _group(self, run_id: str) -> str:
        """The key base of the run's group (its hash tag)."""
        return self._groups[group_of(run_id)]

    def _run(self, script: str, action: str, run_id: str, *args: Any) -> builtins.list[Any]:
        """One transition: one script, one round trip, never retried."""
        group = self._group(run_id)
        try:
            result = self._conn.evalsha(script, f"{group}run:{run_id}", run_id, group, *args)
        except self._conn.errors as exc:
            if wrong_type(exc):
                raise not_a_hash(run_id) from exc
            raise self._conn.unavailable(action, run_id, exc) from exc
        result[0] = text(result[0])
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

    def _record(self, run_id: str, body: bytes | str, ctl: dict[str, str]) -> RunRecord:
        try:
            run = RunRecord.from_json(body)
            overlay(run, ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, corrupt_detail(exc, body)) from exc
        if run.run_id != run_id:
            raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
        return run

    def _read_run(
        self, action: str, run_id: str, *, ended: bool = False
    ) -> tuple[bytes | None, dict[str, str]]:
        """The run's record JSON (None if there is no run) and its other fields."""
        key = self._key(run_id, "/ended" if ended else "")
        try:
            raw = self._conn.read(action, run_id, lambda: self._conn.client.hgetall(key))
        except StoreUnavailable as exc:
            if wrong_type(exc.cause):
                raise not_a_hash(run_id) from exc
            raise
        return split(cast("dict[Any, Any]", raw).items())

    def _raw_value(self, run_id: str) -> bytes:
        """What a key that is not a run hash holds, if a string (to move it aside)."""
        with contextlib.suppress(Exception):
            value = self._conn.client.get(self._key(run_id))
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
            logger.warning("moved corrupt checkpoint aside to %s: %s", text(result[1]), exc)

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

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        recovered: builtins.list[RunRecord] = []
        host = socket.gethostname()
        for group in self._groups:
            self._recover_group(group, host, recovered)
        return recovered

    def _recover_group(self, group: str, host: str, recovered: builtins.list[RunRecord]) -> None:
        """Re-arm the group's runs whose lease expired or whose owner on this host died."""
        expired = self._conn.read(
            "recover_orphaned",
            "*",
            lambda: self._conn.scripts["due"](keys=[group + "inflight"], args=["", "ms"]),
        )
        seen: set[str] = set()
        for raw in expired:
            run_id = text(raw)
            seen.add(run_id)
            self._rearm(run_id, "expired", "", "", recovered)
        members: set[Any] = self._conn.read(
            "recover_orphaned", "*", lambda: self._conn.client.smembers(f"{group}owners:{host}")
        )
        ours = sorted(run_id for run_id in ({text(m) for m in members} - seen) if valid(run_id))
        if not ours:
            return

        def leases() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for run_id in ours:
                pipe.hmget(f"{group}run:{run_id}", "lease_token", "lease_owner")
            # A key of the wrong type is one corrupt run (_rearm moves it aside).
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        for run_id, reply in zip(
            ours, self._conn.read("recover_orphaned", "*", leases), strict=True
        ):
            if isinstance(reply, Exception):
                if not wrong_type(reply):
                    raise self._conn.unavailable("recover_orphaned", run_id, reply)
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
        recovered: builtins.list[RunRecord],
    ) -> None:
        if not valid(run_id):
            return
        try:
            result = self._run("rearm", "recover_orphaned", run_id, mode, token, host)
        except CorruptCheckpoint as exc:  # its key is not a run hash
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, self._raw_value(run_id), exc)
            return
        if result[0] != "ok":
            return
        body, fields = split_flat(result[1])
        assert body is not None  # the script re-arms only a run with a record
        try:
            run = self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, body, exc)
            return
        logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
        recovered.append(run)

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

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        cutoff = where.cutoff
        cutoff_us = None if cutoff is None else us(cutoff)
        for group in self._groups:
            seen: set[str] = set()  # ZSCAN may return a member twice while the set rehashes
            cursor = 0

            def scan() -> tuple[int, builtins.list[tuple[bytes, float]]]:
                page: tuple[int, builtins.list[tuple[bytes, float]]]
                page = self._conn.client.zscan(group + "paused", cursor, count=_PAGE)  # noqa: B023
                return page

            while True:
                cursor, page = self._conn.read("list", "*", scan)
                batch: builtins.list[str] = []
                for member, score in page:
                    run_id = text(member)
                    if run_id in seen or not valid(run_id):
                        continue
                    seen.add(run_id)
                    if cutoff_us is not None and score > cutoff_us:
                        continue
                    batch.append(run_id)
                yield from self._list_batch(group, batch, where, cutoff)
                if int(cursor) == 0:
                    break

    def _list_batch(
        self,
        group: str,
        batch: builtins.list[str],
        where: RunFilter,
        cutoff: datetime | None,
    ) -> Iterator[RunInfo]:
        if not batch:
            return

        def do() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for run_id in batch:
                pipe.hgetall(f"{group}run:{run_id}")
            # A key of the wrong type is one corrupt run, not a failed listing.
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        reply = self._conn.read("list", "*", do)
        for run_id, raw in zip(batch, reply, strict=True):
            if isinstance(raw, Exception) and wrong_type(raw):
                wrong = not_a_hash(run_id)
                logger.warning("skipping corrupt checkpoint while listing: %s", wrong)
                self._quarantine(run_id, self._raw_value(run_id), wrong)
                continue
            if isinstance(raw, Exception):
                raise self._conn.unavailable("list", run_id, raw)
            body, ctl = split(cast("dict[Any, Any]", raw).items())
            if body is None:
                continue  # completed or cancelled while we listed
            try:
                run = self._record(run_id, body, ctl)
                lease = None
                if "lease_token" in ctl and int(ctl["lease_token"]) > run.last_token:
                    lease = lease_from(ctl)
            except (CorruptCheckpoint, ValidationError, ValueError, KeyError) as exc:
                err = (
                    exc
                    if isinstance(exc, CorruptCheckpoint)
                    else CorruptCheckpoint(run_id, f"lease: {exc}")
                )
                logger.warning("skipping corrupt checkpoint while listing: %s", err)
                self._quarantine(run_id, body, err)
                continue
            if where.matches(run, cutoff):
                yield RunInfo(run=run, lease=lease)

    def _count(self) -> int:
        def do() -> int:
            pipe = self._conn.client.pipeline(transaction=False)
            for group in self._groups:
                pipe.zcard(group + "paused")
            return sum(int(n) for n in pipe.execute())

        return self._conn.read("count", "*", do)

    def _stats(self) -> StoreStats:
        """Counted from the indexes, one small script per group: cheap with any number of runs."""
        totals = [0, 0, 0, 0]
        for group in self._groups:
            keys = [group + name for name in ("paused", "inflight", "pending", "deadlines")]
            stats = functools.partial(self._conn.scripts["stats"], keys)
            counts = self._conn.read("stats", "*", stats)
            totals = [total + int(n) for total, n in zip(totals, counts, strict=True)]
        return make_stats(*totals)

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        for group in self._groups:
            bound: int | str = ""
            while True:
                with self._conn.io("due_resumes", "*"):
                    now, used, examined, ids = self._conn.scripts["due_resumes"](
                        keys=[group + "pending"],
                        args=[bound, round(older_than * 1_000_000), _DUE_BATCH, group + "run:"],
                    )
                due.extend(text(run_id) for run_id in ids)
                if int(examined) < _DUE_BATCH:
                    break
                if bound == "":
                    # Later batches stay below the first one's time (server us), so a
                    # request marked sent by this sweep is never examined again by it.
                    bound = min(int(used), int(now) - 1)
        return [run_id for run_id in due if valid(run_id)]

    def _prune_ended(self, older_than: float) -> int:
        pruned = 0
        for group in self._groups:
            while True:
                # Each batch is one script: a lost reply leaves it applied whole or
                # not at all, and running it again is harmless.
                with self._conn.io("prune_ended", "*"):
                    n = int(
                        self._conn.scripts["prune"](
                            keys=[group + "ended"],
                            args=[round(older_than * 1000), _DUE_BATCH, group + "run:"],
                        )
                    )
                pruned += n
                if n < _DUE_BATCH:
                    break
        return pruned

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        bound = "" if now is None else us(now)
        ids: builtins.list[Any] = []
        for group in self._groups:
            due = functools.partial(self._conn.scripts["due"], [group + "deadlines"], [bound, "us"])
            ids += self._conn.read("due_timeouts", "*", due)
        return [run_id for run_id in (text(raw) for raw in ids) if valid(run_id)]
