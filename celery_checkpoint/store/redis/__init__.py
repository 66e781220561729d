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
                            override the JSON; the lease (lease_token, lease_owner,
                            lease_host, lease_claimed, lease_expires); and for a
                            pause naming a business key, the key and its binding's
                            nonce (key, key_nonce). ``deadline`` is the deadline in
                            us for a pause that expires, ``r`` for one that resumes
                            (``1``, from an older version: the record says which)
    G:run:<id>/ended        the same hash, renamed, of a completed, cancelled,
                            expired or failed run, with ended_at (us) and the
                            result a completion kept
    G:run:<id>/corrupt      an unparsable run moved aside, as it was; a later one
                            goes to ``/corrupt.1``, ``/corrupt.2``...
    G:paused                ZSET of the group's runs (paused or in flight) by paused_at (us)
    G:inflight              ZSET of the group's claimed runs by lease expiry (server ms)
    G:owners:<host>         SET of the group's runs claimed by workers on <host>
    G:pending               ZSET of pending resume requests by last sent (server us)
    G:deadlines             ZSET of pauses with a timeout by expires_at (us)
    G:ended                 ZSET of ended runs by when they ended (server ms), for
                            ``prune_ended`` and ``iter_ended``
    G:undelivered           ZSET of completed runs whose result no worker said was
                            delivered, by when completed or last returned (server us)
    G:nonces                ZSET of key binding nonces a key check fenced (``f:<n>``)
                            or a save that took an early answer wrote (``w:<n>``),
                            by server ms; forgotten after a day
    G:key:<key>             HASH of a business key whose group is G: the binding
                            (run, nonce; since and prev while unsettled) and the
                            early answer (early, early_id, early_exp in us, and
                            early_by: the nonce of the save that reserved it)
    G:early                 ZSET of the group's keys with an early answer, by expiry (us)
    G:unsettled             ZSET of the group's keys whose binding is unsettled, by
                            when it was made (server ms)

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

Deadlines and results
    ``request_resume`` refuses an answer to a pause with ``on_timeout="expire"``
    at or after its ``expires_at`` by the server's ``TIME`` (``PauseExpired``,
    nothing changed), in the same script as its other checks; the same request
    id as the accepted answer, and the timer's own request, still get in.
    ``complete`` with a result keeps it on the tombstone and lists the run in
    ``undelivered`` in the same script.

