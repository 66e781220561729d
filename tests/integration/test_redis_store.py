"""The Redis store against real servers: racing processes, a server killed mid-stream.

The shared server (127.0.0.1:6379, database 15, a fresh key prefix per test)
serves the race and the corruption test; the fault and eviction tests start a
private ``redis-server`` of their own on a free loopback port, so they can kill
it or configure it.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis
import redis.cluster

from celery_checkpoint import (
    CheckpointStore,
    CorruptCheckpoint,
    ImproperlyConfigured,
    PausedWorkflow,
    PauseExpired,
    StoreUnavailable,
)
from celery_checkpoint.model import utcnow
from celery_checkpoint.store.redis import group_of
from tests.conftest import IN_CI, require_server
from tests.redis_cluster import RedisCluster, start_cluster

SHARED_URL = "redis://127.0.0.1:6379/15"
CLAIMERS = 8
RUNS = 500
CHILD_TIMEOUT = 120.0
# Guards against a hang, never asserted on: a server that is not up by then is broken.
SERVER_START_TIMEOUT = 30.0

pytestmark = pytest.mark.redis


def _record(run_id: str, **fields: Any) -> PausedWorkflow:
    values: dict[str, Any] = {"task_name": "shop.ship", "step": "await_approval"}
    values.update(fields)
    return PausedWorkflow(run_id=run_id, **values)


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    require_server("Redis", "127.0.0.1", 6379)
    prefix = f"cc-redis-it-{uuid4().hex}"
    yield prefix
    _delete_prefix(SHARED_URL, prefix)


# -- a private redis-server -----------------------------------------------------------


@dataclass
class PrivateRedis:
    """A ``redis-server`` of this test's own, killable and restartable on the same port."""

    directory: Path
    extra: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--dir", str(self.directory), "--save", "", *self.extra]
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 - the server owns it
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading its AOF
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.directory / "server.log").read_text(errors="replace")
                    pytest.fail(f"redis-server did not come up on port {self.port}:\n{log_text}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync -- a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not on PATH"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    servers: list[PrivateRedis] = []

    def make(*extra: str) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = PrivateRedis(directory, list(extra))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


# -- (a) many processes race for the same runs --------------------------------------


def _claim_all(
    url: str, prefix: str, run_ids: list[str], start: Any, out: Any
) -> None:  # runs in a child process
    try:
        store = CheckpointStore.open(url, prefix=prefix, lease_seconds=3600)
        try:
            start.wait(CHILD_TIMEOUT)
            won = []
            for run_id in run_ids:
                run = store.claim(run_id)
                if run is not None:
                    assert run.lease is not None
                    won.append((run_id, run.lease.token))
            out.put(("ok", (os.getpid(), won)))
        finally:
            store.close()
    except BaseException:
        out.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_eight_processes_racing_claims_on_500_runs_claim_each_run_exactly_once(
    shared_prefix: str,
) -> None:
    store = CheckpointStore.open(SHARED_URL, prefix=shared_prefix)
    run_ids = [f"race-{i:03d}" for i in range(RUNS)]
    for run_id in run_ids:
        store.save(_record(run_id))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separate workers
    start, out = ctx.Barrier(CLAIMERS), ctx.Queue()
    children = [
        ctx.Process(target=_claim_all, args=(SHARED_URL, shared_prefix, run_ids, start, out))
        for _ in range(CLAIMERS)
    ]
    for child in children:
        child.start()
    results = []
    for _ in range(CLAIMERS):
        status, value = out.get(timeout=CHILD_TIMEOUT)
        assert status == "ok", f"a claimer failed:\n{value}"
        results.append(value)
    for child in children:
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0

    wins = Counter(run_id for _, won in results for run_id, _ in won)
    assert wins == Counter(dict.fromkeys(run_ids, 1)), "every run claimed exactly once"
    assert {token for _, won in results for _, token in won} == {1}
    winner_of = {run_id: pid for pid, won in results for run_id, _ in won}
    for run_id in run_ids:
        lease = store.lease(run_id)
        assert lease is not None
        assert (lease.token, lease.owner.pid) == (1, winner_of[run_id])
    assert store.count() == RUNS
    client = redis.Redis.from_url(SHARED_URL)
    try:
        assert sum(client.zcard(k) for k in _group_keys(shared_prefix, "inflight")) == RUNS
    finally:
        client.close()
    # The claimers have exited: their owners are proved dead on this host.
    assert sorted(run.run_id for run in store.recover_orphaned()) == run_ids
    assert store.recover_orphaned() == []
    client = redis.Redis.from_url(SHARED_URL)
    try:
        assert sum(client.zcard(k) for k in _group_keys(shared_prefix, "inflight")) == 0
    finally:
        client.close()
    store.close()


# -- (b) the server is SIGKILLed in the middle of a stream of operations ----------------

# Each run follows one plan; the steps are applied in order until one raises.
PLANS: list[list[str]] = [
    ["save", "request_resume", "claim", "complete"],
    ["save", "request_resume", "claim", "release"],
    ["save", "request_resume", "claim", "repause", "complete"],
    ["save", "claim", "heartbeat", "cancel"],
]
DEADLINE = utcnow() + timedelta(days=1)


def _apply(store: CheckpointStore, run_id: str, step: str) -> None:
    if step == "save":
        store.save(_record(run_id, step="s1", expires_at=DEADLINE))
    elif step == "request_resume":
        store.request_resume(run_id, {"ok": True}, "req-1")
    elif step == "claim":
        run = store.claim(run_id, lease_seconds=3600)
        assert run is not None and run.lease is not None and run.lease.token == 1, run
    elif step == "complete":
        store.complete(run_id, token=1)
    elif step == "release":
        store.release(run_id, 1, error="boom")
    elif step == "repause":
        store.save(_record(run_id, step="s2", pause_seq=2), token=1)
    elif step == "heartbeat":
        store.heartbeat(run_id, 1, lease_seconds=3600)
    elif step == "cancel":
        assert store.cancel(run_id, reason="stop") is not None
    else:  # pragma: no cover
        raise AssertionError(step)


# What a caller can observe of a run: (record fields or None, lease token, ended status).
Observed = tuple[tuple[Any, ...] | None, int | None, str | None]


def _expected(plan: list[str], done: int) -> Observed:
    """The run after the first ``done`` steps of ``plan`` took effect."""
    record: dict[str, Any] | None = None
    lease: int | None = None
    ended: str | None = None
    for step in plan[:done]:
        if step == "save":
            record = {"step": "s1", "seq": 1, "last": 0, "by": None, "resume": None}
        elif step == "request_resume":
            assert record is not None
            record["resume"] = ("req-1", "pending")
        elif step == "claim":
            lease = 1
        elif step == "complete":
            if lease is not None:  # after a re-pause the fresh paused record stays
                record, ended = None, "completed"  # the tombstone fences late writers
            lease = None
        elif step == "release":
            assert record is not None
            record.update(last=1, by="release", resume=("req-1", "failed"))
            lease = None
        elif step == "repause":
            record = {"step": "s2", "seq": 2, "last": 1, "by": "repause", "resume": None}
            lease = None
        elif step == "cancel":
            record, lease, ended = None, None, "cancelled"
    fields = None if record is None else tuple(sorted(record.items()))
    return fields, lease, ended


def _observe(store: CheckpointStore, run_id: str) -> Observed:
    run = store.load(run_id)
    fields = None
    if run is not None:
        resume = None if run.resume is None else (run.resume.request_id, run.resume.status)
        record = {
            "step": run.step,
            "seq": run.pause_seq,
            "last": run.last_token,
            "by": run.lease_ended_by,
            "resume": resume,
        }
        fields = tuple(sorted(record.items()))
    lease = store.lease(run_id)
    ended = store.ended(run_id)
    return fields, None if lease is None else lease.token, None if ended is None else ended.status


@dataclass
class Outcome:
    plan: int
    done: int = 0  # steps that returned normally
    raised: bool = False  # the next step raised StoreUnavailable: applied whole, or not at all


class Stream(threading.Thread):
    """Walks fresh runs through their plans; a run whose step raises is left as it is."""

    def __init__(self, store: CheckpointStore) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.outcomes: dict[str, Outcome] = {}
        self.ok = 0
        self.failures = 0
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                run_id, n = f"run-{n:06d}", n + 1
                outcome = self.outcomes[run_id] = Outcome(plan=n % len(PLANS))
                for step in PLANS[outcome.plan]:
                    try:
                        _apply(self.store, run_id, step)
                    except StoreUnavailable:
                        outcome.raised = True
                        self.failures += 1
                        time.sleep(0.002)
                        break
                    outcome.done += 1
                    self.ok += 1
        except BaseException:
            self.error = traceback.format_exc()

    def wait_for(self, what: Callable[[], bool]) -> None:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not what():
            assert self.error is None, self.error
            assert self.is_alive(), "the stream stopped"
            assert time.monotonic() < deadline, "the stream made no progress"
            time.sleep(0.01)


def _run_key(prefix: str, run_id: str, suffix: str = "") -> str:
    return f"{prefix}:{{{group_of(run_id):02x}}}:run:{run_id}{suffix}"


def _group_keys(prefix: str, name: str) -> list[str]:
    return [f"{prefix}:{{{g:02x}}}:{name}" for g in range(16)]


def _audit_indexes(url: str, prefix: str) -> None:
    """No half transition anywhere: every index agrees with the keys it indexes."""
    client = redis.Redis.from_url(url)
    try:
        keys = {k.decode() for k in client.scan_iter(match=prefix + "*", count=1000)}
        runs = {
            k.split(":run:", 1)[1] for k in keys if ":run:" in k and "/" not in k.split(":run:")[1]
        }
        ended = {k.split(":run:", 1)[1][: -len("/ended")] for k in keys if k.endswith("/ended")}

        def members(name: str) -> dict[str, float]:
            found: dict[str, float] = {}
            for key in _group_keys(prefix, name):
                found.update({m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)})
            return found

        paused = members("paused")
        inflight = members("inflight")
        pending = members("pending")
        deadlines = members("deadlines")
        owners = {
            m.decode()
            for key in _group_keys(prefix, f"owners:{socket.gethostname()}")
            for m in client.smembers(key)
        }
        ctls = {
            run_id: {
                k.decode(): v.decode() for k, v in client.hgetall(_run_key(prefix, run_id)).items()
            }
            for run_id in runs
        }
        leases = {run_id for run_id, ctl in ctls.items() if "lease_token" in ctl}

        assert set(paused) == runs, "every record is in the paused index, and only records"
        assert set(inflight) == leases, "every in-flight member has a lease, every lease is indexed"
        assert owners == leases, "the per-host sets list exactly the claimed runs"
        for run_id, ctl in ctls.items():
            assert "record" in ctl and "last_token" in ctl, f"{run_id}: a half-written run"
            has_lease = run_id in leases
            expect_pending = ctl.get("resume_status") == "pending" and not has_lease
            assert (run_id in pending) == expect_pending, f"{run_id}: pending index disagrees"
            assert (run_id in deadlines) == (ctl["step"] == "s1"), f"{run_id}: deadline index"
            if has_lease:
                assert int(ctl["lease_expires"]) == inflight[run_id], f"{run_id}: in-flight score"
        assert not (ended & runs), "an ended run is not also paused"
        assert set(pending) <= runs and set(deadlines) <= runs
    finally:
        client.close()


