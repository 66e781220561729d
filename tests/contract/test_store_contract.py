"""The store contract, one process: every backend must pass this unchanged.

Concurrency (many processes) is in ``test_store_concurrency.py``, run-id
validation in ``test_run_ids.py``, and the file backend's crash, disk and
corruption behaviour in ``test_file_faults.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointStore,
    LeaseLost,
    Owner,
    PausedWorkflow,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
)
from celery_checkpoint.model import ResumeRequest, utcnow
from tests.contract.helpers import make_run

# A lease that cannot expire while a test runs, and one that expires at once.
LONG = 3600.0
EXPIRED_AFTER = 0.2


def claimed(store: CheckpointStore, run_id: str, **kwargs: Any) -> tuple[PausedWorkflow, int]:
    """Claim ``run_id`` (it must win) and return the record and its token."""
    run = store.claim(run_id, **kwargs)
    assert run is not None, f"claim of {run_id!r} lost"
    assert run.lease is not None, "a won claim carries its lease"
    return run, run.lease.token


def observe(store: CheckpointStore, run_id: str) -> tuple[Any, ...]:
    """Everything a caller can see of one run, to prove a refused write changed nothing."""
    return (
        store.load(run_id),
        store.lease(run_id),
        store.ended(run_id),
        store.count(),
        sorted((i.run.run_id, i.lease) for i in store.list()),
    )


def expire_and_recover(store: CheckpointStore, run_id: str) -> int:
    """Claim with a short lease, let it lapse, recover; return the lost holder's token."""
    _, token = claimed(store, run_id, lease_seconds=EXPIRED_AFTER)
    time.sleep(EXPIRED_AFTER + 0.15)
    assert [r.run_id for r in store.recover_orphaned()] == [run_id]
    return token


# -- save / load ----------------------------------------------------------------


def test_save_then_load_round_trips_every_field(store: CheckpointStore) -> None:
    run = make_run(
        "order-42",
        pause_seq=3,
        state={"nested": {"list": [1, "two", None, True]}, "unicode": "naïve ✓"},
        reason="waiting for a person",
        expects="shop.models:Approval",
        expires_at=utcnow() + timedelta(days=2),
        on_timeout="resume",
    )
    store.save(run)
    assert store.load("order-42") == run


def test_load_of_unknown_run_is_none(store: CheckpointStore) -> None:
    store.save(make_run("known"))
    assert store.load("unknown") is None
    assert store.lease("unknown") is None
    assert store.ended("unknown") is None


def test_save_is_a_whole_replacement_not_a_merge(store: CheckpointStore) -> None:
    store.save(make_run("r1", state={"a": 1, "b": 2}, metadata={"old": True}, reason="first"))
    second = make_run("r1", state={"c": 3}, metadata={}, reason=None, step="another")
    store.save(second)
    assert store.load("r1") == second
    assert store.count() == 1