Business keys
    A key is unique among live runs and an answer for it may come before its
    pause, so a pause naming a key, an answer to it and the early answer it
    consumes must happen in one order. A script is atomic only within one hash
    slot, and a key and a run id generally hash to different groups (on a
    cluster, to different primaries). Routing keyed runs to their key's group
    would not do: a run is found by its id, and a pause may change its key.
    So a key's state lives in the key's group (``G:key:<key>``), the run's in
    the run's, and the run's record is what says whether it holds the key: the
    key's *binding* (run, nonce) counts only while that run's live record names
    the key with that nonce. The steps, each one script:

    1. ``key_bind`` (key's group): refuse a binding another run holds (after
       checking it, below), else bind the key to the run under a fresh nonce,
       *unsettled*, reserving the unexpired early answer the pause takes (as
       ``request_resume`` right after the save would accept it). A run already
       holding the key that takes nothing keeps its binding as it is.
    2. ``save`` (run's group): the record with the key, the nonce and the
       reserved answer attached as its pending request -- refused if the nonce
       was *fenced*, or if the binding is over an hour old (fences are kept a
       day: the clocks of a cluster's primaries must agree within the hour).
    3. ``key_settle`` (key's group): the binding is settled; the reserved
       early answer deleted.

    Whoever meets an unsettled binding, or one whose run may have moved on
    (an answer, another pause, ``prune_ended`` after a minute), checks it
    before acting: ``key_check`` in the run's group says whether the record
    carries the nonce; if not, it *fences* the nonce in the same script, so a
    save still on its way between steps 1 and 2 is refused and starts again;
    then ``key_settle`` keeps, restores the previous or drops the binding and
    returns the reserved answer (or deletes it, if a record took it and moved
    on since: ``G:nonces`` remembers which nonces a save wrote). An answer by
    key (``key_answer``, key's group) keeps an early answer only where there
    is no binding, and answers a bound run through ``request_resume`` with
    the binding's nonce, which that script checks beside the record. Ending a
    run, or a pause that drops or changes its key, releases the key after the
    run's script by the same check.

    Hence exactly one order: an early answer is kept only while no binding
    exists, a pause takes it only by binding, and the record that carries it
    exists only under a binding that no check fenced. A process killed
    between steps leaves an unsettled binding that the next look at the key
    (or ``prune_ended``) settles. A keyed pause costs three round trips (two
    when the run keeps its key), an answer by key two.

Pass your own ``client=`` (a ``redis.Redis`` with ``decode_responses=False``) to
control pooling or Sentinel. Give it no automatic retries
(``retry=Retry(NoBackoff(), 0)``): a client that silently re-sends a transition
after a lost reply may run it twice.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import uuid
from typing import Any, Literal

from pydantic import ValidationError

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
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
    utcnow,
)
from ..base import CheckpointStore
from ._codec import (
    GROUPS,
    from_ms,
    from_us,
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

#: How many times a keyed save, a restore or an answer by key binds again when
#: it finds its binding settled by another caller meanwhile.
_KEY_ATTEMPTS = 50


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

    def _save(self, paused: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        if paused.key is not None:
            return self._save_keyed(paused, paused.key, token, create)
        result = self._run("save", "save", *self._save_args(paused, token, create, paused.resume))
        self._save_refused(paused.run_id, token, result)
        self._release_replaced(paused.run_id, result, None, None)
        return None

    def _save_args(
        self,
        paused: RunRecord,
        token: int | None,
        create: bool,
        resume: ResumeRequest | None,
        binding: tuple[str, str, int, bool] | None = None,
    ) -> builtins.list[Any]:
        """The save script's run id and arguments; ``binding`` is (key, nonce, the
        binding's time, whether the record takes the early answer reserved with it)."""
        # The JSON is written as given. The control fields written beside it, and
        # last_token / lease_ended_by which the script decides, override it on read;
        # a field at its default (status paused, no recoveries) is left out.
        fields = self._control_fields(paused, resume)
        if binding is not None:
            fields += ["key", binding[0], "key_nonce", binding[1]]
        if token is not None:
            fields += ["ended_by", "repause"]  # after the record's own, so it wins
        key, nonce, since, takes = binding or ("", "", "", False)
        return [
            paused.run_id,
            "create" if create else ("" if token is None else token),
            paused.to_json(),
            paused.last_token,
            us(paused.paused_at),
            "" if paused.expires_at is None else us(paused.expires_at),
            "" if resume is None else resume.status,
            key,
            nonce,
            since,
            "1" if takes else "",
            *fields,
        ]

    @staticmethod
    def _control_fields(run: RunRecord, resume: ResumeRequest | None) -> builtins.list[str]:
        fields = ["pause_seq", str(run.pause_seq), "step", run.step]
        if run.status != "paused":
            fields += ["status", run.status]
        if run.recoveries:
            fields += ["recoveries", str(run.recoveries)]
        if run.lease_ended_by is not None:
            fields += ["ended_by", run.lease_ended_by]
        if run.ended_reason is not None:
            fields += ["ended_reason", run.ended_reason]
        if run.expires_at is not None:
            # In the deadline index; request_resume refuses answers past it
            # unless the pause resumes on its timeout.
            expires = run.on_timeout == "expire"
            fields += ["deadline", str(us(run.expires_at)) if expires else "r"]
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
        return fields

    @staticmethod
    def _save_refused(run_id: str, token: int | None, result: builtins.list[Any]) -> None:
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        if result[0] == "exists":
            raise CheckpointExists(run_id, text(result[1]))
        if result[0] == "inflight":
            raise LeaseLost(
                run_id, f"the run is in flight under token {int(result[1])}; save with it"
            )

    def _save_keyed(
        self, paused: RunRecord, key: str, token: int | None, create: bool
    ) -> ResumeRequest | None:
        """A pause naming a business key: bind the key to the run in the key's
        group, write the record in the run's, then settle the binding. See
        "Business keys" in the package docstring."""
        run_id = paused.run_id
        current = paused.current_resume
        consume = current is None or current.status != "pending"
        deadline = ""
        if paused.on_timeout == "expire" and paused.expires_at is not None:
            deadline = str(us(paused.expires_at))  # too late then for any answer
        for _ in range(_KEY_ATTEMPTS):
            bound = self._bind(key, run_id, consume, deadline)
            if bound is None:
                continue  # a binding was settled first: bind again
            nonce, since, early, prev = bound
            answer = None
            if early is not None:
                try:
                    answer = ResumeRequest.model_validate_json(early).model_copy(
                        update={"pause_seq": paused.pause_seq, "status": "pending", "error": None}
                    )
                except (ValidationError, ValueError) as exc:
                    self._settle_quietly(key, run_id, nonce, prev or "")
                    raise CorruptCheckpoint(run_id, f"early answer of key {key!r}: {exc}") from exc
            resume = paused.resume if answer is None else answer
            binding = (key, nonce, since, answer is not None)
            try:
                result = self._run(
                    "save", "save", *self._save_args(paused, token, create, resume, binding)
                )
            except StoreUnavailable:
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)
                raise
            if result[0] == "fenced":
                if prev is not None:
                    self._verify_key(key, run_id, nonce, prev)
                continue  # the binding was found stale meanwhile: bind again
            if result[0] != "ok":
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)  # undo the binding
                self._save_refused(run_id, token, result)
            if prev is not None:
                self._settle_written(key, run_id, nonce)
            self._release_replaced(run_id, result, key, (nonce, prev))
            return answer
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: save of run {run_id!r}: key {key!r} "
            f"stayed contended through {_KEY_ATTEMPTS} attempts; nothing was saved"
        )

    def _bind(
        self, key: str, run_id: str, consume: bool, deadline: str
    ) -> tuple[str, int, bytes | None, str | None] | None:
        """Bind ``key`` to the run (step one of a keyed save): (nonce, the binding's
        time, the early answer reserved, the previous nonce -- None if the run
        held the key already and takes nothing, so there is nothing to settle).
        None: another binding was checked and settled first; call again.
        ``CheckpointExists`` if another live run holds the key."""
        nonce = uuid.uuid4().hex
        result = self._key_run(
            "key_bind", "save", key, run_id, nonce, "1" if consume else "", deadline
        )
        if result[0] == "keep":
            return text(result[1]), int(result[2]), None, None
        if result[0] == "bound":
            early: bytes | None = result[2]
            return nonce, int(result[1]), early, text(result[3])
        holder, nonce, prev = text(result[1]), text(result[2]), text(result[3])
        verdict = self._verify_key(key, holder, nonce, prev)
        if holder != run_id and verdict in ("current", "prev"):
            raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
        return None

    def _settle_written(self, key: str, run_id: str, nonce: str) -> None:
        """The record carrying ``nonce`` is written: the binding is settled. Not
        raised if it fails (the save is done): the next look at the key settles it."""
        try:
            self._settle(key, run_id, nonce, "current", "1")
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to settle later: %s", run_id, key, exc)

    def _settle_quietly(self, key: str, run_id: str, nonce: str, prev: str) -> None:
        """:meth:`_verify_key` on the way out of a failed save: not raised (the
        caller raises its own error); the next look at the key settles it."""
        try:
            self._verify_key(key, run_id, nonce, prev)
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to settle later: %s", run_id, key, exc)

    def _release_replaced(
        self,
        run_id: str,
        result: builtins.list[Any],
        key: str | None,
        nonces: tuple[str, str | None] | None,
    ) -> None:
        """After a save: the key the replaced record named is released if the new
        record does not hold it under the same binding."""
        if len(result) < 3 or result[1] is None:
            return
        old_key, old_nonce = text(result[1]), text(result[2] or b"")
        if old_key == key and nonces is not None and old_nonce in nonces:
            return  # the same key, the same binding (or its predecessor, now settled)
        self._release_key(run_id, old_key, old_nonce)

    def _release_key(self, run_id: str, key: str, nonce: str) -> None:
        """The run's record no longer names ``key`` under ``nonce`` (it ended, or
        names another key): unbind the key. Not raised if it fails: a binding
        whose run does not hold the key is settled by the next look at the key."""
        try:
            self._verify_key(key, run_id, nonce, "")
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to release later: %s", run_id, key, exc)

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
        result = self._resume(run_id, request, pause_seq)
        assert result is not None  # only an answer by key can find a binding stale
        return result

    def _resume(
        self,
        run_id: str,
        request: ResumeRequest,
        pause_seq: int | None,
        binding: tuple[str, str] | None = None,
    ) -> ResumeRequest | None:
        """request_resume; with ``binding`` (key, nonce), only if the run holds the
        key under that binding: None (after settling the binding) if it does not."""
        request_id = request.request_id
        key, nonce = binding or ("", "")
        result = self._run(
            "request_resume",
            "request_resume",
            run_id,
            request_id,
            request.model_dump_json(),
            "" if pause_seq is None else pause_seq,
            "1" if request.timed_out else "",
            key,
            nonce,
        )
        status = result[0]
        if status == "stale":
            verdict, written = (text(v) for v in result[1])
            self._settle(key, run_id, nonce, verdict, written)
            return None
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
        if status == "expired":
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {text(result[1])!r} at "
                f"{from_us(int(result[2])).isoformat()}: the answer came too late"
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

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        reply = self._run(
            "complete",
            "complete",
            run_id,
            "" if token is None else token,
            "" if result is None else "1",
            result or "",
        )
        if reply[0] == "ok":
            if len(reply) > 1:
                self._release_key(run_id, text(reply[1]), text(reply[2]))
            return
        why = text(reply[1])
        if why == "ended":
            raise LeaseLost(run_id, f"the run was {text(reply[2])}")
        if why == "ended_by":
            raise LeaseLost(run_id, f"token {token} ended by {text(reply[2]) or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        return self._due_pass("due_deliveries", "undelivered", older_than)

    def _mark_delivered(self, run_id: str) -> None:
        self._run("mark_delivered", "mark_delivered", run_id)

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
        if "key" in fields:
            self._release_key(run_id, fields["key"], fields.get("key_nonce", ""))
        try:
            return self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def _ended(self, run_id: str) -> RunRecord | None:
        body, ctl = self._read_run("ended", run_id, ended=True)
        return None if body is None else self._record(run_id, body, ctl)

    # -- business keys -----------------------------------------------------------------

    def _find_key(self, key: str) -> str | None:
        group = self._groups[group_of(key)]
        binding = self._conn.read(
            "find_key",
            "*",
            lambda: self._conn.client.hmget(f"{group}key:{key}", "run", "nonce", "prev"),
        )
        if binding[0] is None:
            return None
        run_id = text(binding[0])
        nonces = {text(n) for n in binding[1:] if n is not None}
        named = self._conn.read(
            "find_key",
            run_id,
            lambda: self._conn.client.hmget(self._key(run_id), "key", "key_nonce"),
        )
        if named[0] is None or text(named[0]) != key or text(named[1] or b"") not in nonces:
            return None  # a binding not settled yet, or left by a run that moved on
        return run_id

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        for _ in range(_KEY_ATTEMPTS):
            result = self._key_run(
                "key_answer",
                "answer_key",
                key,
                request.request_id,
                request.model_dump_json(),
                round(ttl * 1_000_000),
            )
            status = result[0]
            if status == "stored":
                return None, request
            if status == "already":
                raise AlreadyResumed(key, text(result[1]))
            if status == "kept":
                try:
                    return None, ResumeRequest.model_validate_json(result[1])
                except (ValidationError, ValueError) as exc:
                    raise CorruptCheckpoint(key, f"early answer: {exc}") from exc
            run_id, nonce, prev, unsettled = (
                text(result[1]),
                text(result[2]),
                text(result[3]),
                result[4],
            )
            if int(unsettled):
                # A save of the key between its two steps (or killed there): settle it
                # by the run's record first; a save still running binds again.
                self._verify_key(key, run_id, nonce, prev)
                continue
            accepted = self._resume(run_id, request, None, (key, nonce))
            if accepted is not None:
                return run_id, accepted
            # The run no longer holds the key (it ended; its release is still to come).
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: answer_key of key {key!r} stayed "
            f"contended through {_KEY_ATTEMPTS} attempts; no answer was recorded"
        )

    # -- moving runs between stores ----------------------------------------------------

    def _restore(self, run: RunRecord) -> bool:
        if run.lease is not None:
            raise ValueError(f"run {run.run_id!r} is in flight: only paused and ended runs move")
        run_id = run.run_id
        if run.ended or run.key is None:
            result = self._run("restore", "restore", *self._restore_args(run, None))
            return bool(result[0] == "ok")
        key = run.key
        if self._exists(run_id):
            return False
        for _ in range(_KEY_ATTEMPTS):
            bound = self._bind(key, run_id, False, "")
            if bound is None:
                continue
            nonce, since, _, prev = bound
            try:
                result = self._run(
                    "restore", "restore", *self._restore_args(run, (key, nonce, since))
                )
            except StoreUnavailable:
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)
                raise
            if result[0] == "fenced":
                if prev is not None:
                    self._verify_key(key, run_id, nonce, prev)
                continue
            if prev is not None:
                if result[0] == "ok":
                    self._settle_written(key, run_id, nonce)
                else:
                    self._settle_quietly(key, run_id, nonce, prev)
            return bool(result[0] == "ok")
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: restore of run {run_id!r}: key {key!r} "
            f"stayed contended through {_KEY_ATTEMPTS} attempts; nothing was restored"
        )

    def _restore_args(
        self, run: RunRecord, binding: tuple[str, str, int] | None
    ) -> builtins.list[Any]:
        fields = self._control_fields(run, run.resume)
        ended_at = ""
        if run.ended:
            ended_at = str(us(run.ended_at or utcnow()))
            if run.result is not None:
                fields += ["result", run.result]
        if binding is not None:
            fields += ["key", binding[0], "key_nonce", binding[1]]
        key, nonce, since = binding or ("", "", "")
        return [
            run.run_id,
            "ended" if run.ended else "paused",
            run.to_json(),
            run.last_token,
            us(run.paused_at),
            "" if run.expires_at is None or run.ended else us(run.expires_at),
            "" if run.resume is None or run.ended else run.resume.status,
            ended_at,
            key,
            nonce,
            since,
            *fields,
        ]
