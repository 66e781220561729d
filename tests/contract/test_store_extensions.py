"""The store contract's newer half, on every backend: the deadline in the
compare-and-set, results kept until delivered, business keys and early
answers, restoring records as they are.

Everything here goes through the public methods of ``CheckpointStore`` and is
written from their docstrings; only :func:`kept_early_answers` looks inside a
store, to see that a pruned early answer is gone.
"""

from __future__ import annotations

import sqlite3
import time
import traceback
from datetime import datetime, timedelta
from typing import Any

import pytest

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointStore,
    LeaseLost,
    PauseExpired,
    RunCancelled,
)
from celery_checkpoint.model import ResumeRequest, utcnow
from tests.contract.helpers import StoreFactory, make_run, mp_context

LONG = 3600.0
CHILD_TIMEOUT = 120.0
#: Rounds of the race of an early answer against a keyed pause, per backend.
RACE_ROUNDS = 50


def claimed(store: CheckpointStore, run_id: str) -> int:
    """Claim ``run_id`` (it must win) with a lease that outlives the test; its token."""
    run = store.claim(run_id, lease_seconds=LONG)
    assert run is not None and run.lease is not None, f"claim of {run_id!r} lost"
    return run.lease.token


def observe(store: CheckpointStore, run_id: str) -> tuple[Any, ...]:
    """What a caller can see of one run, to prove a refused call changed nothing."""
    return (
        store.load(run_id),
        store.lease(run_id),
        store.ended(run_id),
        store.count(),
        store.due_resumes(LONG),
    )


def near(when: datetime | None, expected: datetime, slack: float = 5.0) -> bool:
    """Times from a server's clock may differ a little from this process's."""
    return when is not None and abs((when - expected).total_seconds()) <= slack


def kept_early_answers(factory: StoreFactory) -> list[str]:
    """The keys the store keeps an early answer for, read from its storage."""
    if factory.backend == "file":
        found = (factory.root / "early").glob("*.json")
        return sorted(path.name[: -len(".json")].replace("%", "/") for path in found)
    if factory.backend == "sqlite":
        with sqlite3.connect(factory.target.removeprefix("sqlite:///")) as conn:
            return sorted(row[0] for row in conn.execute("SELECT key FROM early_answers"))
    if factory.backend == "postgres":
        prefix = "early_answers:"
        rows = [row.decode() for row in factory.postgres_rows()]
        return sorted(row.split('"key": "')[1].split('"')[0] for row in rows if row[:14] == prefix)
    client = factory.redis_client()
    try:
        keys = []
        for name in client.scan_iter(match=f"{factory.prefix}:*:key:*", count=1000):
            if client.hexists(name, "early"):
                keys.append(name.decode().split(":key:", 1)[1])
        return sorted(keys)
    finally:
        client.close()


# -- the deadline in the compare-and-set --------------------------------------------------


def test_an_answer_after_the_deadline_of_an_expiring_pause_is_refused_and_changes_nothing(
    store: CheckpointStore,
) -> None:
    store.save(make_run("late", expires_at=utcnow() - timedelta(seconds=1)))
    before = observe(store, "late")
    with pytest.raises(PauseExpired):
        store.request_resume("late", {"ok": True}, "req-1")
    assert observe(store, "late") == before
    assert store.due_resumes(0) == []


def test_the_timers_own_request_and_a_pause_that_resumes_on_timeout_pass_the_deadline(
    store: CheckpointStore,
) -> None:
    past = utcnow() - timedelta(seconds=1)
    store.save(make_run("timer", expires_at=past))
    accepted = store.request_resume("timer", None, "t-1", timed_out=True, via="timeout")
    assert accepted.timed_out and accepted.status == "pending"
    store.save(make_run("resumes", expires_at=past, on_timeout="resume"))
    assert store.request_resume("resumes", "yes", "req-1").pause_seq == 1


