"""The planned store-contract extensions (E1-E7 of the store extensions note), on
the PostgreSQL store.

The base class has no public wrappers for them yet, so these tests call the
primitives (``_complete(..., result)``, ``_answer_key``, ``_restore``...)
directly. When the wrappers land, these tests move into the contract suite and
run against every backend.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from uuid import uuid4

import pytest

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointExists,
    LeaseLost,
    PauseExpired,
    RunCancelled,
)
from celery_checkpoint.model import ResumeRequest, RunRecord, utcnow
from celery_checkpoint.store.base import RunFilter
from celery_checkpoint.store.postgres import PostgresStore
from tests.contract.helpers import StoreFactory, make_run, mp_context

pytestmark = pytest.mark.postgres

LONG = 3600.0
CHILD_TIMEOUT = 120.0
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def store_factory(postgres_database: str) -> Iterator[StoreFactory]:
    factory = StoreFactory("postgres", f"{postgres_database}?schema=t_{uuid4().hex}")
    yield factory
    factory.close_all()
    factory.drop_schema()


@pytest.fixture
def store(store_factory: StoreFactory) -> PostgresStore:
    opened = store_factory()
    assert isinstance(opened, PostgresStore)
    return opened


def answer(request_id: str, value: Any = None, **fields: Any) -> ResumeRequest:
    """A request as the base's request_resume builds it (the store sets pause_seq)."""
    return ResumeRequest(request_id=request_id, input=value, pause_seq=0, **fields)


def claimed(store: PostgresStore, run_id: str, **kwargs: Any) -> int:
    run = store.claim(run_id, **kwargs)
    assert run is not None and run.lease is not None
    return run.lease.token


def observe(store: PostgresStore, run_id: str) -> tuple[Any, ...]:
    return (store.load(run_id), store.lease(run_id), store.ended(run_id), store.count())


# -- E1: the deadline in the compare-and-set ---------------------------------------------


def test_an_answer_after_the_deadline_of_an_expiring_pause_is_refused_by_the_store(
    store: PostgresStore,
) -> None:
    store.save(make_run("late", expires_at=utcnow() - timedelta(seconds=1)))
    before = observe(store, "late")
    with pytest.raises(PauseExpired):
        store._request_resume("late", answer("req-1", {"ok": True}), None)
    assert observe(store, "late") == before


def test_the_timers_own_request_and_a_resuming_timeout_pass_the_deadline(
    store: PostgresStore,
) -> None:
    past = utcnow() - timedelta(seconds=1)
    store.save(make_run("timer", expires_at=past))
    accepted = store._request_resume("timer", answer("t-1", timed_out=True, via="timeout"), None)
    assert accepted.timed_out and accepted.status == "pending"
    store.save(make_run("resumes", expires_at=past, on_timeout="resume"))
    assert store._request_resume("resumes", answer("req-1"), None).pause_seq == 1


def test_an_answer_accepted_before_the_deadline_is_still_returned_after_it(
    store: PostgresStore,
) -> None:
    store.save(make_run("r1", expires_at=utcnow() + timedelta(seconds=0.3)))
    first = store._request_resume("r1", answer("req-1", "yes"), None)
    time.sleep(0.4)
    assert store._request_resume("r1", answer("req-1", "yes"), None) == first
    with pytest.raises(PauseExpired):
        store._request_resume("r1", answer("req-2", "no"), None)


# -- E2: the result kept with the completion ----------------------------------------------


