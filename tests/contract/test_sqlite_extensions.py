"""The planned store contract extensions E1-E7, called through their primitives.

The base class does not have their public wrappers yet, so these tests call
``_request_resume``, ``_complete(..., result)``, ``_due_deliveries``... directly.
They are written against any backend that has the primitives (the
``ext_store`` fixture lists those) and move to the shared contract suite with
the wrappers.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal

import pytest

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointExists,
    PausedWorkflow,
    PauseExpired,
)
from celery_checkpoint.model import ResumeRequest, utcnow
from celery_checkpoint.store.base import RunFilter, RunInfo
from celery_checkpoint.store.sqlite import SqliteStore
from tests.contract.helpers import make_run, mp_context

LONG = 3600.0


@pytest.fixture(params=["sqlite"])
def ext_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A store with the extension primitives; typed loosely until base.py declares them."""
    store = SqliteStore(tmp_path / "store.db")
    yield store
    store.close()


def request(request_id: str, value: Any = None, **fields: Any) -> ResumeRequest:
    """A request as the base's wrapper builds it (pause_seq set by the store)."""
    return ResumeRequest(request_id=request_id, input=value, pause_seq=0, **fields)


def claimed_token(store: Any, run_id: str) -> int:
    run = store.claim(run_id, lease_seconds=LONG)
    assert run is not None and run.lease is not None
    return int(run.lease.token)


# -- E1: the deadline in the compare-and-set ------------------------------------------------


def test_an_answer_after_the_deadline_is_refused_and_changes_nothing(ext_store: Any) -> None:
    ext_store.save(make_run("late", expires_at=utcnow() - timedelta(seconds=1)))
    before = ext_store.load("late")
    with pytest.raises(PauseExpired):
        ext_store._request_resume("late", request("req-1", "yes"), None)
    assert ext_store.load("late") == before
    assert ext_store.due_resumes(0) == []


def test_the_deadline_spares_an_answer_accepted_before_it_the_timer_and_on_timeout_resume(
    ext_store: Any,
) -> None:
    soon = utcnow() + timedelta(milliseconds=150)
    ext_store.save(make_run("accepted", expires_at=soon))
    first = ext_store._request_resume("accepted", request("req-1", "yes"), None)
    ext_store.save(make_run("timer", expires_at=utcnow() - timedelta(seconds=1)))
    ext_store.save(
        make_run("lenient", expires_at=utcnow() - timedelta(seconds=1), on_timeout="resume")
    )
    while utcnow() <= soon:
        pass
    assert ext_store._request_resume("accepted", request("req-1", "yes"), None) == first
    timed_out = ext_store._request_resume("timer", request("timeout", timed_out=True), None)
    assert timed_out.timed_out and timed_out.status == "pending"
    assert ext_store._request_resume("lenient", request("req-2", 1), None).request_id == "req-2"


# -- E2: the result kept with the completion -------------------------------------------------


def test_a_result_is_kept_with_the_completion_until_marked_delivered(ext_store: Any) -> None:
    ext_store.save(make_run("r1"))
    ext_store.save(make_run("r2"))
    token = claimed_token(ext_store, "r1")
    before = utcnow()
    ext_store._complete("r1", token, '{"total": 42}')
    tombstone = ext_store.ended("r1")
    assert tombstone is not None and tombstone.status == "completed"
    assert tombstone.result == '{"total": 42}'
    assert tombstone.ended_at is not None and tombstone.ended_at >= before - timedelta(seconds=1)
    ext_store._complete("r2", claimed_token(ext_store, "r2"), None)  # nothing to deliver

    assert ext_store._due_deliveries(3600) == [], "just completed: not due yet"
    assert ext_store._due_deliveries(0) == ["r1"]
    assert ext_store._due_deliveries(3600) == [], "marked sent by the previous call"
    ext_store._complete("r1", token, '{"total": 0}')  # a repeat changes nothing
    assert ext_store.ended("r1") == tombstone
    assert ext_store._due_deliveries(3600) == []
    ext_store._mark_delivered("r1")
    ext_store._mark_delivered("r1")
    ext_store._mark_delivered("never-ran")
    assert ext_store._due_deliveries(0) == []
    assert ext_store.ended("r1") == tombstone, "the tombstone keeps its result"