def test_save_leaves_the_callers_record_untouched(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1")
    repause = run.model_copy(update={"pause_seq": 2})
    snapshot = repause.model_copy(deep=True)
    store.save(repause, token=token)
    assert repause == snapshot
    assert repause.lease is not None


def test_load_never_claims(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.load("r1")
    store.load("r1")
    assert store.lease("r1") is None
    claimed(store, "r1")


# -- claim --------------------------------------------------------------------


def test_claim_returns_the_checkpoint_with_a_fresh_lease(store: CheckpointStore) -> None:
    saved = make_run("r1")
    store.save(saved)
    owner = Owner(node="worker1@host", host="host-a", pid=4242)
    run, token = claimed(store, "r1", owner=owner, lease_seconds=LONG)
    assert run.lease is not None
    assert token == 1
    assert run.lease.owner == owner
    assert run.lease.expires_at > run.lease.claimed_at
    assert run.model_copy(update={"lease": None}) == saved
    assert store.lease("r1") == run.lease
    assert store.load("r1") is not None, "an in-flight run keeps its checkpoint"


def test_second_claim_of_an_in_flight_run_is_none(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    claimed(store, "r1", lease_seconds=LONG)
    assert store.claim("r1") is None
    assert store.claim("r1", lease_seconds=LONG) is None


def test_claim_of_unknown_or_completed_run_is_none(store: CheckpointStore) -> None:
    assert store.claim("never-paused") is None
    store.save(make_run("r1"))
    _, token = claimed(store, "r1")
    store.complete("r1", token=token)
    assert store.claim("r1") is None


def test_claim_aimed_at_a_different_pause_is_none(store: CheckpointStore) -> None:
    store.save(make_run("r1", pause_seq=2))
    assert store.claim("r1", pause_seq=1) is None
    assert store.claim("r1", pause_seq=3) is None
    assert store.lease("r1") is None
    claimed(store, "r1", pause_seq=2)


def test_each_claim_takes_the_next_token(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    tokens = []
    for _ in range(3):
        run, token = claimed(store, "r1")
        tokens.append(token)
        store.release("r1", token)
    run, token = claimed(store, "r1")
    store.save(run.model_copy(update={"pause_seq": 2, "step": "second"}), token=token)
    tokens.append(token)
    tokens.append(claimed(store, "r1")[1])
    assert tokens == [1, 2, 3, 4, 5]


# -- heartbeat and leases ------------------------------------------------------------


def test_heartbeat_extends_the_lease_of_the_holder(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1", lease_seconds=1)
    assert run.lease is not None
    extended = store.heartbeat("r1", token, lease_seconds=LONG)
    assert extended.token == token
    assert extended.owner == run.lease.owner
    assert extended.expires_at > run.lease.expires_at
    assert store.lease("r1") == extended


def test_heartbeat_without_a_lease_raises_lease_lost(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", 1)
    with pytest.raises(LeaseLost):
        store.heartbeat("unknown", 1)
    _, token = claimed(store, "r1")
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", token + 1)


def test_a_live_lease_is_not_rearmed_by_recovery(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1", lease_seconds=LONG)
    assert store.recover_orphaned() == []
    assert store.lease("r1") == run.lease
    assert store.claim("r1") is None
    store.heartbeat("r1", token)  # the holder still holds it


def test_a_lease_of_another_boot_under_our_host_name_waits_for_its_expiry(
    store: CheckpointStore,
) -> None:
    """Two machines may share a host name (containers, cloned VMs): an owner with
    our host name and another boot id is not proved dead, whatever its pid."""
    gone = Owner.current().model_copy(update={"pid": _exited_pid(), "pid_start": None})
    elsewhere = gone.model_copy(update={"boot_id": "the-boot-of-another-machine"})
    assert gone.is_dead_here(), "the same owner on our boot would be proved dead"
    store.save(make_run("r1"))
    store.request_resume("r1", "in", "req-1")
    run, token = claimed(store, "r1", owner=elsewhere, lease_seconds=LONG)
    for _ in range(3):
        assert store.recover_orphaned() == []
    assert store.lease("r1") == run.lease
    assert store.claim("r1") is None
    assert "r1" not in store.due_resumes(0), "its request is being run"
    store.heartbeat("r1", token, lease_seconds=EXPIRED_AFTER)  # its last heartbeat
    time.sleep(EXPIRED_AFTER + 0.15)
    assert [r.run_id for r in store.recover_orphaned()] == ["r1"], "taken over once expired"
    _, again = claimed(store, "r1")
    assert again > token


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_expired_lease_is_rearmed_and_the_next_claim_gets_a_higher_token(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", {"approved": True}, "req-1")
    lost = expire_and_recover(store, "r1")
    assert store.lease("r1") is None
    recovered = store.load("r1")
    assert recovered is not None
    assert recovered.recoveries == 1
    assert recovered.resume is not None
    assert recovered.resume.input == {"approved": True}
    assert recovered.resume.status == "pending"
    assert "r1" in store.due_resumes(0), "a recovered pending resume is due for re-sending"
    _, token = claimed(store, "r1")
    assert token > lost
    assert store.recover_orphaned() == [], "a re-armed run is not recovered twice"


@pytest.mark.parametrize("after", ["recovered", "claimed-again"])
def test_stale_token_writes_raise_lease_lost_and_change_nothing(
    store: CheckpointStore, after: str
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", "input", "req-1")
    stale = expire_and_recover(store, "r1")
    if after == "claimed-again":
        claimed(store, "r1", lease_seconds=LONG)
    before = observe(store, "r1")
    with pytest.raises(LeaseLost):
        store.complete("r1", token=stale)
    with pytest.raises(LeaseLost):
        store.save(make_run("r1", step="late-repause", pause_seq=2), token=stale)
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", stale, lease_seconds=LONG)
    with pytest.raises(LeaseLost):
        store.release("r1", stale, error="late failure")
    with pytest.raises(LeaseLost):
        store.cancel("r1", token=stale)
    assert observe(store, "r1") == before


def test_untokened_save_of_an_in_flight_run_raises_lease_lost(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    claimed(store, "r1", lease_seconds=LONG)
    before = observe(store, "r1")
    with pytest.raises(LeaseLost):
        store.save(make_run("r1", step="overwrite"))
    assert observe(store, "r1") == before


# -- complete and re-pause -------------------------------------------------------


def test_complete_drops_the_run_and_is_idempotent(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.save(make_run("r2"))
    _, token = claimed(store, "r1")
    store.complete("r1", token=token)
    store.complete("r1", token=token)
    store.complete("r1")
    store.complete("never-paused")
    assert store.load("r1") is None
    assert store.lease("r1") is None
    assert [i.run.run_id for i in store.list()] == ["r2"]
    assert store.count() == 1


def test_complete_without_token_drops_any_run_and_fences_its_holder(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    _, token = claimed(store, "r1", lease_seconds=LONG)
    store.complete("r1")
    assert store.load("r1") is None
    assert store.count() == 0
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", token)


def test_complete_without_token_leaves_a_run_that_is_not_in_flight_as_it_is(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1")
    store.save(run.model_copy(update={"lease": None, "pause_seq": 2}), token=token)
    before = observe(store, "r1")
    store.complete("r1")
    assert observe(store, "r1") == before
    _, again = claimed(store, "r1", pause_seq=2)
    assert again == token + 1


def test_repause_then_complete_with_the_same_token_keeps_the_fresh_paused_record(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", {"approved": True}, "req-1")
    run, token = claimed(store, "r1")
    repaused = run.model_copy(
        update={"lease": None, "resume": None, "step": "ship", "pause_seq": 2, "state": {"n": 2}}
    )
    store.save(repaused, token=token)
    store.complete("r1", token=token)  # the decorator's "save with token, then complete"
    got = store.load("r1")
    assert got is not None
    assert (got.step, got.pause_seq, got.state, got.resume) == ("ship", 2, {"n": 2}, None)
    assert store.lease("r1") is None
    assert store.count() == 1
    _, again = claimed(store, "r1", pause_seq=2)
    assert again > token


def test_repause_ends_the_lease_in_the_same_step(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1", lease_seconds=LONG)
    store.save(run.model_copy(update={"pause_seq": 2}), token=token)
    assert store.lease("r1") is None
    assert store.recover_orphaned() == []
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", token)
    with pytest.raises(LeaseLost):
        store.release("r1", token)


# -- release --------------------------------------------------------------------


def test_release_returns_the_run_to_paused_with_its_input_and_a_failed_request(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", {"approved": True}, "req-1")
    run, token = claimed(store, "r1")
    store.release("r1", token, error="ValueError: boom")
    assert store.lease("r1") is None
    got = store.load("r1")
    assert got is not None
    assert got.resume is not None
    assert (got.resume.request_id, got.resume.input) == ("req-1", {"approved": True})
    assert (got.resume.status, got.resume.error) == ("failed", "ValueError: boom")
    assert (got.step, got.state) == (run.step, run.state)
    assert "r1" not in store.due_resumes(0), "a failed request is not re-sent"
    retry, retry_token = claimed(store, "r1")  # a Celery retry of the same message
    assert retry_token > token
    assert retry.resume is not None
    assert retry.resume.input == {"approved": True}


def test_a_new_resume_may_replace_a_failed_request(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", 1, "req-1")
    _, token = claimed(store, "r1")
    store.release("r1", token, error="boom")
    assert store.request_resume("r1", 1, "req-1").status == "failed", "same id: same request"
    request = store.request_resume("r1", 2, "req-2")
    assert (request.request_id, request.input, request.status) == ("req-2", 2, "pending")
    got = store.load("r1")
    assert got is not None
    assert got.resume == request
    assert store.due_resumes(0) == ["r1"]
    with pytest.raises(AlreadyResumed):
        store.request_resume("r1", 3, "req-3")


# -- request_resume ------------------------------------------------------------


def test_request_resume_twice_with_the_same_id_is_one_request(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    first = store.request_resume("r1", {"approved": True}, "req-1")
    assert isinstance(first, ResumeRequest)
    assert (first.request_id, first.input, first.status) == ("req-1", {"approved": True}, "pending")
    assert store.request_resume("r1", {"approved": True}, "req-1") == first
    got = store.load("r1")
    assert got is not None
    assert got.resume == first


def test_request_resume_with_another_id_while_pending_raises_already_resumed(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    first = store.request_resume("r1", "yes", "req-1")
    before = observe(store, "r1")
    with pytest.raises(AlreadyResumed) as caught:
        store.request_resume("r1", "no", "req-2")
    assert caught.value.pending_request_id == "req-1"
    assert observe(store, "r1") == before
    got = store.load("r1")
    assert got is not None
    assert got.resume == first


def test_request_resume_of_an_in_flight_run_raises_already_resumed(
    store: CheckpointStore,
) -> None:
    store.save(make_run("r1"))
    claimed(store, "r1", lease_seconds=LONG)  # e.g. a timeout or a redelivery claimed it
    before = observe(store, "r1")
    with pytest.raises(AlreadyResumed):
        store.request_resume("r1", "late", "req-1")
    assert observe(store, "r1") == before


def test_request_resume_of_unknown_run_raises_checkpoint_not_found(
    store: CheckpointStore,
) -> None:
    with pytest.raises(CheckpointNotFound):
        store.request_resume("never-paused", None, "req-1")
    assert store.count() == 0


def test_request_resume_aimed_at_another_pause_is_rejected(store: CheckpointStore) -> None:
    store.save(make_run("r1", pause_seq=2))
    before = observe(store, "r1")
    with pytest.raises(ResumeRejected):
        store.request_resume("r1", "x", "req-1", pause_seq=1)
    assert observe(store, "r1") == before
    assert store.request_resume("r1", "x", "req-1", pause_seq=2).pause_seq == 2


def test_request_resume_of_a_cancelled_run_raises_run_cancelled(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.cancel("r1")
    with pytest.raises(RunCancelled):
        store.request_resume("r1", None, "req-1")


def test_request_resume_of_an_expired_run_raises_pause_expired(store: CheckpointStore) -> None:
    store.save(make_run("r1", expires_at=utcnow() - timedelta(seconds=1)))
    store.cancel("r1", status="expired", reason="timed out")
    with pytest.raises(PauseExpired):
        store.request_resume("r1", None, "req-1")


# -- cancel / ended ---------------------------------------------------------------


def test_cancel_fences_a_live_lease_holder(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    run, token = claimed(store, "r1", lease_seconds=LONG)
    ended = store.cancel("r1", reason="operator said stop")
    assert ended is not None
    assert (ended.run_id, ended.status, ended.ended_reason) == (
        "r1",
        "cancelled",
        "operator said stop",
    )
    assert (ended.step, ended.state) == (run.step, run.state)
    assert store.ended("r1") == ended
    before = observe(store, "r1")
    with pytest.raises(LeaseLost):
        store.complete("r1", token=token)
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", token)
    with pytest.raises(LeaseLost):
        store.release("r1", token, error="too late")
    with pytest.raises(LeaseLost):
        store.save(run.model_copy(update={"pause_seq": 2}), token=token)
    assert observe(store, "r1") == before
    assert store.load("r1") is None
    assert store.lease("r1") is None
    assert store.claim("r1") is None
    assert store.count() == 0


def test_cancel_of_unknown_or_ended_run_is_none(store: CheckpointStore) -> None:
    assert store.cancel("never-paused") is None
    store.save(make_run("r1"))
    assert store.cancel("r1", status="failed") is not None
    assert store.cancel("r1") is None
    ended = store.ended("r1")
    assert ended is not None
    assert ended.status == "failed", "a second cancel does not rewrite the ended record"


def test_cancel_with_the_holders_token_only(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    _, token = claimed(store, "r1", lease_seconds=LONG)
    before = observe(store, "r1")
    with pytest.raises(LeaseLost):
        store.cancel("r1", token=token + 1)
    assert observe(store, "r1") == before
    ended = store.cancel("r1", token=token, status="failed", reason="max recoveries")
    assert ended is not None
    assert ended.status == "failed"


# -- list / count -----------------------------------------------------------------


def _ids(infos: Any) -> list[str]:
    return sorted(info.run.run_id for info in infos)


def test_list_filters_by_task_step_and_age(store: CheckpointStore) -> None:
    old = utcnow() - timedelta(hours=2)
    store.save(make_run("a", task_name="shop.ship", step="approve", paused_at=old))
    store.save(make_run("b", task_name="shop.ship", step="pack"))
    store.save(make_run("c", task_name="shop.bill", step="approve", paused_at=old))
    store.save(make_run("d", task_name="shop.bill", step="pack"))
    assert _ids(store.list()) == ["a", "b", "c", "d"]
    assert _ids(store.list(task="shop.ship")) == ["a", "b"]
    assert _ids(store.list(step="approve")) == ["a", "c"]
    assert _ids(store.list(older_than=3600)) == ["a", "c"]
    assert _ids(store.list(task="shop.bill", step="pack")) == ["d"]
    assert _ids(store.list(task="shop.bill", older_than=3600)) == ["c"]
    assert _ids(store.list(task="nope")) == []
    assert _ids(store.list(older_than=3 * 3600)) == []


def test_list_shows_in_flight_runs_with_their_lease(store: CheckpointStore) -> None:
    store.save(make_run("paused"))
    store.save(make_run("running"))
    run, _ = claimed(store, "running", lease_seconds=LONG)
    infos = {info.run.run_id: info for info in store.list()}
    assert set(infos) == {"paused", "running"}
    assert infos["running"].in_flight
    assert infos["running"].lease == run.lease
    assert not infos["paused"].in_flight
    assert infos["paused"].lease is None


def test_count_counts_paused_and_in_flight_runs(store: CheckpointStore) -> None:
    assert store.count() == 0
    for i in range(5):
        store.save(make_run(f"r{i}"))
    store.save(make_run("r0", step="again"))  # an overwrite is still one run
    _, token = claimed(store, "r1")
    assert store.count() == 5
    store.complete("r1", token=token)
    store.cancel("r2")
    assert store.count() == 3


# -- due_resumes / due_timeouts ---------------------------------------------------


def test_due_resumes_returns_a_pending_request_once_per_interval(store: CheckpointStore) -> None:
    store.save(make_run("r1"))
    store.save(make_run("idle"))
    store.request_resume("r1", "x", "req-1")
    assert store.due_resumes(3600) == [], "just sent: not due yet"
    assert store.due_resumes(0) == ["r1"]
    assert store.due_resumes(3600) == [], "marked sent by the previous call"
    assert store.due_resumes(0) == ["r1"], "due again once older_than has passed"


def test_due_resumes_skips_claimed_and_ended_runs(store: CheckpointStore) -> None:
    for run_id in ("claimed", "cancelled", "completed"):
        store.save(make_run(run_id))
        store.request_resume(run_id, None, f"req-{run_id}")
    claimed(store, "claimed", lease_seconds=LONG)
    store.cancel("cancelled")
    _, token = claimed(store, "completed")
    store.complete("completed", token=token)
    assert store.due_resumes(0) == []


def test_due_timeouts_returns_runs_whose_pause_expired(store: CheckpointStore) -> None:
    now = utcnow()
    store.save(make_run("late", expires_at=now - timedelta(minutes=1)))
    store.save(make_run("soon", expires_at=now + timedelta(hours=1)))
    store.save(make_run("never"))
    assert store.due_timeouts() == ["late"]
    assert sorted(store.due_timeouts(now + timedelta(hours=2))) == ["late", "soon"]
    store.save(make_run("late"))  # re-saved without a timeout
    store.cancel("soon", status="expired")
    assert store.due_timeouts(now + timedelta(hours=2)) == []


def _near(found: Any, expected: Any) -> bool:
    """Equal to the millisecond (the file store keeps a deadline as a file's mtime)."""
    return found is not None and abs(found - expected) < timedelta(milliseconds=1)


def test_next_deadline_is_the_earliest_deadline_among_paused_runs(store: CheckpointStore) -> None:
    assert store.next_deadline() is None
    now = utcnow()
    store.save(make_run("never"))
    assert store.next_deadline() is None
    # Enough runs to land in several groups of a backend that partitions its index.
    for i in range(20):
        store.save(make_run(f"run-{i}", expires_at=now + timedelta(minutes=30 + (i * 7) % 20)))
    assert _near(store.next_deadline(), now + timedelta(minutes=30))
    store.save(make_run("late", expires_at=now - timedelta(minutes=1)))
    assert _near(store.next_deadline(), now - timedelta(minutes=1)), "a passed deadline too"
    store.save(make_run("late"))  # re-paused without a timeout
    assert _near(store.next_deadline(), now + timedelta(minutes=30))
    store.cancel("run-0")
    _, token = claimed(store, "run-3")  # 30 + 21 % 20 = 31 minutes
    store.complete("run-3", token=token)
    assert _near(store.next_deadline(), now + timedelta(minutes=32))
    for i in range(20):
        store.cancel(f"run-{i}")
    assert store.next_deadline() is None


def test_next_deadline_lists_a_run_whose_timeout_fired_until_it_ends(
    store: CheckpointStore,
) -> None:
    deadline = utcnow() - timedelta(seconds=1)
    store.save(make_run("fired", expires_at=deadline))
    store.request_resume("fired", None, "timeout-1", timed_out=True, via="timeout")
    assert _near(store.next_deadline(), deadline), "the caller re-checks the run"
    _, token = claimed(store, "fired")
    assert _near(store.next_deadline(), deadline)
    store.complete("fired", token=token)
    assert store.next_deadline() is None


def test_a_new_run_under_an_ended_id_is_claimable_with_growing_tokens(
    store: CheckpointStore,
) -> None:
    store.save(make_run("reused"))
    _, old_token = claimed(store, "reused", lease_seconds=LONG)
    store.cancel("reused", reason="gone")
    store.save(make_run("reused", step="again"))
    assert store.ended("reused") is None
    run, new_token = claimed(store, "reused", lease_seconds=LONG)
    assert run.step == "again"
    assert new_token > old_token
    with pytest.raises(LeaseLost):
        store.complete("reused", token=old_token)
    assert store.lease("reused") is not None


def test_completion_leaves_a_tombstone_that_fences_older_tokens(store: CheckpointStore) -> None:
    store.save(make_run("done"))
    store.request_resume("done", {"ok": True}, "req-1")
    _, stale = claimed(store, "done", lease_seconds=EXPIRED_AFTER)
    time.sleep(EXPIRED_AFTER * 2)
    assert [run.run_id for run in store.recover_orphaned()] == ["done"]
    _, token = claimed(store, "done", lease_seconds=LONG)
    store.complete("done", token=token)
    store.complete("done", token=token)  # idempotent for the holder that completed it
    with pytest.raises(LeaseLost):
        store.complete("done", token=stale)  # a late holder never "completes" it again
    tombstone = store.ended("done")
    assert tombstone is not None and tombstone.status == "completed"
    assert store.load("done") is None and store.claim("done") is None
    again = store.request_resume("done", {"ok": True}, "req-1")
    assert again.request_id == "req-1"  # the same resume again is answered, not re-run
    with pytest.raises(AlreadyResumed):
        store.request_resume("done", {"ok": False}, "req-2")


# -- pruning ended runs --------------------------------------------------------------


def test_prune_ended_deletes_only_ended_records_past_the_age(store: CheckpointStore) -> None:
    for run_id in ("done", "gone", "kept-paused", "kept-flying"):
        store.save(make_run(run_id))
    _, token = claimed(store, "done", lease_seconds=LONG)
    store.complete("done", token=token)
    store.cancel("gone", reason="not needed")
    claimed(store, "kept-flying", lease_seconds=LONG)

    assert store.prune_ended(3600) == 0, "nothing ended an hour ago"
    assert store.ended("done") is not None and store.ended("gone") is not None
    time.sleep(0.05)
    assert store.prune_ended(0.01) == 2
    assert store.ended("done") is None and store.ended("gone") is None
    assert store.prune_ended(0) == 0, "pruning twice deletes nothing more"
    assert store.load("kept-paused") is not None
    assert store.lease("kept-flying") is not None
    assert store.count() == 2
    with pytest.raises(CheckpointNotFound):
        store.request_resume("gone", {"ok": True}, "req-1")  # no record is left at all
    with pytest.raises(ValueError, match="older_than"):
        store.prune_ended(-1)


def test_a_run_saved_again_under_a_pruned_or_reended_id_is_not_pruned_by_its_old_entry(
    store: CheckpointStore,
) -> None:
    store.save(make_run("again"))
    store.cancel("again")
    store.save(make_run("again", step="second life"))  # a new run under the ended id
    time.sleep(0.05)
    assert store.prune_ended(0.01) == 0
    assert store.load("again") is not None and store.load("again").step == "second life"
    store.cancel("again", reason="second end")
    assert store.prune_ended(3600) == 0, "the second end is fresh"
    ended = store.ended("again")
    assert ended is not None and ended.ended_reason == "second end"


# -- a run's first pause: create-only ---------------------------------------------------


def test_a_create_only_save_never_replaces_a_checkpoint_or_its_accepted_resume(
    store: CheckpointStore,
) -> None:
    store.save(make_run("first"), create=True)
    store.request_resume("first", {"ok": True}, "req-1")
    before = observe(store, "first")
    with pytest.raises(CheckpointExists) as caught:
        store.save(make_run("first", step="a duplicate's pause"), create=True)
    assert caught.value.status == "paused" and caught.value.run_id == "first"
    assert observe(store, "first") == before, "nothing changed"

    claimed(store, "first", lease_seconds=LONG)
    with pytest.raises(CheckpointExists):
        store.save(make_run("first"), create=True)  # in flight
    store.save(make_run("gone"))
    store.cancel("gone")
    with pytest.raises(CheckpointExists) as ended:
        store.save(make_run("gone"), create=True)
    assert ended.value.status == "ended"
    assert store.ended("gone") is not None and store.load("gone") is None
    with pytest.raises(ValueError, match="no token"):
        store.save(make_run("other"), token=1, create=True)


def test_exists_sees_paused_in_flight_and_ended_runs_without_reading_them(
    store: CheckpointStore,
) -> None:
    assert not store.exists("nobody")
    store.save(make_run("here"))
    assert store.exists("here")
    _, token = claimed(store, "here", lease_seconds=LONG)
    assert store.exists("here")
    store.complete("here", token=token)
    assert store.exists("here"), "a completed run keeps its tombstone"
    time.sleep(0.02)
    store.prune_ended(0.01)
    assert not store.exists("here")