def test_a_completion_keeps_its_result_until_delivered(store: PostgresStore) -> None:
    store.save(make_run("r1"))
    store.save(make_run("r2"))
    token = claimed(store, "r1")
    before = utcnow()
    store._complete("r1", token, '{"shipped": true}')
    tombstone = store.ended("r1")
    assert tombstone is not None and tombstone.status == "completed"
    assert tombstone.result == '{"shipped": true}'
    assert tombstone.ended_at is not None
    assert abs(tombstone.ended_at - before) < timedelta(seconds=5), "the server's clock"
    store._complete("r2", claimed(store, "r2"), None)  # no result: nothing to deliver

    assert store._due_deliveries(3600) == [], "just completed: not due yet"
    assert store._due_deliveries(0) == ["r1"]
    assert store._due_deliveries(3600) == [], "marked tried by the previous call"
    assert store._due_deliveries(0) == ["r1"]
    store._complete("r1", token, '{"shipped": true}')  # a repeat changes nothing
    ended = store.ended("r1")
    assert ended is not None and ended.ended_at == tombstone.ended_at

    store._mark_delivered("r1")
    store._mark_delivered("r1")
    store._mark_delivered("never-ran")
    assert store._due_deliveries(0) == []
    ended = store.ended("r1")
    assert ended is not None and ended.result == '{"shipped": true}', "the tombstone keeps it"


def test_pruning_drops_an_undelivered_result_with_its_run(store: PostgresStore) -> None:
    store.save(make_run("r1"))
    store._complete("r1", claimed(store, "r1"), "42")
    time.sleep(0.05)
    assert store.prune_ended(0.01) == 1
    assert store._due_deliveries(0) == []


def test_a_new_run_under_a_completed_id_drops_the_old_result(store: PostgresStore) -> None:
    store.save(make_run("r1"))
    store._complete("r1", claimed(store, "r1"), "42")
    store.save(make_run("r1", step="again"))
    assert store._due_deliveries(0) == []
    got = store.load("r1")
    assert got is not None and got.result is None and got.ended_at is None


# -- E3: the earliest deadline -------------------------------------------------------------


def test_the_next_deadline_is_the_earliest_of_the_live_runs(store: PostgresStore) -> None:
    assert store._next_deadline() is None
    store.save(make_run("none"))
    assert store._next_deadline() is None
    soon, later = EPOCH + timedelta(hours=1), EPOCH + timedelta(hours=2)
    store.save(make_run("later", expires_at=later))
    store.save(make_run("soon", expires_at=soon))
    assert store._next_deadline() == soon
    store.cancel("soon")
    assert store._next_deadline() == later


# -- E4: business keys and early answers ----------------------------------------------------


def test_a_key_names_at_most_one_live_run(store: PostgresStore) -> None:
    assert store._save(make_run("a", key="stripe:pi_1"), None, False) is None
    assert store._find_key("stripe:pi_1") == "a"
    before = observe(store, "b")
    with pytest.raises(CheckpointExists, match="key 'stripe:pi_1' is held by run 'a'"):
        store.save(make_run("b", key="stripe:pi_1"))
    with pytest.raises(CheckpointExists, match="held by run 'a'"):
        store.save(make_run("b", key="stripe:pi_1"), create=True)
    assert observe(store, "b") == before

    token = claimed(store, "a")
    store.save(make_run("a", key="stripe:pi_1", pause_seq=2), token=token)  # its own re-pause
    token = claimed(store, "a")
    store.save(make_run("a", key="stripe:pi_2", pause_seq=3), token=token)  # changes its key
    store.save(make_run("b", key="stripe:pi_1"))
    assert (store._find_key("stripe:pi_1"), store._find_key("stripe:pi_2")) == ("b", "a")
    store.cancel("a")  # an ended run releases its key
    assert store._find_key("stripe:pi_2") is None
    store.save(make_run("c", key="stripe:pi_2"))
    store._complete("c", claimed(store, "c"), None)
    assert store._find_key("stripe:pi_2") is None
    store.save(make_run("d", key="stripe:pi_2"))
    assert store._find_key("stripe:pi_2") == "d"