def test_pruning_a_completed_run_drops_it_from_the_undelivered_index(ext_store: Any) -> None:
    ext_store.save(make_run("r1"))
    ext_store._complete("r1", claimed_token(ext_store, "r1"), "1")
    assert ext_store.prune_ended(0) == 1
    assert ext_store._due_deliveries(0) == []


# -- E3: the earliest deadline -----------------------------------------------------------------


def test_next_deadline_is_the_earliest_among_paused_runs(ext_store: Any) -> None:
    assert ext_store._next_deadline() is None
    now = utcnow().replace(microsecond=0)
    ext_store.save(make_run("later", expires_at=now + timedelta(hours=2)))
    ext_store.save(make_run("sooner", expires_at=now + timedelta(hours=1)))
    ext_store.save(make_run("none"))
    assert ext_store._next_deadline() == now + timedelta(hours=1)
    ext_store.cancel("sooner")
    assert ext_store._next_deadline() == now + timedelta(hours=2)


# -- E4: business keys and early answers -------------------------------------------------------


def test_a_key_is_unique_among_live_runs_and_released_when_a_run_ends(ext_store: Any) -> None:
    ext_store.save(make_run("a", key="stripe:pi_1"))
    assert ext_store._find_key("stripe:pi_1") == "a"
    before = (ext_store.load("a"), ext_store.load("b"))
    with pytest.raises(CheckpointExists, match="held by run 'a'"):
        ext_store.save(make_run("b", key="stripe:pi_1"))
    assert (ext_store.load("a"), ext_store.load("b")) == before
    ext_store.save(make_run("a", key="stripe:pi_1", step="again"))  # the same run: fine
    token = claimed_token(ext_store, "a")
    ext_store.save(make_run("a", key="stripe:pi_2", pause_seq=2), token=token)  # a new key
    assert ext_store._find_key("stripe:pi_1") is None
    assert ext_store._find_key("stripe:pi_2") == "a"
    ext_store.cancel("a")
    assert ext_store._find_key("stripe:pi_2") is None
    ext_store.save(make_run("b", key="stripe:pi_2"))  # an ended run held it: released
    assert ext_store._find_key("stripe:pi_2") == "b"


def test_an_answer_by_key_resumes_the_live_run_with_the_same_rules(ext_store: Any) -> None:
    ext_store.save(make_run("a", key="env:1"))
    run_id, accepted = ext_store._answer_key("env:1", request("evt-1", {"ok": True}), LONG)
    assert run_id == "a" and accepted.request_id == "evt-1" and accepted.pause_seq == 1
    assert ext_store._answer_key("env:1", request("evt-1", {"ok": True}), LONG) == (
        "a",
        accepted,
    )
    with pytest.raises(AlreadyResumed):
        ext_store._answer_key("env:1", request("evt-2"), LONG)
    assert ext_store.due_resumes(0) == ["a"]


def test_an_early_answer_waits_for_the_pause_and_is_consumed_by_it_once(ext_store: Any) -> None:
    run_id, kept = ext_store._answer_key("pay:9", request("evt-1", {"paid": 10}), LONG)
    assert run_id is None and kept.request_id == "evt-1"
    assert ext_store._answer_key("pay:9", request("evt-1", {"paid": 10}), LONG) == (None, kept)
    with pytest.raises(AlreadyResumed) as caught:
        ext_store._answer_key("pay:9", request("evt-2"), LONG)
    assert caught.value.run_id == "pay:9" and caught.value.pending_request_id == "evt-1"

    consumed = ext_store._save(make_run("order-9", key="pay:9", pause_seq=2), None, False)
    assert isinstance(consumed, ResumeRequest)
    assert (consumed.request_id, consumed.input, consumed.pause_seq, consumed.status) == (
        "evt-1",
        {"paid": 10},
        2,
        "pending",
    )
    run = ext_store.load("order-9")
    assert run is not None and run.resume == consumed
    assert ext_store.due_resumes(0) == ["order-9"], "pending, as after request_resume"
    # Consumed: the same event again finds the live run and its accepted request.
    assert ext_store._answer_key("pay:9", request("evt-1", {"paid": 10}), LONG) == (
        "order-9",
        consumed,
    )
    assert ext_store._save(make_run("other", key="pay:10"), None, True) is None
    other = ext_store.load("other")
    assert other is not None and other.resume is None


