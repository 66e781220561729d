"""Store transitions killed at each system call: scenarios, the process that
runs them, and the test side's driver.

The file store is killed at each system call that changes its files; the Redis
store at each round trip to the server (``sendto``, ``recvfrom``), which is
where a process can die between the steps of a transition that takes several
(a pause naming a business key, an answer to a key, the release of a key).

A scenario prepares one run (``setup``), performs one transition on it
(``transition``), and judges what a process that starts afresh finds through
the public API (``check``): the run as it was before the transition or as the
transition leaves it (after at most one ``recover_orphaned()`` or read repaired
it), nothing lost and nothing stuck. ``check`` returns ``"before"`` or
``"after"`` and raises ``AssertionError`` otherwise.

:func:`serve` is the process the test drives with one JSON command per line
on stdin (started with ``python -c``, never inside pytest). For each kill point
it forks a child that sets the scenario up and then waits, so that ``strace -p``
attaches to a process whose next system calls are the transition's own; and it
forks a fresh child to run the check.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointExists,
    LeaseLost,
    PausedWorkflow,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from celery_checkpoint.store.file import FileStore
from celery_checkpoint.store.redis import RedisStore, group_of

EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)
#: Deadlines far ahead, so only ``due_timeouts(now=...)`` makes them due.
LATE = datetime(2100, 1, 1, tzinfo=timezone.utc)
EARLY = datetime(2099, 1, 1, tzinfo=timezone.utc)
SECOND = timedelta(seconds=1)
LONG = 3600.0
RUN = "r"
OTHER = "o"

Context = dict[str, Any]


def record(run_id: str = RUN, step: str = "first", pause_seq: int = 1, **fields: Any) -> Any:
    """A run's record, the same in every process (no field taken from the clock)."""
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step=step,
        pause_seq=pause_seq,
        state={"step": step, "items": [1, 2, 3]},
        args=[42],
        created_at=EPOCH,
        paused_at=EPOCH,
        **fields,
    )


@dataclass(frozen=True)
class Scenario:
    setup: Callable[[Any], Context]
    transition: Callable[[Any, Context], object]
    check: Callable[[Any, Context], str]


def open_store(target: str, *, setup: bool = False) -> Any:
    """The store at ``target``: a directory (the file store, without fsync for a
    set-up), or ``redis://...#<prefix>`` (the Redis store under that key prefix)."""
    if target.startswith("redis://"):
        url, _, prefix = target.partition("#")
        return RedisStore(url, prefix=prefix)
    return FileStore(target, fsync=not setup)


def has_early(store: Any, key: str) -> bool:
    """Whether the store keeps an early answer for ``key`` (read from its storage)."""
    if isinstance(store, FileStore):
        return (store.root / "early" / f"{key.replace('/', '%')}.json").exists()
    group = f"{store.prefix}:{{{group_of(key):02x}}}:"
    return bool(store._conn.client.hexists(f"{group}key:{key}", "early"))


# -- what every check asserts ------------------------------------------------------------