def test_an_answer_to_a_key_held_by_a_live_run_is_its_request_resume(
    store: PostgresStore,
) -> None:
    store.save(make_run("r1", key="env:9", pause_seq=4))
    run_id, accepted = store._answer_key("env:9", answer("evt-1", {"paid": True}), 60)
    assert (run_id, accepted.pause_seq, accepted.status) == ("r1", 4, "pending")
    assert store._answer_key("env:9", answer("evt-1", {"paid": True}), 60) == ("r1", accepted)
    with pytest.raises(AlreadyResumed):
        store._answer_key("env:9", answer("evt-2"), 60)
    got = store.load("r1")
    assert got is not None and got.resume == accepted
    store.cancel("r1")
    # The key is free again and no early answer was kept for it.
    assert store._answer_key("env:9", answer("evt-3"), 60)[0] is None


def test_an_answer_before_the_pause_is_kept_and_consumed_by_the_pause_naming_its_key(
    store: PostgresStore,
) -> None:
    early = answer("evt-1", {"paid": True}, actor="stripe", via="webhook")
    assert store._answer_key("pay:1", early, 3600) == (None, early)
    assert store._answer_key("pay:1", answer("evt-1", {"paid": True}), 3600)[1] == early
    with pytest.raises(AlreadyResumed) as caught:
        store._answer_key("pay:1", answer("evt-2"), 3600)
    assert (caught.value.run_id, caught.value.pending_request_id) == ("pay:1", "evt-1")

    attached = store._save(make_run("r1", key="pay:1", pause_seq=2), None, True)
    assert attached is not None
    assert (attached.request_id, attached.input, attached.pause_seq) == ("evt-1", {"paid": True}, 2)
    assert (attached.status, attached.actor, attached.via) == ("pending", "stripe", "webhook")
    got = store.load("r1")
    assert got is not None and got.resume == attached
    assert store.due_resumes(0) == ["r1"], "the pending index, as after request_resume"
    assert store.stats()["pending_resumes"] == 1
    # Consumed: a second pause naming the key finds nothing, and answers go to the run.
    token = claimed(store, "r1")
    assert store._save(make_run("r1", key="pay:1", pause_seq=3), token, False) is None
    assert store._answer_key("pay:1", answer("evt-9"), 60)[0] == "r1"


def test_an_expired_early_answer_is_never_consumed_and_is_pruned(store: PostgresStore) -> None:
    store._answer_key("k:1", answer("evt-1"), 0.1)
    store._answer_key("k:2", answer("evt-1"), 0.1)
    time.sleep(0.3)
    assert store._save(make_run("r1", key="k:1"), None, False) is None
    got = store.load("r1")
    assert got is not None and got.resume is None
    assert store._answer_key("k:3", answer("evt-1"), 3600)[0] is None
    newer = answer("evt-2")
    assert store._answer_key("k:2", newer, 3600) == (None, newer), "replaces an expired one"
    assert store.prune_ended(0) == 0, "early answers are not counted"
    rows = store._conn.read(
        "t", "*", lambda c: c.execute(f"SELECT key FROM {store.schema}.early_answers").fetchall()
    )
    assert sorted(key for (key,) in rows) == ["k:2", "k:3"]