def test_an_expired_early_answer_is_never_consumed_and_is_pruned(ext_store: Any) -> None:
    ext_store._answer_key("k:1", request("evt-1"), 0.05)
    ext_store._answer_key("k:2", request("evt-2"), LONG)
    time.sleep(0.1)
    assert ext_store._answer_key("k:1", request("evt-3"), LONG)[1].request_id == "evt-3", (
        "an expired early answer is replaced, not a conflict"
    )
    ext_store._answer_key("k:4", request("evt-4"), 0.01)
    time.sleep(0.05)
    assert ext_store._save(make_run("r4", key="k:4"), None, False) is None
    assert ext_store.prune_ended(0) == 0, "early answers are not counted"
    conn = ext_store._conn._connection()
    assert sorted(r[0] for r in conn.execute("SELECT key FROM early_answers")) == ["k:1", "k:2"]


def _answer(db: str, keys: list[str], start: Barrier, out: Any) -> None:
    try:
        store = SqliteStore(db)
        start.wait(30)
        for key in keys:
            store._answer_key(key, request(f"evt-{key}", key), LONG)
        out.put(("ok", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _pause(db: str, keys: list[str], start: Barrier, out: Any) -> None:
    try:
        store = SqliteStore(db)
        start.wait(30)
        for key in keys:
            store.save(make_run(f"run-{key}", key=key), create=True)
        out.put(("ok", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def test_a_racing_answer_and_pause_on_a_key_happen_in_exactly_one_order(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    store = SqliteStore(db)
    keys = [f"k{i:03d}" for i in range(150)]
    ctx = mp_context()
    start, out = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=t, args=(db, keys, start, out)) for t in (_answer, _pause)]
    for child in children:
        child.start()
    results = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(60)
    assert [r for r in results if r[0] != "ok"] == []
    for key in keys:
        run = store.load(f"run-{key}")
        assert run is not None and run.resume is not None, f"{key}: the answer was lost"
        assert (run.resume.request_id, run.resume.input) == (f"evt-{key}", key)
    left = store._conn._connection().execute("SELECT count(*) FROM early_answers").fetchone()[0]
    assert left == 0, "an answer both consumed and kept"
    store.close()


# -- E5: ordered listing with a cursor -------------------------------------------------------------


@dataclass(frozen=True)
class Listing(RunFilter):
    """RunFilter with the E5 fields, until base.py has them."""

    order: Literal["oldest", "newest", "deadline"] | None = None
    after: tuple[str, str] | None = None


def position(info: RunInfo, order: str) -> tuple[str, str]:
    when = info.run.expires_at if order == "deadline" else info.run.paused_at
    assert when is not None
    return when.isoformat(), info.run.run_id


def page_through(store: Any, order: str, size: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page = []
        for info in store._list(Listing(order=order, after=after, **filters)):  # type: ignore[arg-type]
            page.append(info)
            if len(page) == size:
                break
        seen += [info.run.run_id for info in page]
        if len(page) < size:
            return seen
        after = position(page[-1], order)


def test_listing_in_order_pages_with_a_cursor(ext_store: Any) -> None:
    base = utcnow().replace(microsecond=0) - timedelta(days=1)
    runs: list[PausedWorkflow] = []
    for i in range(450):
        # Ties on the time are broken by the run id.
        at = base + timedelta(seconds=i // 3)
        runs.append(
            make_run(
                f"r{(i * 7919) % 450:03d}",
                paused_at=at,
                expires_at=None if i % 5 == 0 else at + timedelta(hours=450 - i),
                task_name="shop.ship" if i % 2 else "shop.bill",
            )
        )
    for run in runs:
        ext_store.save(run)
    oldest = [r.run_id for r in sorted(runs, key=lambda r: (r.paused_at, r.run_id))]
    assert [i.run.run_id for i in ext_store._list(Listing(order="oldest"))] == oldest
    assert page_through(ext_store, "oldest", 37) == oldest
    assert page_through(ext_store, "newest", 50) == oldest[::-1]
    with_deadline = [r for r in runs if r.expires_at is not None]
    by_deadline = [r.run_id for r in sorted(with_deadline, key=lambda r: (r.expires_at, r.run_id))]
    assert page_through(ext_store, "deadline", 64) == by_deadline
    shipped = [
        r.run_id
        for r in sorted(runs, key=lambda r: (r.paused_at, r.run_id))
        if r.task_name == "shop.ship"
    ]
    assert page_through(ext_store, "oldest", 40, task="shop.ship") == shipped


# -- E6: counts by task and step ---------------------------------------------------------------


def test_summary_counts_live_runs_by_task_and_step(ext_store: Any) -> None:
    now = utcnow().replace(microsecond=0)
    old = now - timedelta(hours=3)
    ext_store.save(make_run("a", task_name="t1", step="s1", paused_at=old))
    ext_store.save(make_run("b", task_name="t1", step="s1", expires_at=now - timedelta(minutes=1)))
    ext_store.save(make_run("c", task_name="t1", step="s1"))
    ext_store.save(make_run("d", task_name="t1", step="s2"))
    ext_store.save(make_run("e", task_name="t2", step="s1", paused_at=old))
    ext_store.request_resume("c", "go", "req-c")
    claimed_token(ext_store, "a")
    claimed_token(ext_store, "e")
    ext_store.save(make_run("gone", task_name="t1", step="s1"))
    ext_store.cancel("gone")
    groups = {(g["task"], g["step"]): g for g in ext_store._summary(now)}
    assert set(groups) == {("t1", "s1"), ("t1", "s2"), ("t2", "s1")}
    g = groups[("t1", "s1")]
    assert (g["paused"], g["in_flight"], g["pending"], g["overdue"]) == (2, 1, 1, 1)
    assert g["oldest_paused_at"] is not None and g["oldest_paused_at"] > old
    e = groups[("t2", "s1")]
    assert (e["paused"], e["in_flight"], e["oldest_paused_at"]) == (0, 1, None)


# -- E7: restoring records as they are ----------------------------------------------------------


def test_restore_writes_paused_and_ended_records_as_given_once(ext_store: Any) -> None:
    deadline = utcnow() - timedelta(minutes=1)
    paused = make_run("p", last_token=7, expires_at=deadline, key="k:p", pause_seq=3)
    paused.resume = ResumeRequest(request_id="req-p", input=1, pause_seq=3)
    assert ext_store._restore(paused) is True
    assert ext_store.load("p") == paused
    assert ext_store.due_resumes(0) == ["p"] and ext_store.due_timeouts() == ["p"]
    assert ext_store._find_key("k:p") == "p"
    assert claimed_token(ext_store, "p") == 8, "fencing goes on from last_token"

    ended = make_run("e", status="completed", last_token=3, ended_at=utcnow() - timedelta(days=2))
    assert ext_store._restore(ended) is True
    assert ext_store.ended("e") == ended
    assert ext_store.load("e") is None
    assert ext_store.prune_ended(86400) == 1, "pruned by its own ended_at"

    assert ext_store._restore(make_run("p")) is False, "a record exists: nothing changed"
    in_flight = make_run("q").model_copy(update={"lease": ext_store.lease("p")})
    assert in_flight.lease is not None
    with pytest.raises(ValueError, match="in flight"):
        ext_store._restore(in_flight)
    assert not ext_store.exists("q")


def test_iter_ended_streams_every_tombstone(ext_store: Any) -> None:
    for i in range(230):
        ext_store.save(make_run(f"r{i:03d}"))
        if i % 2:
            ext_store.cancel(f"r{i:03d}")
        else:
            ext_store.complete(f"r{i:03d}", token=claimed_token(ext_store, f"r{i:03d}"))
    ext_store.save(make_run("still-paused"))
    seen = [run.run_id for run in ext_store._iter_ended()]
    assert sorted(seen) == [f"r{i:03d}" for i in range(230)]
    assert all(isinstance(run.ended_at, datetime) for run in ext_store._iter_ended())
