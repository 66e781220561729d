"""Pause timeouts on an embedded worker: expire, resume, and timers that must do nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from celery_checkpoint import AlreadyResumed, PauseExpired
from celery_checkpoint.bootstep import recover
from celery_checkpoint.model import utcnow
from tests.unit.ops_harness import Ops, running

# Long enough that a resume sent right after PAUSED lands well before it.
BEFORE_DEADLINE = 4.0


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    # One worker for the module (stopping one takes seconds). The recovery sweep
    # runs only at boot: the timer message alone must fire the timeouts here.
    store = tmp_path_factory.mktemp("timeouts") / "store"
    with running(store, checkpoint_recovery_interval=3600) as ops:
        yield ops


def test_expired_pause_fails_with_pause_expired_and_runs_the_error_callbacks(ops: Ops) -> None:
    approve, errback = ops.tasks["approve"], ops.tasks["errback"]
    result = approve.apply_async((1,), {"timeout": 0.3}, link_error=errback.s())
    ops.wait_state(result, "FAILURE")
    assert isinstance(result.result, PauseExpired)
    assert "await_approval" in str(result.result)
    errbacks = ops.wait(lambda: ops.bodies("errback", result.id), "the error callback")
    assert errbacks == [("errback", result.id, "PauseExpired", str(result.result))]
    assert ops.bodies("approve", result.id) == []  # the body never ran again
    ended = ops.checkpoints.store.ended(result.id)
    assert ended is not None and ended.status == "expired"
    assert ops.checkpoints.store.load(result.id) is None
    with pytest.raises(PauseExpired):
        ops.checkpoints.resume(result.id, {"approved": True})


def test_resume_on_timeout_runs_the_body_timed_out_without_input(ops: Ops) -> None:
    approve, after = ops.tasks["approve"], ops.tasks["after"]
    result = (approve.s(2, timeout=0.3, on_timeout="resume") | after.s()).apply_async()
    assert result.get(timeout=30) == "timed out"  # the chain went on with the value
    [call] = ops.bodies("approve", result.parent.id)
    assert call[2:] == (True, None, "timeout-1")  # timed_out, no input, the timeout's request
    assert ops.checkpoints.store.load(result.parent.id) is None
    assert ops.bodies("after") == [("after", "timed out")]


def test_a_resume_after_the_timeout_resumed_the_run_is_refused(ops: Ops) -> None:
    ops.gate.clear()
    result = ops.tasks["gated"].apply_async()
    ops.wait_state(result, "PAUSED")
    # Give the paused record a due deadline in "resume" mode and fire it.
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    store.save(run.model_copy(update={"expires_at": utcnow(), "on_timeout": "resume"}))
    assert ops.checkpoints.fire_timeout(result.id)
    with pytest.raises(AlreadyResumed):
        ops.checkpoints.resume(result.id, "finished")
    ops.gate.set()
    assert result.get(timeout=30) == "finished"
    starts = ops.bodies("gated-start", result.id)
    assert len(starts) == 1


def test_timer_of_a_run_resumed_before_the_deadline_does_nothing(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((3,), {"timeout": BEFORE_DEADLINE})
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.resume(result.id, {"approved": True})
    assert result.get(timeout=30) == "approved"
    assert ops.wait(lambda: ops.timers(result.id), "the timer to fire") == [False]
    assert result.state == "SUCCESS" and result.result == "approved"
    assert len(ops.bodies("approve", result.id)) == 1
    ended = ops.checkpoints.store.ended(result.id)  # completed, not expired
    assert ended is not None and ended.status == "completed"
    assert ops.checkpoints.store.stats()["due_timeouts"] == 0  # the deadline went with the run


def test_stale_timer_of_an_earlier_pause_does_nothing(ops: Ops) -> None:
    result = ops.tasks["two_step"].apply_async((BEFORE_DEADLINE,))
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.resume(result.id, "a")
    store = ops.checkpoints.store
    ops.wait(lambda: (r := store.load(result.id)) is not None and r.pause_seq == 2, "pause 2")
    assert ops.wait(lambda: ops.timers(result.id), "the first pause's timer") == [False]
    assert result.state == "PAUSED" and result.info["step"] == "second"
    paused = store.load(result.id)
    assert paused is not None and paused.expires_at is None and paused.resume is None
    ops.checkpoints.resume(result.id, "b")
    assert result.get(timeout=30) == [{"first": "a"}, "b"]


def test_timer_of_a_cancelled_run_does_nothing(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((4,), {"timeout": 0.5})
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.cancel(result.id, reason="not needed")
    assert ops.wait(lambda: ops.timers(result.id), "the timer to fire") == [False]
    assert result.state == "REVOKED"
    ended = ops.checkpoints.store.ended(result.id)
    assert ended is not None and ended.status == "cancelled"


def test_a_resume_past_an_expiring_deadline_is_refused_and_expires_the_run(ops: Ops) -> None:
    # The deadline passed while no timer was set, as after an outage.
    result = ops.tasks["approve"].apply_async((5,))
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    past = utcnow() - timedelta(seconds=1)
    store.save(run.model_copy(update={"expires_at": past}))
    with pytest.raises(PauseExpired, match="timed out"):
        ops.checkpoints.resume(result.id, {"approved": True})
    ops.wait_state(result, "FAILURE")  # the refused resume fired the timeout
    assert isinstance(result.result, PauseExpired)
    assert ops.bodies("approve", result.id) == []


def test_recovery_pass_fires_a_due_timeout_whose_timer_was_lost(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((6,), {"on_timeout": "resume"})
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    # A deadline no timer message was ever sent for: only the recovery pass
    # (every worker runs it on its timer) can find it.
    store.save(run.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)}))
    assert store.stats()["due_timeouts"] >= 1
    assert recover(ops.app).timeouts == 1
    assert recover(ops.app).timeouts == 0  # fired once: the next pass leaves it alone
    assert result.get(timeout=30) == "timed out"
    assert len(ops.bodies("approve", result.id)) == 1
    assert ops.timers(result.id) == []  # no timer message was involved


def test_a_timed_out_body_that_fails_is_not_timed_out_again(ops: Ops) -> None:
    result = ops.tasks["fails_when_timed_out"].apply_async()
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    past = utcnow() - timedelta(seconds=1)
    store.save(run.model_copy(update={"expires_at": past, "on_timeout": "resume"}))
    assert ops.checkpoints.fire_timeout(result.id)
    with pytest.raises(RuntimeError, match="timed-out body failed"):
        result.get(timeout=30)
    paused = store.load(result.id)  # released back to PAUSED, nothing lost
    assert paused is not None and paused.resume is not None
    assert paused.resume.timed_out and paused.resume.status == "failed"
    # The timeout fired once: neither the sweep nor a late timer fires it again.
    assert recover(ops.app).timeouts == 0
    assert not ops.checkpoints.fire_timeout(result.id, paused.pause_seq)
    # A person may still answer the failed attempt.
    ops.checkpoints.resume(result.id, "by hand")
    assert ops.wait_state(result, "SUCCESS").result == "by hand"
    assert [c[2] for c in ops.bodies("fails_when_timed_out", result.id)] == [True, False]