def test_an_answer_accepted_before_the_deadline_is_still_returned_after_it(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1", expires_at=utcnow() + timedelta(seconds=0.5)))
    first = store.request_resume("r1", "yes", "req-1")
    time.sleep(0.7)
    assert store.request_resume("r1", "yes", "req-1") == first
    before = observe(store, "r1")
    with pytest.raises(PauseExpired):
        store.request_resume("r1", "no", "req-2")
    assert observe(store, "r1") == before


# -- the result kept with the completion ---------------------------------------------------


def test_a_completion_keeps_its_result_until_marked_delivered(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.save(make_run("r2"))
    token = claimed(store, "r1")
    store.complete("r1", token=token, result='{"shipped": true}')
    tombstone = store.ended("r1")
    assert tombstone is not None and tombstone.status == "completed"
    assert tombstone.result == '{"shipped": true}'
    assert near(tombstone.ended_at, utcnow()), tombstone.ended_at
    store.complete("r2", token=claimed(store, "r2"))  # no result: nothing to deliver
    ended = store.ended("r2")
    assert ended is not None and ended.result is None and ended.ended_at is not None

    assert store.due_deliveries(LONG) == [], "just completed: not due yet"
    assert store.due_deliveries(0) == ["r1"]
    assert store.due_deliveries(LONG) == [], "returned just now: not due again yet"
    store.complete("r1", token=token, result='{"shipped": false}')  # a repeat changes nothing
    assert store.ended("r1") == tombstone
    assert store.due_deliveries(LONG) == []

    store.mark_delivered("r1")
    store.mark_delivered("r1")
    store.mark_delivered("never-ran")
    assert store.due_deliveries(0) == []
    assert store.ended("r1") == tombstone, "the tombstone keeps its result"


def test_pruning_a_completed_run_drops_it_from_the_undelivered_index(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    store.complete("r1", token=claimed(store, "r1"), result="42")
    assert store.prune_ended(0) == 1
    assert store.due_deliveries(0) == []
    assert store.ended("r1") is None


def test_a_new_run_under_a_completed_id_drops_the_old_result(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.complete("r1", token=claimed(store, "r1"), result="42")
    store.save(make_run("r1", step="again"))
    assert store.due_deliveries(0) == []
    got = store.load("r1")
    assert got is not None and got.result is None and got.ended_at is None


# -- business keys -----------------------------------------------------------------------------


def test_a_key_names_at_most_one_live_run(store: CheckpointStore) -> None:
    assert store.save(make_run("a", key="stripe:pi_1")) is None
    assert store.find_key("stripe:pi_1") == "a"
    before = observe(store, "b")
    with pytest.raises(CheckpointExists, match="key 'stripe:pi_1' is held by run 'a'"):
        store.save(make_run("b", key="stripe:pi_1"))
    with pytest.raises(CheckpointExists, match="held by run 'a'"):
        store.save(make_run("b", key="stripe:pi_1"), create=True)
    assert observe(store, "b") == before
    assert store.find_key("stripe:pi_1") == "a"

    store.save(make_run("a", key="stripe:pi_1", step="again"))  # the same run: fine
    token = claimed(store, "a")
    store.save(make_run("a", key="stripe:pi_1", pause_seq=2), token=token)  # its own re-pause
    assert store.find_key("stripe:pi_1") == "a", "a run in flight holds its key"
    token = claimed(store, "a")
    assert store.find_key("stripe:pi_1") == "a"
    store.save(make_run("a", key="stripe:pi_2", pause_seq=3), token=token)  # a new key
    store.save(make_run("b", key="stripe:pi_1"))
    assert (store.find_key("stripe:pi_1"), store.find_key("stripe:pi_2")) == ("b", "a")

    store.cancel("a")  # an ended run releases its key
    assert store.find_key("stripe:pi_2") is None
    store.save(make_run("c", key="stripe:pi_2"))
    store.complete("c", token=claimed(store, "c"))
    assert store.find_key("stripe:pi_2") is None
    store.save(make_run("d", key="stripe:pi_2"))
    assert store.find_key("stripe:pi_2") == "d"
    token = claimed(store, "d")
    store.save(make_run("d", pause_seq=2), token=token)  # a pause without a key drops it
    assert store.find_key("stripe:pi_2") is None
    store.save(make_run("e", key="stripe:pi_2"))
    assert store.find_key("stripe:pi_2") == "e"
    assert store.find_key("never:used") is None


def test_keys_hold_any_valid_characters(store: CheckpointStore) -> None:
    keys = ["docusign:envelope/4f1c", "a/b/c", "A/b/C", "x" * 200, "=+@-_.:/"]
    for i, key in enumerate(keys):
        store.save(make_run(f"r{i}", key=key))
    assert [store.find_key(key) for key in keys] == [f"r{i}" for i in range(len(keys))]
    assert store.answer_key("a/b/c", 1, "evt-1", ttl=60)[0] == "r1"
    assert store.answer_key("a/b", 2, "evt-2", ttl=60)[0] is None
    consumed = store.save(make_run("r9", key="a/b"))
    assert consumed is not None and consumed.input == 2


def test_an_answer_to_a_key_held_by_a_live_run_is_its_request_resume(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1", key="env:9", pause_seq=4))
    run_id, accepted = store.answer_key("env:9", {"paid": True}, "evt-1", ttl=60, actor="stripe")
    assert (run_id, accepted.request_id, accepted.pause_seq) == ("r1", "evt-1", 4)
    assert (accepted.status, accepted.actor, accepted.via) == ("pending", "stripe", "webhook")
    assert store.answer_key("env:9", {"paid": True}, "evt-1", ttl=60) == ("r1", accepted)
    with pytest.raises(AlreadyResumed):
        store.answer_key("env:9", None, "evt-2", ttl=60)
    got = store.load("r1")
    assert got is not None and got.resume == accepted
    assert store.due_resumes(0) == ["r1"]

    store.save(make_run("late", key="env:10", expires_at=utcnow() - timedelta(seconds=1)))
    with pytest.raises(PauseExpired):
        store.answer_key("env:10", None, "evt-3", ttl=60)  # the same rules as request_resume
    store.cancel("r1")
    with pytest.raises(RunCancelled):
        store.request_resume("r1", None, "evt-4")
    # The key is free again: a new answer waits for the next pause naming it.
    assert store.answer_key("env:9", None, "evt-4", ttl=60)[0] is None


def test_an_answer_before_the_pause_is_kept_and_consumed_by_the_pause_naming_its_key(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    run_id, kept = store.answer_key("pay:1", {"paid": 10}, "evt-1", ttl=LONG, actor="stripe")
    assert run_id is None
    assert (kept.request_id, kept.input, kept.actor, kept.via) == (
        "evt-1",
        {"paid": 10},
        "stripe",
        "webhook",
    )
    assert kept_early_answers(store_factory) == ["pay:1"]
    assert store.answer_key("pay:1", {"paid": 10}, "evt-1", ttl=LONG) == (None, kept)
    with pytest.raises(AlreadyResumed) as caught:
        store.answer_key("pay:1", None, "evt-2", ttl=LONG)
    assert (caught.value.run_id, caught.value.pending_request_id) == ("pay:1", "evt-1")
    assert caught.value.key and str(caught.value).startswith("key 'pay:1' already has an answer")
    assert store.find_key("pay:1") is None, "an early answer holds no key"

    attached = store.save(make_run("r1", key="pay:1", pause_seq=2), create=True)
    assert attached is not None
    assert (attached.request_id, attached.input, attached.pause_seq) == ("evt-1", {"paid": 10}, 2)
    assert (attached.status, attached.actor, attached.via) == ("pending", "stripe", "webhook")
    got = store.load("r1")
    assert got is not None and got.resume == attached
    assert store.due_resumes(0) == ["r1"], "the pending index, as after request_resume"
    assert store.stats()["pending_resumes"] == 1
    # Consumed once: the same event again is the run's accepted request.
    assert store.answer_key("pay:1", {"paid": 10}, "evt-1", ttl=LONG) == ("r1", attached)
    token = claimed(store, "r1")
    assert store.save(make_run("r1", key="pay:1", pause_seq=3), token=token) is None
    assert store.answer_key("pay:1", None, "evt-9", ttl=LONG)[0] == "r1"
    assert store.save(make_run("other", key="pay:2"), create=True) is None
    assert kept_early_answers(store_factory) == []


def test_a_pause_answered_already_or_past_its_deadline_leaves_the_early_answer_waiting(
    store: CheckpointStore,
) -> None:
    store.answer_key("k:1", "early", "evt-1", ttl=LONG)
    own = ResumeRequest(request_id="own", input="mine", pause_seq=1)
    assert store.save(make_run("answered", key="k:1", resume=own)) is None
    got = store.load("answered")
    assert got is not None and got.resume == own
    store.cancel("answered")
    store.save(make_run("expired", key="k:1", expires_at=utcnow() - timedelta(seconds=1)))
    got = store.load("expired")
    assert got is not None and got.resume is None, "too late: request_resume would refuse it"
    store.cancel("expired")
    consumed = store.save(make_run("next", key="k:1"))
    assert consumed is not None and consumed.request_id == "evt-1"


def test_an_expired_early_answer_is_never_consumed_and_is_pruned(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    store.answer_key("k:1", None, "evt-1", ttl=0.2)
    store.answer_key("k:2", None, "evt-2", ttl=0.2)
    store.answer_key("k:3", None, "evt-3", ttl=LONG)
    time.sleep(0.5)
    assert store.save(make_run("r1", key="k:1")) is None
    got = store.load("r1")
    assert got is not None and got.resume is None
    newer = store.answer_key("k:2", "again", "evt-4", ttl=LONG)
    assert newer[0] is None and newer[1].request_id == "evt-4", "replaces an expired one"
    store.answer_key("k:5", None, "evt-5", ttl=0.2)
    time.sleep(0.5)
    assert store.prune_ended(0) == 0, "early answers are not counted"
    assert kept_early_answers(store_factory) == ["k:2", "k:3"]


def _race(factory: StoreFactory, role: str, keys: list[str], start: Any, out: Any) -> None:
    """One side of the race: pause ``run-<i>`` naming each key, or answer each key,
    meeting the other side at the barrier before each round."""
    try:
        store = factory()
        seen: dict[str, Any] = {}
        for i, key in enumerate(keys):
            start.wait(CHILD_TIMEOUT)
            if role == "pause":
                got = store.save(make_run(f"run-{i}", key=key), create=True)
                seen[key] = None if got is None else got.request_id
            else:
                run_id, accepted = store.answer_key(key, i, f"evt-{i}", ttl=LONG)
                seen[key] = (run_id, accepted.request_id)
        store.close()
        out.put(("ok", (role, seen)))
    except BaseException:
        out.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_a_racing_pause_and_answer_on_one_key_happen_in_exactly_one_order(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    keys = [f"race:{i}" for i in range(RACE_ROUNDS)]
    ctx = mp_context()
    start, out = ctx.Barrier(2), ctx.Queue()
    children = [
        ctx.Process(target=_race, args=(store_factory, role, keys, start, out))
        for role in ("pause", "answer")
    ]
    for child in children:
        child.start()
    reports = {}
    for _ in children:
        status, value = out.get(timeout=CHILD_TIMEOUT)
        assert status == "ok", value
        reports[value[0]] = value[1]
    for child in children:
        child.join(CHILD_TIMEOUT)
    orders = {"answer first": 0, "pause first": 0}
    for i, key in enumerate(keys):
        consumed = reports["pause"][key]  # the save took the early answer
        run_id, accepted = reports["answer"][key]  # the answer found the run
        assert (consumed is None) != (run_id is None), f"{key}: both orders, or neither"
        assert (consumed or accepted) == f"evt-{i}"
        assert run_id in (None, f"run-{i}")
        orders["answer first" if consumed else "pause first"] += 1
        got = store.load(f"run-{i}")
        assert got is not None and got.resume is not None, f"{key}: the answer was lost"
        assert (got.resume.request_id, got.resume.input, got.resume.status) == (
            f"evt-{i}",
            i,
            "pending",
        )
        assert store.find_key(key) == f"run-{i}"
    assert kept_early_answers(store_factory) == [], "an answer both consumed and kept"
    print(f"\n{RACE_ROUNDS} rounds: {orders}")


# -- restoring records as they are ---------------------------------------------------------


def test_a_paused_record_is_restored_with_its_indexes_only_where_none_exists(
    store: CheckpointStore,
) -> None:
    run = make_run(
        "moved",
        key="order:7",
        expires_at=utcnow() - timedelta(minutes=1),
        last_token=5,
        recoveries=2,
        lease_ended_by="release",
        resume=ResumeRequest(request_id="req-1", input={"ok": 1}, pause_seq=1, actor="ana"),
    )
    assert store.restore(run) is True
    assert store.load("moved") == run
    assert store.find_key("order:7") == "moved"
    assert store.due_timeouts() == ["moved"]
    assert store.due_resumes(0) == ["moved"]
    assert store.count() == 1
    before = observe(store, "moved")
    assert store.restore(make_run("moved", step="other")) is False
    assert observe(store, "moved") == before
    with pytest.raises(CheckpointExists, match="held by run 'moved'"):
        store.restore(make_run("dup", key="order:7"))
    assert not store.exists("dup")
    assert claimed(store, "moved") == 6, "fencing goes on from the restored token"
    in_flight = make_run("x").model_copy(update={"lease": store.lease("moved")})
    assert in_flight.lease is not None
    with pytest.raises(ValueError, match="in flight"):
        store.restore(in_flight)
    assert not store.exists("x")


def test_a_restored_pause_keeps_its_early_answer_waiting(store: CheckpointStore) -> None:
    store.answer_key("k:1", "early", "evt-1", ttl=LONG)
    assert store.restore(make_run("moved", key="k:1")) is True
    got = store.load("moved")
    assert got is not None and got.resume is None, "restored as it was"
    store.cancel("moved")
    consumed = store.save(make_run("next", key="k:1"))
    assert consumed is not None and consumed.request_id == "evt-1"


def test_a_tombstone_is_restored_and_every_tombstone_can_be_read_back(
    store: CheckpointStore,
) -> None:
    ended_at = utcnow().replace(microsecond=0) - timedelta(days=2)
    tombstone = make_run(
        "done",
        status="completed",
        ended_at=ended_at,
        last_token=3,
        lease_ended_by="complete",
        result="7",
        key="order:1",
        resume=ResumeRequest(request_id="req-1", input=None, pause_seq=1),
    )
    assert store.restore(tombstone) is True
    assert store.ended("done") == tombstone
    assert store.load("done") is None and store.claim("done") is None
    assert store.count() == 0
    assert store.find_key("order:1") is None, "an ended run holds no key"
    assert store.request_resume("done", None, "req-1").request_id == "req-1"
    with pytest.raises(AlreadyResumed):
        store.request_resume("done", None, "req-2")
    with pytest.raises(LeaseLost):
        store.complete("done", token=2)
    assert store.restore(tombstone) is False

    cancelled = make_run("stopped", status="cancelled", ended_at=ended_at, ended_reason="no")
    assert store.restore(cancelled) is True
    with pytest.raises(RunCancelled):
        store.request_resume("stopped", None, "req-1")
    for i in range(30):
        store.save(make_run(f"e{i:02d}"))
        if i % 2:
            store.cancel(f"e{i:02d}")
        else:
            store.complete(f"e{i:02d}", token=claimed(store, f"e{i:02d}"), result=str(i))
    store.save(make_run("alive"))
    ended = {run.run_id: run for run in store.iter_ended()}
    assert sorted(ended) == sorted(["done", "stopped", *(f"e{i:02d}" for i in range(30))])
    assert ended["done"] == tombstone and ended["stopped"] == cancelled
    assert all(isinstance(run.ended_at, datetime) for run in ended.values())
    assert ended["e04"].result == "4" and ended["e05"].status == "cancelled"
    assert store.prune_ended(3600) == 2, "restored tombstones keep their end time"