def _pause_or_answer(
    factory: StoreFactory, keys: list[str], role: str, start: Any, out: Any
) -> None:
    try:
        store = factory()
        assert isinstance(store, PostgresStore)
        start.wait(CHILD_TIMEOUT)
        seen: dict[str, Any] = {}
        for i, key in enumerate(keys):
            if role == "pause":
                got = store._save(make_run(f"run-{i}", key=key), None, True)
                seen[key] = None if got is None else got.request_id
            else:
                run_id, accepted = store._answer_key(key, answer(f"evt-{i}", i), 3600)
                seen[key] = (run_id, accepted.request_id)
        store.close()
        out.put(("ok", (role, seen)))
    except BaseException:
        out.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_a_racing_pause_and_answer_on_one_key_happen_in_exactly_one_order(
    store: PostgresStore, store_factory: StoreFactory
) -> None:
    keys = [f"race:{i}" for i in range(150)]
    ctx = mp_context()
    start, out = ctx.Barrier(2), ctx.Queue()
    children = [
        ctx.Process(target=_pause_or_answer, args=(store_factory, keys, role, start, out))
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
    for i, key in enumerate(keys):
        consumed = reports["pause"][key]  # the save took the early answer
        run_id, accepted = reports["answer"][key]  # the answer found the run
        assert (consumed is None) != (run_id is None), f"{key}: both or neither"
        assert (consumed or accepted) == f"evt-{i}"
        got = store.load(f"run-{i}")
        assert got is not None and got.resume is not None
        assert (got.resume.request_id, got.resume.input, got.resume.status) == (
            f"evt-{i}",
            i,
            "pending",
        )
    assert store._answer_key("race:0", answer("evt-0", 0), 60)[0] == "run-0"


# -- E5: ordered listing with a cursor ----------------------------------------------------


@dataclass(frozen=True)
class OrderedFilter(RunFilter):
    """RunFilter as the extensions shape it (the base grows these fields later)."""

    order: Literal["oldest", "newest", "deadline"] | None = None
    after: tuple[str, str] | None = None


def _position(run: RunRecord, order: str) -> tuple[str, str]:
    at = run.expires_at if order == "deadline" else run.paused_at
    assert at is not None
    return at.isoformat(), run.run_id


def test_list_streams_in_order_and_resumes_after_a_position(store: PostgresStore) -> None:
    runs = []
    for i in range(450):  # more than one internal page
        paused_at = EPOCH + timedelta(minutes=i // 3)  # ties, broken by run id
        deadline = None if i % 4 == 0 else EPOCH + timedelta(days=1, minutes=(i * 7) % 50)
        task = "shop.ship" if i % 2 else "shop.bill"
        run = make_run(f"r{i:03d}", paused_at=paused_at, expires_at=deadline, task_name=task)
        runs.append(run)
        store.save(run)
    oldest = sorted(runs, key=lambda r: (r.paused_at, r.run_id))
    expected = {
        "oldest": oldest,
        "newest": oldest[::-1],
        "deadline": sorted(
            (r for r in runs if r.expires_at is not None),
            key=lambda r: (r.expires_at or EPOCH, r.run_id),
        ),
    }
    for order, want in expected.items():
        got = [info.run.run_id for info in store._list(OrderedFilter(order=order))]
        assert got == [r.run_id for r in want], order
        # Page by page from a cursor, as an API does.
        pages: list[str] = []
        after: tuple[str, str] | None = None
        while True:
            where = OrderedFilter(order=order, after=after)
            page = [info.run for _, info in zip(range(37), store._list(where), strict=False)]
            if not page:
                break
            pages += [run.run_id for run in page]
            after = _position(page[-1], order)
        assert pages == [r.run_id for r in want], f"{order}, paged"
    bills = [
        info.run.run_id
        for info in store._list(OrderedFilter(task="shop.bill", order="newest", after=None))
    ]
    assert bills == [r.run_id for r in expected["newest"] if r.task_name == "shop.bill"]


# -- E6: counts by task and step -----------------------------------------------------------


def test_the_summary_counts_each_task_and_step_from_the_indexes(store: PostgresStore) -> None:
    now = utcnow()
    old = now - timedelta(hours=3)
    store.save(make_run("a1", task_name="t.a", step="s1", paused_at=old))
    store.save(make_run("a2", task_name="t.a", step="s1", expires_at=now - timedelta(seconds=5)))
    store.save(make_run("a3", task_name="t.a", step="s1"))
    store.save(make_run("a4", task_name="t.a", step="s2"))
    store.save(make_run("b1", task_name="t.b", step="s1", expires_at=now - timedelta(hours=1)))
    store.save(make_run("gone", task_name="t.c", step="s1"))
    store.cancel("gone")
    store._request_resume("a3", answer("req-1"), None)
    claimed(store, "a1", lease_seconds=LONG)
    claimed(store, "b1", lease_seconds=LONG)
    rows = {(g["task"], g["step"]): g for g in store._summary(now)}
    assert set(rows) == {("t.a", "s1"), ("t.a", "s2"), ("t.b", "s1")}
    a1 = rows["t.a", "s1"]
    assert (a1["paused"], a1["in_flight"], a1["pending"], a1["overdue"]) == (2, 1, 1, 1)
    a2 = store.load("a2")
    assert a2 is not None and a1["oldest_paused_at"] == a2.paused_at, "in-flight a1 not counted"
    b1 = rows["t.b", "s1"]
    assert (b1["paused"], b1["in_flight"], b1["overdue"], b1["oldest_paused_at"]) == (0, 1, 0, None)
    assert rows["t.a", "s2"]["paused"] == 1


# -- E7: restoring records as they are ---------------------------------------------------


def test_a_paused_record_is_restored_with_its_indexes_only_where_none_exists(
    store: PostgresStore,
) -> None:
    deadline = utcnow() - timedelta(minutes=1)
    run = make_run(
        "moved",
        key="order:7",
        expires_at=deadline,
        last_token=5,
        recoveries=2,
        lease_ended_by="release",
        resume=ResumeRequest(request_id="req-1", input={"ok": 1}, pause_seq=1, actor="ana"),
    )
    assert store._restore(run) is True
    assert store.load("moved") == run
    assert store._find_key("order:7") == "moved"
    assert store.due_timeouts() == ["moved"]
    assert store.due_resumes(0) == ["moved"]
    assert store.count() == 1
    before = observe(store, "moved")
    assert store._restore(make_run("moved", step="other")) is False
    assert observe(store, "moved") == before
    assert claimed(store, "moved") == 6, "fencing goes on from the restored token"
    with_lease = make_run("x").model_copy(update={"lease": store.lease("moved")})
    with pytest.raises(ValueError, match="in-flight runs are never migrated"):
        store._restore(with_lease)
    with pytest.raises(CheckpointExists, match="held by run 'moved'"):
        store._restore(make_run("dup", key="order:7"))


def test_a_tombstone_is_restored_and_every_tombstone_can_be_read_back(
    store: PostgresStore,
) -> None:
    ended_at = utcnow() - timedelta(days=2)
    tombstone = make_run(
        "done",
        status="completed",
        ended_at=ended_at,
        last_token=3,
        lease_ended_by="complete",
        result="7",
        resume=ResumeRequest(request_id="req-1", input=None, pause_seq=1),
    )
    assert store._restore(tombstone) is True
    assert store.ended("done") == tombstone
    assert store.load("done") is None and store.claim("done") is None
    assert store.count() == 0
    assert store._request_resume("done", answer("req-1"), None).request_id == "req-1"
    with pytest.raises(AlreadyResumed):
        store._request_resume("done", answer("req-2"), None)
    with pytest.raises(LeaseLost):
        store.complete("done", token=2)
    assert store._restore(tombstone) is False

    cancelled = make_run("stopped", status="cancelled", ended_at=ended_at, ended_reason="no")
    assert store._restore(cancelled) is True
    with pytest.raises(RunCancelled):
        store._request_resume("stopped", answer("req-1"), None)
    for i in range(230):  # more than one page
        store.save(make_run(f"e{i:03d}"))
        store.cancel(f"e{i:03d}")
    store.save(make_run("alive"))
    ended = list(store._iter_ended())
    assert len(ended) == 232 and len({r.run_id for r in ended}) == 232
    assert "alive" not in {r.run_id for r in ended}
    assert [r.run_id for r in ended[:2]] == ["done", "stopped"], "by when they ended"
    assert store.prune_ended(3600) == 2, "restored tombstones keep their end time"
