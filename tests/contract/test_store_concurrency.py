"""The store contract across processes: one winner, fencing, owners proved dead.

Every child opens its own store instance from the picklable ``StoreFactory``.
The functions the children run are at module top level so ``fork`` and
``spawn`` both find them; a child reports through a queue, including any
exception it met, so a failure in a child fails the test with its reason.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest

from celery_checkpoint import AlreadyResumed, CheckpointExists, CheckpointStore
from tests.contract.helpers import StoreFactory, make_run, mp_context

CLAIMERS = 8
RUNS = 500
RESUMERS = 8
RESUMED_RUNS = 60
CHILD_TIMEOUT = 120.0


def _report(queue: Any, work: Any) -> None:
    """Run ``work()`` and put ``("ok", result)`` or ``("error", traceback)`` on ``queue``."""
    try:
        queue.put(("ok", work()))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def _claim_every_run(factory: StoreFactory, run_ids: list[str], start: Barrier, out: Any) -> None:
    def work() -> tuple[int, list[str]]:
        store = factory()
        try:
            start.wait(CHILD_TIMEOUT)
            won = [run_id for run_id in run_ids if store.claim(run_id) is not None]
            return os.getpid(), won
        finally:
            store.close()

    _report(out, work)


def _resume_every_run(
    factory: StoreFactory, run_ids: list[str], me: int, start: Barrier, out: Any
) -> None:
    def work() -> tuple[int, dict[str, str]]:
        store = factory()
        outcome: dict[str, str] = {}
        try:
            start.wait(CHILD_TIMEOUT)
            for run_id in run_ids:
                try:
                    store.request_resume(run_id, {"from": me}, f"req-{me}")
                    outcome[run_id] = "accepted"
                except AlreadyResumed:
                    outcome[run_id] = "already-resumed"
            return me, outcome
        finally:
            store.close()

    _report(out, work)


def _first_pause_every_run(
    factory: StoreFactory, run_ids: list[str], me: int, start: Barrier, out: Any
) -> None:
    def work() -> tuple[int, list[str]]:
        store = factory()
        created: list[str] = []
        try:
            start.wait(CHILD_TIMEOUT)
            for run_id in run_ids:
                try:
                    store.save(make_run(run_id, state={"by": me}), create=True)
                    created.append(run_id)
                except CheckpointExists:
                    pass
            return me, created
        finally:
            store.close()

    _report(out, work)


def _claim_then_exit(factory: StoreFactory, run_id: str, out: Any) -> None:
    def work() -> tuple[int, int | None]:
        store = factory()
        run = store.claim(run_id, lease_seconds=3600)
        store.close()
        return os.getpid(), None if run is None or run.lease is None else run.lease.token

    _report(out, work)  # and exit without completing: the owner dies holding the lease


def _claim_and_wait(factory: StoreFactory, run_id: str, out: Any, done: Event) -> None:
    def work() -> int | None:
        store = factory()
        run = store.claim(run_id, lease_seconds=3600)
        out.put(("claimed", None if run is None or run.lease is None else run.lease.token))
        done.wait(CHILD_TIMEOUT)
        store.close()
        return None

    _report(out, work)


def _collect(out: Any, n: int) -> list[Any]:
    results = []
    for _ in range(n):
        status, value = out.get(timeout=CHILD_TIMEOUT)
        assert status == "ok", f"a child process failed:\n{value}"
        results.append(value)
    return results


def _join(processes: list[Any]) -> None:
    for process in processes:
        process.join(CHILD_TIMEOUT)
        assert process.exitcode == 0, f"child {process.pid} exited with {process.exitcode}"


def _race(target: Any, n: int, factory: StoreFactory, run_ids: list[str]) -> list[Any]:
    """Start ``n`` children of ``target(factory, run_ids, me, start, out)`` released
    together at a barrier; return what each reported."""
    ctx = mp_context()
    start, out = ctx.Barrier(n), ctx.Queue()
    children = [
        ctx.Process(target=target, args=(factory, run_ids, me, start, out)) for me in range(n)
    ]
    for child in children:
        child.start()
    results = _collect(out, n)
    _join(children)
    return results


@pytest.mark.slow
def test_concurrent_claims_from_many_processes_have_exactly_one_winner_per_run(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    run_ids = [f"race-{i:03d}" for i in range(RUNS)]
    for run_id in run_ids:
        store.save(make_run(run_id))
    ctx = mp_context()
    start, out = ctx.Barrier(CLAIMERS), ctx.Queue()
    # Every child walks the runs in the same order, so they collide on each one.
    children = [
        ctx.Process(target=_claim_every_run, args=(store_factory, run_ids, start, out))
        for _ in range(CLAIMERS)
    ]
    for child in children:
        child.start()
    results = _collect(out, CLAIMERS)
    _join(children)

    winners = Counter(run_id for _, won in results for run_id in won)
    assert {run_id: winners[run_id] for run_id in run_ids} == dict.fromkeys(run_ids, 1)
    assert sum(winners.values()) == RUNS
    for run_id in run_ids:
        lease = store.lease(run_id)
        assert lease is not None
        assert lease.token == 1
    owners = {pid for pid, _ in results}
    assert {lease.owner.pid for lease in map(store.lease, run_ids) if lease} <= owners


@pytest.mark.slow
def test_concurrent_resumes_with_different_ids_accept_exactly_one(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    run_ids = [f"resume-{i:03d}" for i in range(RESUMED_RUNS)]
    for run_id in run_ids:
        store.save(make_run(run_id))
    results: list[tuple[int, dict[str, str]]] = _race(
        _resume_every_run, RESUMERS, store_factory, run_ids
    )

    for run_id in run_ids:
        outcomes = Counter(outcome[run_id] for _, outcome in results)
        assert outcomes == {"accepted": 1, "already-resumed": RESUMERS - 1}, run_id
        [winner] = [me for me, outcome in results if outcome[run_id] == "accepted"]
        run = store.load(run_id)
        assert run is not None
        assert run.resume is not None
        assert (run.resume.request_id, run.resume.input) == (f"req-{winner}", {"from": winner})


def test_a_lease_whose_owner_process_died_is_rearmed(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    store.save(make_run("r1"))
    ctx = mp_context()
    out = ctx.Queue()
    child = ctx.Process(target=_claim_then_exit, args=(store_factory, "r1", out))
    child.start()
    [(child_pid, token)] = _collect(out, 1)
    _join([child])  # reaped: the pid is gone, not a zombie
    assert token is not None
    lease = store.lease("r1")
    assert lease is not None
    assert lease.owner.pid == child_pid
    assert not lease.expired(lease.claimed_at), "the lease itself is far from expiring"

    assert [run.run_id for run in store.recover_orphaned()] == ["r1"]
    assert store.lease("r1") is None
    run = store.claim("r1")
    assert run is not None
    assert run.lease is not None
    assert run.lease.token > token


def test_a_lease_held_by_a_live_process_is_not_rearmed(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    store.save(make_run("r1"))
    ctx = mp_context()
    out, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_claim_and_wait, args=(store_factory, "r1", out, done))
    child.start()
    try:
        status, token = out.get(timeout=CHILD_TIMEOUT)
        assert status == "claimed", token
        assert token is not None
        assert store.recover_orphaned() == []
        lease = store.lease("r1")
        assert lease is not None
        assert (lease.token, lease.owner.pid) == (token, child.pid)
        assert store.claim("r1") is None
    finally:
        done.set()
    _collect(out, 1)
    _join([child])


@pytest.mark.slow
def test_concurrent_first_pauses_from_many_processes_create_each_run_exactly_once(
    store: CheckpointStore, store_factory: StoreFactory
) -> None:
    run_ids = [f"first-{i:03d}" for i in range(RESUMED_RUNS * 2)]
    results: list[tuple[int, list[str]]] = _race(
        _first_pause_every_run, CLAIMERS, store_factory, run_ids
    )

    creators = Counter(run_id for _, created in results for run_id in created)
    assert creators == Counter(dict.fromkeys(run_ids, 1)), "every run created exactly once"
    winner = {run_id: me for me, created in results for run_id in created}
    for run_id in run_ids:
        run = store.load(run_id)
        assert run is not None and run.state == {"by": winner[run_id]}, "the winner's record"