def raises(exc: type[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except exc:
        return
    raise AssertionError(f"expected {exc.__name__}")


def assert_same(found: Any, expected: Any) -> None:
    assert found is not None, "the run's record is lost"
    keys = ("run_id", "step", "pause_seq", "state", "args", "expires_at")
    got = {k: getattr(found, k) for k in keys}
    want = {k: getattr(expected, k) for k in keys}
    assert got == want, f"record differs: {got} != {want}"


def assert_deadline(store: FileStore, at: datetime | None) -> None:
    """The run's deadline fires at ``at`` and not a second before (None: never)."""
    if at is None:
        assert RUN not in store.due_timeouts(LATE + 1000 * SECOND), "a deadline it does not have"
        return
    assert RUN not in store.due_timeouts(at - SECOND), "the deadline would fire early"
    assert RUN in store.due_timeouts(at + SECOND), "the deadline is lost"


def assert_resend(store: FileStore, due: bool) -> None:
    resent = store.due_resumes(0)
    if due:
        assert resent == [RUN], f"the pending request is not re-sent: {resent}"
    else:
        assert RUN not in resent, "re-sends a request that is not pending"


def claim_next(store: FileStore, token: int) -> None:
    """The next claim wins with ``token``; the run can then complete."""
    run = store.claim(RUN, lease_seconds=LONG)
    assert run is not None, "the run cannot be claimed"
    assert run.lease is not None
    assert run.lease.token == token, f"claimed with token {run.lease.token}, not {token}"
    store.complete(RUN, token=token)
    ended = store.ended(RUN)
    assert ended is not None
    assert ended.status == "completed"


def in_flight_before(store: FileStore, token: int, *, request: str | None = "req-1") -> str:
    """The holder killed with its lease: recovery re-arms it, its request is re-sent."""
    lease = store.lease(RUN)
    assert lease is not None, "the lease vanished"
    assert lease.token == token
    rearmed = store.recover_orphaned()
    assert [r.run_id for r in rearmed] == [RUN], "a dead holder's run is not re-armed"
    run = store.load(RUN)
    assert run is not None
    assert run.recoveries == 1
    assert store.lease(RUN) is None
    assert_resend(store, request is not None)
    claim_next(store, token + 1)
    return "before"


def assert_ended(store: FileStore, status: str, error: type[BaseException]) -> None:
    ended = store.ended(RUN)
    assert ended is not None, "the tombstone is lost"
    assert ended.status == status, ended.status
    assert store.load(RUN) is None, "an ended run still reads as paused"
    assert store.lease(RUN) is None
    assert RUN not in [info.run.run_id for info in store.list()]
    assert store.claim(RUN) is None, "an ended run was claimed"
    raises(error, lambda: store.request_resume(RUN, "late", "req-late"))
    assert store.recover_orphaned() == []
    assert_resend(store, False)
    assert_deadline(store, None)
    raises(CheckpointExists, lambda: store.save(record(), create=True))


# -- the scenarios -------------------------------------------------------------------------


def nothing(store: FileStore) -> Context:
    return {}


def check_save_first(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.load(RUN) is None:
        outcome = "before"
        assert store.count() == 0
        assert_deadline(store, None)
        store.save(record(expires_at=LATE))  # the caller's retry
    assert_same(store.load(RUN), record(expires_at=LATE))
    assert store.count() == 1
    assert_deadline(store, LATE)
    assert_resend(store, False)
    claim_next(store, 1)
    return outcome


def setup_ended(store: FileStore) -> Context:
    store.save(record(step="earlier"))
    run = store.claim(RUN)
    assert run is not None
    assert run.lease is not None
    store.complete(RUN, token=run.lease.token)
    return {}


def check_save_over_ended(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.load(RUN) is None:
        outcome = "before"
        assert_ended(store, "completed", AlreadyResumed)
        store.save(record(expires_at=LATE))  # the caller's retry
    assert_same(store.load(RUN), record(expires_at=LATE))
    assert store.ended(RUN) is None
    assert_deadline(store, LATE)
    claim_next(store, 2)  # tokens go on growing past the ended run's
    return outcome


def setup_in_flight(store: FileStore, *, expires_at: datetime | None = None) -> Context:
    store.save(record(expires_at=expires_at))
    store.request_resume(RUN, {"approved": True}, "req-1")
    run = store.claim(RUN, lease_seconds=LONG)
    assert run is not None
    assert run.lease is not None
    return {"token": run.lease.token, "expires": run.lease.expires_at.isoformat()}


def repause(store: FileStore, ctx: Context) -> object:
    store.save(record(step="second", pause_seq=2, expires_at=EARLY), token=ctx["token"])
    return None


def check_repause(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    if run.pause_seq == 1:
        assert_deadline(store, LATE)
        return in_flight_before(store, ctx["token"])
    assert_same(run, record(step="second", pause_seq=2, expires_at=EARLY))
    assert store.lease(RUN) is None
    assert store.recover_orphaned() == []
    assert_deadline(store, EARLY)
    assert_resend(store, False)
    raises(ResumeRejected, lambda: store.request_resume(RUN, "x", "req-1", pause_seq=1))
    claim_next(store, ctx["token"] + 1)
    return "after"


def repause_later(store: FileStore, ctx: Context) -> object:
    store.save(record(step="second", pause_seq=2, expires_at=LATE), token=ctx["token"])
    return None


def check_repause_later(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    if run.pause_seq == 1:
        assert_deadline(store, EARLY)
        return in_flight_before(store, ctx["token"])
    assert_same(run, record(step="second", pause_seq=2, expires_at=LATE))
    assert store.recover_orphaned() == []
    assert_deadline(store, LATE)
    claim_next(store, ctx["token"] + 1)
    return "after"


def setup_failed(store: FileStore) -> Context:
    ctx = setup_in_flight(store)
    store.release(RUN, ctx["token"], error="boom")
    return ctx


def check_replace_failed(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    assert run.resume is not None
    outcome = "after"
    if run.resume.request_id == "req-1":
        outcome = "before"
        assert run.resume.status == "failed"
        assert_resend(store, False)
        store.request_resume(RUN, "second answer", "req-2")  # the caller's retry
    assert_resend(store, True)
    raises(AlreadyResumed, lambda: store.request_resume(RUN, "third", "req-3"))
    claim_next(store, ctx["token"] + 1)
    return outcome


def setup_interrupted_cancel(store: FileStore) -> Context:
    store.save(record(expires_at=LATE))
    store.request_resume(RUN, {"approved": True}, "req-1")
    stale = (store.root / "paused" / f"{RUN}.json").read_bytes()
    store.cancel(RUN)
    (store.root / "paused" / f"{RUN}.json").write_bytes(stale)
    (store.root / "pending" / RUN).touch()
    (store.root / "deadlines" / RUN).touch()
    return {}


def check_interrupted_cancel(store: FileStore, ctx: Context) -> str:
    stale = (store.root / "paused" / f"{RUN}.json").exists()
    assert_ended(store, "cancelled", RunCancelled)
    assert store.count() == 0
    assert not (store.root / "paused" / f"{RUN}.json").exists(), "the stale record stays"
    return "before" if stale else "after"


def setup_paused(store: FileStore) -> Context:
    store.save(record(expires_at=LATE))
    return {}


def check_request_resume(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    outcome = "after"
    if run.current_resume is None:
        outcome = "before"
        assert_resend(store, False)
        store.request_resume(RUN, {"approved": True}, "req-1")  # the caller's retry
    assert_deadline(store, LATE)
    assert_resend(store, True)
    raises(AlreadyResumed, lambda: store.request_resume(RUN, "other", "req-2"))
    again = store.request_resume(RUN, {"approved": True}, "req-1")
    assert again.request_id == "req-1"
    claim_next(store, 1)
    return outcome


def setup_answered(store: FileStore) -> Context:
    store.save(record(expires_at=LATE))
    store.request_resume(RUN, {"approved": True}, "req-1")
    return {}


def check_claim(store: FileStore, ctx: Context) -> str:
    if store.lease(RUN) is not None:
        in_flight_before(store, 1)  # the claim's holder is dead: re-armed past token 1
        return "after"
    assert store.recover_orphaned() == []
    assert_resend(store, True)
    claim_next(store, 1)
    return "before"


def check_heartbeat(store: FileStore, ctx: Context) -> str:
    lease = store.lease(RUN)
    assert lease is not None
    before = datetime.fromisoformat(ctx["expires"])
    assert lease.expires_at >= before
    outcome = "after" if lease.expires_at > before else "before"
    in_flight_before(store, ctx["token"])
    return outcome


def check_complete(store: FileStore, ctx: Context) -> str:
    if store.ended(RUN) is None:
        return in_flight_before(store, ctx["token"])
    assert_ended(store, "completed", AlreadyResumed)
    done = store.request_resume(RUN, {"approved": True}, "req-1")
    assert done.request_id == "req-1", "the request that completed the run is its answer"
    store.complete(RUN, token=ctx["token"])  # idempotent for its holder
    return "after"


def check_release(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    assert run.resume is not None
    if run.resume.status == "pending":
        return in_flight_before(store, ctx["token"])
    assert run.resume.error == "boom"
    assert store.lease(RUN) is None
    assert store.recover_orphaned() == []
    assert_resend(store, False)
    store.request_resume(RUN, "second answer", "req-2")  # a failed request is replaced
    assert_resend(store, True)
    claim_next(store, ctx["token"] + 1)
    return "after"


def setup_paused_with_other(store: FileStore) -> Context:
    setup_answered(store)
    store.save(record(OTHER))
    return {}


def check_cancel(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.ended(RUN) is None:
        outcome = "before"
        assert store.count() == 2
        assert_deadline(store, LATE)
        assert_resend(store, True)
        assert store.cancel(RUN, reason="stop") is not None  # the caller's retry
    assert_ended(store, "cancelled", RunCancelled)
    assert store.count() == 1
    assert [info.run.run_id for info in store.list()] == [OTHER]
    return outcome


def check_end_in_flight(store: FileStore, ctx: Context) -> str:
    token = ctx["token"]
    if store.ended(RUN) is None:
        return in_flight_before(store, token)
    assert_ended(store, "expired", PauseExpired)
    raises(LeaseLost, lambda: store.heartbeat(RUN, token))
    raises(LeaseLost, lambda: store.complete(RUN, token=token))
    return "after"


def setup_orphan(store: FileStore) -> Context:
    store.save(record(expires_at=LATE))
    store.request_resume(RUN, {"approved": True}, "req-1")
    run = store.claim(RUN, lease_seconds=0)  # expired at once
    assert run is not None
    assert run.lease is not None
    assert store.due_resumes(0) == []  # in flight: not re-sent
    # Its pending entry gone (a store an older version wrote): recovery must put
    # it back, or the request would never be sent again.
    (store.root / "pending" / RUN).unlink()
    # And a temp file a writer left an hour ago, for the sweep to remove.
    old = time.time() - 2 * 3600
    path = store.root / "tmp" / "1.dead.tmp"
    path.write_bytes(b"{")
    os.utime(path, (old, old))
    return {"token": run.lease.token}


def check_recover(store: FileStore, ctx: Context) -> str:
    rearmed = [r.run_id for r in store.recover_orphaned()]
    outcome = "before" if rearmed == [RUN] else "after"
    assert rearmed in ([RUN], [])
    run = store.load(RUN)
    assert run is not None
    assert run.recoveries == 1, f"re-armed {run.recoveries} times"
    assert run.last_token == ctx["token"]
    assert store.lease(RUN) is None
    assert_deadline(store, LATE)
    assert_resend(store, True)
    assert "1.dead.tmp" not in os.listdir(store.root / "tmp"), "an old temp file stays"
    claim_next(store, ctx["token"] + 1)
    return outcome


def setup_resend(store: FileStore) -> Context:
    setup_answered(store)
    store.save(record(OTHER))
    (store.root / "pending" / OTHER).touch()  # an entry its record does not need
    return {}


def check_resend(store: FileStore, ctx: Context) -> str:
    stale = (store.root / "pending" / OTHER).exists()
    assert_resend(store, True)
    assert not (store.root / "pending" / OTHER).exists()
    claim_next(store, 1)
    return "before" if stale else "after"


def setup_prune(store: FileStore) -> Context:
    store.save(record(key=KEY))
    run = store.claim(RUN)
    assert run is not None and run.lease is not None
    store.complete(RUN, token=run.lease.token, result='"done"')  # a result not delivered
    store.answer_key(KEY2, None, "evt-1", ttl=0.001)  # an early answer that expired
    time.sleep(0.01)
    # A completion killed before it released the key: the entry names an ended run.
    key_file(store, "keys", KEY).write_bytes(RUN.encode())
    # A cancel of another run killed after its tombstone: a stale record beside it.
    store.save(record(OTHER))
    stale = (store.root / "paused" / f"{OTHER}.json").read_bytes()
    store.cancel(OTHER)
    (store.root / "paused" / f"{OTHER}.json").write_bytes(stale)
    return {}


def check_prune(store: FileStore, ctx: Context) -> str:
    for run_id in (RUN, OTHER):
        assert store.load(run_id) is None, f"{run_id} came back from the dead"
        assert store.claim(run_id) is None
    assert store.count() == 0
    assert list(store.list()) == []
    left = [run_id for run_id in (RUN, OTHER) if store.ended(run_id) is not None]
    if left:
        assert store.prune_ended(0) == len(left)  # the next pass finishes
    for run_id in (RUN, OTHER):
        assert store.load(run_id) is None
        assert not store.exists(run_id)
    assert store.due_deliveries(0) == [], "a pruned run's result is still to deliver"
    assert store.prune_ended(0) == 0
    assert not key_file(store, "early", KEY2).exists(), "an expired early answer stays"
    assert not key_file(store, "keys", KEY).exists(), "a key entry of an ended run stays"
    assert store.answer_key(KEY2, "late", "evt-2", ttl=LONG)[0] is None
    return "before" if len(left) == 2 else "after"


def setup_early_deadline(store: FileStore) -> Context:
    store.save(record(expires_at=LATE))
    early = EARLY.timestamp()
    os.utime(store.root / "deadlines" / RUN, (early, early))  # a re-pause killed midway
    (store.root / "deadlines" / OTHER).touch()  # an entry with no record
    return {}


def check_due_timeouts(store: FileStore, ctx: Context) -> str:
    early = (store.root / "deadlines" / RUN).stat().st_mtime <= EARLY.timestamp()
    assert store.due_timeouts(EARLY + SECOND) == []
    assert_deadline(store, LATE)
    assert store.due_timeouts(LATE + SECOND) == [RUN]
    return "before" if early else "after"


# -- business keys, early answers, results kept until delivered -------------------------------

KEY = "pay/pi_1"  # a '/': the key's file name escapes it
KEY2 = "pay/pi_2"


def key_file(store: FileStore, kind: str, key: str) -> Any:
    name = key.replace("/", "%")
    return store.root / kind / (f"{name}.json" if kind == "early" else name)


def setup_early_answer(store: FileStore) -> Context:
    run_id, _ = store.answer_key(KEY, {"paid": 10}, "evt-1", ttl=LONG)
    assert run_id is None
    return {}


def check_keyed_save_takes_the_early_answer(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.load(RUN) is None:
        outcome = "before"
        assert store.find_key(KEY) is None, "a key held by a run that is not there"
        assert store.count() == 0
        kept = store.answer_key(KEY, {"paid": 10}, "evt-1", ttl=LONG)  # still waiting
        assert kept[0] is None and kept[1].input == {"paid": 10}, "the early answer is lost"
        taken = store.save(record(key=KEY, expires_at=LATE))  # the caller's retry
        assert taken is not None and taken.request_id == "evt-1"
    run = store.load(RUN)
    assert run is not None and run.resume is not None, "the early answer is lost"
    assert (run.resume.request_id, run.resume.status) == ("evt-1", "pending")
    assert_same(run, record(key=KEY, expires_at=LATE))
    assert store.find_key(KEY) == RUN
    assert_deadline(store, LATE)
    assert_resend(store, True)
    again = store.answer_key(KEY, {"paid": 10}, "evt-1", ttl=LONG)
    assert again[0] == RUN, "the early answer is kept after its pause took it"
    raises(AlreadyResumed, lambda: store.answer_key(KEY, None, "evt-2", ttl=LONG))
    claim_next(store, 1)
    # Taken once: a later pause naming the key finds nothing waiting.
    assert not has_early(store, KEY), "the early answer is kept after its pause took it"
    assert store.save(record(OTHER, key=KEY)) is None, "the early answer was taken twice"
    return outcome


def check_answer_key_keeps_an_early_answer(store: FileStore, ctx: Context) -> str:
    kept = has_early(store, KEY)
    outcome = "after" if kept else "before"
    assert store.find_key(KEY) is None
    if kept:
        raises(AlreadyResumed, lambda: store.answer_key(KEY, None, "evt-2", ttl=LONG))
    else:
        store.answer_key(KEY, {"paid": 10}, "evt-1", ttl=LONG)  # the caller's retry
    taken = store.save(record(key=KEY, expires_at=LATE))
    assert taken is not None and (taken.request_id, taken.input) == ("evt-1", {"paid": 10})
    assert not has_early(store, KEY), "taken, and kept still"
    claim_next(store, 1)
    return outcome


def setup_keyed(store: FileStore) -> Context:
    store.save(record(key=KEY, expires_at=LATE))
    return {}


def check_answer_key_to_a_live_run(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    assert store.find_key(KEY) == RUN
    outcome = "after"
    if run.current_resume is None:
        outcome = "before"
        assert_resend(store, False)
        assert store.answer_key(KEY, {"approved": True}, "req-1", ttl=LONG)[0] == RUN
    assert not has_early(store, KEY), "kept early although the run waits"
    assert_resend(store, True)
    raises(AlreadyResumed, lambda: store.answer_key(KEY, "other", "req-2", ttl=LONG))
    assert store.answer_key(KEY, {"approved": True}, "req-1", ttl=LONG)[0] == RUN
    claim_next(store, 1)
    assert store.find_key(KEY) is None, "a completed run still holds its key"
    return outcome


def setup_stale_key_entry(store: FileStore) -> Context:
    store.save(record(OTHER, key=KEY))
    store.cancel(OTHER)
    # A cancel killed before it released the key: the entry names a run that ended.
    key_file(store, "keys", KEY).write_bytes(OTHER.encode())
    return {}


def check_keyed_save_over_a_stale_entry(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.load(RUN) is None:
        outcome = "before"
        assert store.find_key(KEY) is None
        store.save(record(key=KEY, expires_at=LATE))  # the caller's retry
    assert store.find_key(KEY) == RUN
    raises(CheckpointExists, lambda: store.save(record(OTHER, key=KEY)))
    assert store.answer_key(KEY, "yes", "req-1", ttl=LONG)[0] == RUN
    claim_next(store, 1)
    return outcome


def setup_in_flight_keyed(store: FileStore) -> Context:
    store.save(record(key=KEY, expires_at=LATE))
    store.request_resume(RUN, {"approved": True}, "req-1")
    run = store.claim(RUN, lease_seconds=LONG)
    assert run is not None and run.lease is not None
    return {"token": run.lease.token}


def check_repause_with_a_new_key(store: FileStore, ctx: Context) -> str:
    run = store.load(RUN)
    assert run is not None
    if run.pause_seq == 1:
        assert store.find_key(KEY) == RUN
        assert store.find_key(KEY2) is None
        return in_flight_before(store, ctx["token"])
    assert_same(run, record(step="second", pause_seq=2, key=KEY2, expires_at=EARLY))
    assert store.find_key(KEY2) == RUN
    assert store.find_key(KEY) is None, "the former key is still held"
    store.save(record(OTHER, key=KEY))  # free for another run
    assert store.find_key(KEY) == OTHER
    claim_next(store, ctx["token"] + 1)
    return "after"


def check_cancel_releases_the_key(store: FileStore, ctx: Context) -> str:
    outcome = "after"
    if store.ended(RUN) is None:
        outcome = "before"
        assert store.find_key(KEY) == RUN
        store.cancel(RUN)  # the caller's retry
    assert_ended(store, "cancelled", RunCancelled)
    assert store.find_key(KEY) is None
    assert store.answer_key(KEY, "early", "evt-1", ttl=LONG)[0] is None
    taken = store.save(record(OTHER, key=KEY))
    assert taken is not None and taken.request_id == "evt-1"
    assert store.find_key(KEY) == OTHER
    return outcome


RESULT = '{"shipped": true}'


def check_complete_with_result(store: FileStore, ctx: Context) -> str:
    if store.ended(RUN) is None:
        outcome = in_flight_before(store, ctx["token"])  # completes it without a result
        assert store.due_deliveries(0) == [], "a result to deliver that was never kept"
        return outcome
    assert_ended(store, "completed", AlreadyResumed)
    ended = store.ended(RUN)
    assert ended is not None and ended.result == RESULT, "the result is lost"
    assert ended.ended_at is not None
    assert store.due_deliveries(0) == [RUN], "the result is not listed to deliver"
    store.complete(RUN, token=ctx["token"], result=RESULT)  # idempotent for its holder
    store.mark_delivered(RUN)
    assert store.due_deliveries(0) == []
    return "after"


def check_complete_keyed_with_result(store: FileStore, ctx: Context) -> str:
    if store.ended(RUN) is None:
        assert store.find_key(KEY) == RUN
        outcome = in_flight_before(store, ctx["token"])
        assert store.due_deliveries(0) == [], "a result to deliver that was never kept"
    else:
        outcome = check_complete_with_result(store, ctx)
    assert store.find_key(KEY) is None, "a completed run still holds its key"
    store.save(record(OTHER, key=KEY))
    assert store.find_key(KEY) == OTHER
    return outcome


def check_restore(store: FileStore) -> str:
    outcome = "after"
    if store.load(RUN) is None:
        outcome = "before"
        assert store.find_key(KEY) is None
        assert store.restore(record(key=KEY, expires_at=LATE, last_token=4))  # the retry
    assert store.restore(record(key=KEY, expires_at=LATE, last_token=4)) is False
    assert_same(store.load(RUN), record(key=KEY, expires_at=LATE))
    assert store.find_key(KEY) == RUN
    assert_deadline(store, LATE)
    raises(CheckpointExists, lambda: store.save(record(OTHER, key=KEY)))
    claim_next(store, 5)
    assert store.find_key(KEY) is None
    return outcome


def setup_completed_with_result(store: FileStore) -> Context:
    ctx = setup_in_flight(store)
    store.complete(RUN, token=ctx["token"], result=RESULT)
    return ctx


def check_mark_delivered(store: FileStore, ctx: Context) -> str:
    due = store.due_deliveries(0)
    outcome = "before" if due == [RUN] else "after"
    assert due in ([RUN], [])
    if due:
        store.mark_delivered(RUN)  # the caller's retry
    assert store.due_deliveries(0) == []
    ended = store.ended(RUN)
    assert ended is not None and ended.result == RESULT, "the tombstone lost its result"
    return outcome


SCENARIOS: dict[str, Scenario] = {
    "save first pause": Scenario(
        nothing, lambda s, c: s.save(record(expires_at=LATE)), check_save_first
    ),
    "save over an ended run": Scenario(
        setup_ended, lambda s, c: s.save(record(expires_at=LATE)), check_save_over_ended
    ),
    "save re-pause with token": Scenario(
        lambda s: setup_in_flight(s, expires_at=LATE), repause, check_repause
    ),
    "save re-pause, later deadline": Scenario(
        lambda s: setup_in_flight(s, expires_at=EARLY), repause_later, check_repause_later
    ),
    "request_resume": Scenario(
        setup_paused,
        lambda s, c: s.request_resume(RUN, {"approved": True}, "req-1"),
        check_request_resume,
    ),
    "request_resume over a failed one": Scenario(
        setup_failed,
        lambda s, c: s.request_resume(RUN, "second answer", "req-2"),
        check_replace_failed,
    ),
    "claim": Scenario(setup_answered, lambda s, c: s.claim(RUN, lease_seconds=LONG), check_claim),
    "claim meets a cancel's leftover": Scenario(
        setup_interrupted_cancel, lambda s, c: s.claim(RUN), check_interrupted_cancel
    ),
    "heartbeat": Scenario(
        setup_in_flight,
        lambda s, c: s.heartbeat(RUN, c["token"], lease_seconds=2 * LONG),
        check_heartbeat,
    ),
    "complete": Scenario(
        setup_in_flight, lambda s, c: s.complete(RUN, token=c["token"]), check_complete
    ),
    "release": Scenario(
        setup_in_flight, lambda s, c: s.release(RUN, c["token"], error="boom"), check_release
    ),
    "cancel a paused run": Scenario(
        setup_paused_with_other, lambda s, c: s.cancel(RUN, reason="stop"), check_cancel
    ),
    "end an in-flight run": Scenario(
        setup_in_flight,
        lambda s, c: s.end(RUN, "expired", reason="deadline", token=c["token"]),
        check_end_in_flight,
    ),
    "recover_orphaned re-arm": Scenario(
        setup_orphan, lambda s, c: s.recover_orphaned(), check_recover
    ),
    "due_resumes": Scenario(setup_resend, lambda s, c: s.due_resumes(0), check_resend),
    "due_timeouts repair": Scenario(
        setup_early_deadline, lambda s, c: s.due_timeouts(EARLY + SECOND), check_due_timeouts
    ),
    "prune_ended": Scenario(setup_prune, lambda s, c: s.prune_ended(0), check_prune),
    "save naming a key takes its early answer": Scenario(
        setup_early_answer,
        lambda s, c: s.save(record(key=KEY, expires_at=LATE)),
        check_keyed_save_takes_the_early_answer,
    ),
    "save naming a key over a stale key entry": Scenario(
        setup_stale_key_entry,
        lambda s, c: s.save(record(key=KEY, expires_at=LATE)),
        check_keyed_save_over_a_stale_entry,
    ),
    "save re-pause with a new key": Scenario(
        setup_in_flight_keyed,
        lambda s, c: s.save(
            record(step="second", pause_seq=2, key=KEY2, expires_at=EARLY), token=c["token"]
        ),
        check_repause_with_a_new_key,
    ),
    "answer_key keeps an early answer": Scenario(
        nothing,
        lambda s, c: s.answer_key(KEY, {"paid": 10}, "evt-1", ttl=LONG),
        check_answer_key_keeps_an_early_answer,
    ),
    "answer_key to a live run": Scenario(
        setup_keyed,
        lambda s, c: s.answer_key(KEY, {"approved": True}, "req-1", ttl=LONG),
        check_answer_key_to_a_live_run,
    ),
    "cancel releases the key": Scenario(
        setup_keyed, lambda s, c: s.cancel(RUN), check_cancel_releases_the_key
    ),
    "complete with a result": Scenario(
        setup_in_flight,
        lambda s, c: s.complete(RUN, token=c["token"], result=RESULT),
        check_complete_with_result,
    ),
    "mark_delivered": Scenario(
        setup_completed_with_result, lambda s, c: s.mark_delivered(RUN), check_mark_delivered
    ),
    "complete a keyed run with a result": Scenario(
        setup_in_flight_keyed,
        lambda s, c: s.complete(RUN, token=c["token"], result=RESULT),
        check_complete_keyed_with_result,
    ),
    "restore a keyed pause": Scenario(
        nothing,
        lambda s, c: s.restore(record(key=KEY, expires_at=LATE, last_token=4)),
        lambda s, c: check_restore(s),
    ),
}

#: The scenarios of the Redis store: the transitions of more than one round trip.
REDIS_SCENARIOS = [
    "save naming a key takes its early answer",
    "save re-pause with a new key",
    "answer_key keeps an early answer",
    "answer_key to a live run",
    "cancel releases the key",
    "complete a keyed run with a result",
    "restore a keyed pause",
    "complete with a result",
    "request_resume",
]


# -- the process the test drives -----------------------------------------------------------


def _fork(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child running ``body(write_fd)``; return its pid and the read end."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            body(write_end)
        except BaseException:
            text = traceback.format_exc()
            code = 3
            with contextlib.suppress(OSError):
                os.write(2, text.encode())
                os.write(write_end, json.dumps({"error": text}).encode() + b"\n")
        os._exit(code)
    os.close(write_end)
    return pid, read_end


def _read_reply(fd: int) -> dict[str, Any]:
    with os.fdopen(fd, "rb") as pipe:
        line = pipe.readline()
    reply: dict[str, Any] = json.loads(line) if line else {}
    return reply


def _start(name: str, directory: str) -> tuple[int, int, dict[str, Any]]:
    """Fork the child that will run the transition: set up, then wait for "go"."""
    scenario = SCENARIOS[name]
    go_read, go_write = os.pipe()

    def body(report: int) -> None:
        os.close(go_write)
        ctx = scenario.setup(open_store(directory, setup=True))
        store = open_store(directory)
        os.write(report, json.dumps({"ctx": ctx}).encode() + b"\n")
        os.read(go_read, 1)
        scenario.transition(store, ctx)

    pid, report = _fork(body)
    os.close(go_read)
    with os.fdopen(report, "rb") as pipe:
        line = pipe.readline()
    reply = json.loads(line) if line else {"error": "the child died during its set-up"}
    return pid, go_write, reply


def _check(name: str, directory: str, ctx: Context) -> dict[str, Any]:
    def body(report: int) -> None:
        outcome = SCENARIOS[name].check(open_store(directory), ctx)
        os.write(report, json.dumps({"outcome": outcome}).encode() + b"\n")

    pid, read_end = _fork(body)
    reply = _read_reply(read_end)
    os.waitpid(pid, 0)
    return reply


def serve() -> None:
    """Answer the test's commands, one JSON object a line, until stdin closes.

    ``{"op": "start", "scenario", "dir"}`` -> ``{"pid", "ctx"}``: a child set up
    and waiting; ``{"op": "go"}`` -> ``{"status": "killed" | "done" | error}``;
    ``{"op": "check", "scenario", "dir", "ctx"}`` -> ``{"outcome"}`` or ``{"error"}``.
    """
    waiting: tuple[int, int] | None = None
    for line in sys.stdin:
        command = json.loads(line)
        reply: dict[str, Any]
        if command["op"] == "start":
            pid, go, reply = _start(command["scenario"], command["dir"])
            waiting = (pid, go)
            reply["pid"] = pid
        elif command["op"] == "go":
            assert waiting is not None
            pid, go = waiting
            waiting = None
            os.write(go, b"g")
            os.close(go)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            reply = {"status": "killed" if code == -9 else "done" if code == 0 else f"exit {code}"}
        else:
            reply = _check(command["scenario"], command["dir"], command["ctx"])
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# -- the test's side: the server process and one kill point ---------------------------------

ROOT = Path(__file__).resolve().parents[2]


class Server:
    """The ``python -c`` process that forks the transitions and the checks."""

    def __init__(self, log: IO[str]) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), *sys.path])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.contract.killpoints import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the kill-point server died"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def kill_at(strace: str, server: Server, scenario: str, names: str, k: int, where: str) -> str:
    """Run ``scenario``'s transition on the store at ``where`` with a SIGKILL on its
    ``k``-th call of the system calls ``names`` (an strace set); check what it
    left. Returns "done", or "killed, before" / "killed, after"; "unattached"
    when strace cannot attach to a process here."""
    started = server.ask(op="start", scenario=scenario, dir=where)
    assert "error" not in started, started["error"]
    inject = f"inject={names}:signal=SIGKILL:when={k}"
    pid = str(started["pid"])
    tracer = subprocess.Popen(
        [strace, "-f", "-o", "/dev/null", "-e", f"trace={names}", "-e", inject, "-p", pid],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tracer.stderr is not None
    attached = tracer.stderr.readline()
    if "attached" not in attached:
        server.ask(op="go")
        tracer.wait(30)
        return "unattached: " + attached.strip()
    ran = server.ask(op="go")["status"]
    tracer.wait(30)
    tracer.stderr.close()
    assert ran in ("killed", "done"), f"{scenario}: the transition failed ({ran}), see the log"
    checked = server.ask(op="check", scenario=scenario, dir=where, ctx=started["ctx"])
    assert "error" not in checked, (
        f"{scenario}, killed at {names.split(',')[0]} #{k}:\n{checked['error']}"
        if ran == "killed"
        else f"{scenario}, not killed:\n{checked['error']}"
    )
    if ran == "done":
        assert checked["outcome"] == "after", f"{scenario} completed but left {checked}"
        return "done"
    return f"killed, {checked['outcome']}"
