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

The code: :mod:`._connection` opens the client, loads ``scripts.lua`` and checks
the server; :mod:`._codec` turns a run into hash fields and script arguments and
back; :mod:`._records` holds one run's keys and the call of one script;
:mod:`._transitions` the transitions of one run, :mod:`._keys` the steps on
business keys, :mod:`._moving` ``restore`` and ``iter_ended``, :mod:`._sweeps`
the passes over the group indexes; this module opens the store and saves.

Pass your own ``client=`` (a ``redis.Redis`` with ``decode_responses=False``) to
control pooling or Sentinel. Give it no automatic retries
(``retry=Retry(NoBackoff(), 0)``): a client that silently re-sends a transition
after a lost reply may run it twice.
"""

from __future__ import annotations

from typing import Any, Literal

from ...model import DEFAULT_LEASE_SECONDS, ResumeRequest, RunRecord
from ..base import CheckpointStore
from ._codec import GROUPS, group_of, save_args
from ._connection import Connection
from ._moving import Moving
from ._sweeps import Sweeps

__all__ = ["RedisStore", "group_of"]


class RedisStore(Moving, Sweeps, CheckpointStore):
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

    def __repr__(self) -> str:
        return f"RedisStore({self._conn.display!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._conn.close()

    # -- the contract (its other primitives: the mixins, see the package docstring) --

    def _save(self, paused: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        """One script; a pause naming a business key takes the key's steps (:mod:`._keys`)."""
        if paused.key is not None:
            return self._save_keyed(paused, paused.key, token, create)
        result = self._run("save", "save", *save_args(paused, token, create, paused.resume))
        self._save_refused(paused.run_id, token, result)
        self._release_replaced(paused.run_id, result, None, None)
        return None