@pytest.mark.slow
def test_sigkill_of_the_server_mid_stream_leaves_every_operation_whole_or_absent(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis("--appendonly", "yes", "--appendfsync", "always")
    prefix = f"cc-fault-{uuid4().hex[:8]}"
    store = CheckpointStore.open(server.url, prefix=prefix, lease_seconds=3600)
    stream = Stream(store)
    stream.start()
    try:
        stream.wait_for(lambda: stream.ok >= 400)
        server.kill()
        failures_at_kill = stream.failures
        stream.wait_for(lambda: stream.failures > failures_at_kill)
        server.start()  # same port, same directory: it replays its AOF
        ok_at_restart = stream.ok
        stream.wait_for(lambda: stream.ok >= ok_at_restart + 400)
    finally:
        stream.stop.set()
        stream.join(CHILD_TIMEOUT)
    assert stream.error is None, stream.error
    assert stream.failures > 0, "the kill happened while operations were running"

    uncertain = 0
    for run_id, outcome in stream.outcomes.items():
        plan = PLANS[outcome.plan]
        allowed = {_expected(plan, outcome.done)}
        if outcome.raised:
            uncertain += 1
            allowed.add(_expected(plan, outcome.done + 1))
        actual = _observe(store, run_id)
        assert actual in allowed, (
            f"{run_id}: plan {plan}, {outcome.done} steps returned, "
            f"next {'raised' if outcome.raised else 'not run'}; saw {actual}, allowed {allowed}"
        )
    assert uncertain > 0
    _audit_indexes(server.url, prefix)
    # The restarted store keeps working: recovery finds nothing expired to re-arm.
    assert store.recover_orphaned() == []
    store.close()


# -- opening: eviction policy, unreachable server ----------------------------------------


def test_an_allkeys_eviction_policy_is_refused_unless_told_to_warn(
    private_redis: Callable[..., PrivateRedis], caplog: pytest.LogCaptureFixture
) -> None:
    server = private_redis("--maxmemory-policy", "allkeys-lru")
    with pytest.raises(ImproperlyConfigured, match=r"maxmemory-policy allkeys-lru.*noeviction"):
        CheckpointStore.open(server.url)
    store = CheckpointStore.open(server.url, eviction="warn")
    store.close()
    assert any("allkeys-lru" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_volatile_eviction_policy_is_accepted(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis("--maxmemory-policy", "volatile-lru")
    store = CheckpointStore.open(server.url)
    store.save(_record("r1"))
    assert store.load("r1") is not None
    store.close()


def test_an_unreachable_server_raises_store_unavailable_with_the_cause() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        CheckpointStore.open(f"redis://127.0.0.1:{port}/0")
    assert isinstance(caught.value.cause, redis.ConnectionError)


def test_the_key_prefix_may_come_from_the_url(shared_prefix: str) -> None:
    store = CheckpointStore.open(f"{SHARED_URL}?prefix={shared_prefix}")
    store.save(_record("r1"))
    client = redis.Redis.from_url(SHARED_URL)
    try:
        assert client.exists(_run_key(shared_prefix, "r1")) == 1
        keys = [k.decode() for k in client.scan_iter(match=f"{shared_prefix}*")]
        assert keys and all(k.startswith(f"{shared_prefix}:") for k in keys)
    finally:
        client.close()
        store.close()


# -- corrupt records -----------------------------------------------------------------------


def test_a_corrupt_record_raises_for_its_run_only_and_listing_moves_it_aside(
    shared_prefix: str,
) -> None:
    store = CheckpointStore.open(SHARED_URL, prefix=shared_prefix)
    store.save(_record("good"))
    store.save(_record("bad"))
    client = redis.Redis.from_url(SHARED_URL)
    try:
        client.set(_run_key(shared_prefix, "bad"), b"\x00{not json")
        with pytest.raises(CorruptCheckpoint):
            store.load("bad")
        with pytest.raises(CorruptCheckpoint):
            store.claim("bad")
        assert store.lease("good") is None
        assert store.load("good") is not None
        with pytest.raises(CorruptCheckpoint):  # a failed claim left the record in place
            store.load("bad")

        assert [info.run.run_id for info in store.list()] == ["good"]
        assert client.get(_run_key(shared_prefix, "bad", "/corrupt")) == b"\x00{not json"
        assert store.load("bad") is None
        assert store.count() == 1
        assert store.claim("good") is not None

        # A second corruption of the same run keeps the first copy.
        store.save(_record("bad"))
        client.set(_run_key(shared_prefix, "bad"), b"second")
        assert [info.run.run_id for info in store.list()] == ["good"]
        assert client.get(_run_key(shared_prefix, "bad", "/corrupt")) == b"\x00{not json"
        assert client.get(_run_key(shared_prefix, "bad", "/corrupt.1")) == b"second"

        # A record that is not even UTF-8, met by listing and by recovery: moved
        # aside byte for byte, and recovery goes on.
        store.save(_record("binary"))
        client.hset(_run_key(shared_prefix, "binary"), "record", b"\xff\xfe{")
        assert [info.run.run_id for info in store.list()] == ["good"]
        moved = client.hget(_run_key(shared_prefix, "binary", "/corrupt"), "record")
        assert moved == b"\xff\xfe{"
        store.save(_record("orphan"))
        assert store.claim("orphan", lease_seconds=0.1) is not None
        client.hset(_run_key(shared_prefix, "orphan"), "record", b"\xff not json")
        time.sleep(0.3)
        assert store.recover_orphaned() == []
        moved = client.hget(_run_key(shared_prefix, "orphan", "/corrupt"), "record")
        assert moved == b"\xff not json"
        assert store.load("orphan") is None

        # A key that is not a run hash at all, met by the resume sweep and by
        # recovery: dropped or moved aside, and both go on with the other runs.
        for run_id in ("pend", "pend-ok", "flying"):
            store.save(_record(run_id))
        store.request_resume("pend", {"ok": True}, "r1")
        store.request_resume("pend-ok", {"ok": True}, "r2")
        assert store.claim("flying", lease_seconds=0.1) is not None
        for run_id in ("pend", "flying"):
            client.delete(_run_key(shared_prefix, run_id))
            client.set(_run_key(shared_prefix, run_id), b"not a hash")
        assert store.due_resumes(0) == ["pend-ok"]
        time.sleep(0.3)
        assert store.recover_orphaned() == []
        assert client.get(_run_key(shared_prefix, "flying", "/corrupt")) == b"not a hash"
    finally:
        client.close()
        store.close()


# -- Redis Cluster ---------------------------------------------------------------------


def test_on_a_cluster_each_script_stays_in_one_slot_and_the_groups_use_every_primary(
    redis_cluster: RedisCluster,
) -> None:
    prefix = f"cc-cluster-{uuid4().hex[:8]}"
    store = CheckpointStore.open(redis_cluster.url, prefix=prefix)
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        run_ids = [f"order-{i}" for i in range(64)]
        for run_id in run_ids:
            store.save(_record(run_id))
        claimed = [run_id for run_id in run_ids[:32] if store.claim(run_id) is not None]
        assert claimed == run_ids[:32]
        store.request_resume(run_ids[40], {"ok": True}, request_id="r1")

        for run_id in run_ids:
            group = f"{prefix}:{{{group_of(run_id):02x}}}:"
            keys = [_run_key(prefix, run_id), _run_key(prefix, run_id, "/ended")]
            keys += [group + name for name in ("paused", "inflight", "pending", "deadlines")]
            assert len({client.keyslot(key) for key in keys}) == 1, run_id
        nodes = {client.get_node_from_key(f"{prefix}:{{{g:02x}}}:paused").name for g in range(16)}
        assert len(nodes) == len(redis_cluster.ports), "the 16 groups spread over every primary"
        assert store.count() == 64
        assert store.stats()["in_flight"] == 32
        assert store.due_resumes(0) == [run_ids[40]]
        assert sorted(info.run.run_id for info in store.list()) == sorted(run_ids)
        # The claimers (this process) are alive: nothing is orphaned yet.
        assert store.recover_orphaned() == []
    finally:
        store.close()
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def test_a_single_node_client_on_a_cluster_is_refused_naming_the_fix(
    redis_cluster: RedisCluster,
) -> None:
    client = redis.Redis.from_url(redis_cluster.url)
    try:
        with pytest.raises(ImproperlyConfigured, match=r"pass a redis\.cluster\.RedisCluster"):
            CheckpointStore.open(redis_cluster.url, client=client)
    finally:
        client.close()
    with pytest.raises(ImproperlyConfigured, match="database 0 only"):
        CheckpointStore.open(redis_cluster.url.replace("/0", "/3"))
    # A cluster client of the user's own is taken as it is.
    own = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    store = CheckpointStore.open(redis_cluster.url, client=own, prefix=f"cc-own-{uuid4().hex}")
    try:
        store.save(_record("mine"))
        assert store.load("mine") is not None and store.count() == 1
        store.cancel("mine")
        assert store.prune_ended(0) == 1
    finally:
        store.close()
        own.close()


@pytest.mark.slow
def test_a_cluster_primary_killed_and_restarted_loses_nothing_and_applies_nothing_half(
    tmp_path: Path,
) -> None:
    cluster = start_cluster(tmp_path / "cluster", "--appendonly", "yes", "--appendfsync", "always")
    prefix = f"cc-cluster-kill-{uuid4().hex[:8]}"
    store = CheckpointStore.open(cluster.url, prefix=prefix, lease_seconds=3600)
    probe = redis.cluster.RedisCluster.from_url(cluster.url)
    try:
        run_ids = [f"run-{i}" for i in range(48)]
        for run_id in run_ids:
            store.save(_record(run_id))

        def port_of(run_id: str) -> int:
            return int(probe.get_node_from_key(_run_key(prefix, run_id)).port)

        victim = port_of(run_ids[0])
        on_victim = {run_id for run_id in run_ids if port_of(run_id) == victim}
        cluster.kill(victim)
        outcome: dict[str, str] = {}
        for run_id in run_ids:
            try:
                outcome[run_id] = "claimed" if store.claim(run_id) is not None else "none"
            except StoreUnavailable:
                outcome[run_id] = "unavailable"
        assert {outcome[run_id] for run_id in on_victim} == {"unavailable"}
        assert "none" not in outcome.values(), "no claim lost to a half-applied earlier one"

        cluster.restart(victim)
        after = CheckpointStore.open(cluster.url, prefix=prefix)
        try:
            for run_id in run_ids:
                run = after.load(run_id)
                assert run is not None, f"{run_id}: an acknowledged save was lost"
                held = after.lease(run_id) is not None
                assert held == (outcome[run_id] == "claimed"), f"{run_id}: {outcome[run_id]}"
            assert after.count() == len(run_ids)
            assert after.stats()["in_flight"] == list(outcome.values()).count("claimed")
        finally:
            after.close()
        # The store that saw the failure works again once the cluster is whole.
        for run_id in sorted(on_victim):
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert store.claim(run_id) is not None
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the store never reached the node again"
                    time.sleep(0.2)
    finally:
        store.close()
        probe.close()
        cluster.stop()


def test_a_server_that_lost_its_scripts_gets_them_again_and_runs_each_call_once(
    private_redis: Callable[..., PrivateRedis],
) -> None:
    server = private_redis()
    store = CheckpointStore.open(server.url, prefix="cc-noscript")
    client = redis.Redis.from_url(server.url)
    try:
        store.save(_record("r1"))
        client.script_flush()  # as after a restart or a failover
        run = store.claim("r1")
        assert run is not None and run.lease is not None and run.lease.token == 1
        client.script_flush()
        store.complete("r1", token=run.lease.token)
        ended = store.ended("r1")
        assert ended is not None and ended.status == "completed"
        assert store.claim("r1") is None
    finally:
        client.close()
        store.close()


# -- records an older version wrote ------------------------------------------------------


def test_a_deadline_an_older_version_wrote_is_still_enforced_in_the_compare_and_set(
    shared_prefix: str,
) -> None:
    """0.1.0 marked a pause with a deadline ``deadline=1`` without saying whether it
    expires or resumes: the record says, and the deadline index says when."""
    store = CheckpointStore.open(f"{SHARED_URL}?prefix={shared_prefix}")
    client = redis.Redis.from_url(SHARED_URL)
    try:
        past = utcnow() - timedelta(seconds=1)
        store.save(_record("expires", expires_at=past))
        store.save(_record("resumes", expires_at=past, on_timeout="resume"))
        for run_id in ("expires", "resumes"):
            client.hset(_run_key(shared_prefix, run_id), "deadline", "1")
        with pytest.raises(PauseExpired):
            store.request_resume("expires", "late", "req-1")
        assert store.request_resume("resumes", "late", "req-1").request_id == "req-1"
        assert store.request_resume("expires", None, "t-1", timed_out=True).timed_out
    finally:
        client.close()
        store.close()


def test_a_tombstone_an_older_version_wrote_is_read_back_with_when_it_ended(
    shared_prefix: str,
) -> None:
    store = CheckpointStore.open(f"{SHARED_URL}?prefix={shared_prefix}")
    client = redis.Redis.from_url(SHARED_URL)
    try:
        store.save(_record("r1"))
        store.cancel("r1")
        client.hdel(_run_key(shared_prefix, "r1") + "/ended", "ended_at")
        ended = store.ended("r1")
        assert ended is not None and ended.status == "cancelled"
        (listed,) = store.iter_ended()
        assert listed.ended_at is not None and abs(listed.ended_at - utcnow()) < timedelta(
            seconds=60
        )
    finally:
        client.close()
        store.close()
