"""Pause timeouts on an embedded worker: expire, resume, and timers that must do nothing.

The deadline lives in the store; the process that paused a run fires it from
its timer, and a recovery pass arms the timer for deadlines paused elsewhere.
Timer messages of an earlier version (``celery_checkpoint.timeout`` with an
``eta``) may still arrive: they must never be held, and never fire twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery.result import AsyncResult

from celery_checkpoint import AlreadyResumed, PauseExpired
from celery_checkpoint.bootstep import recover
from celery_checkpoint.model import ResumeRequest, utcnow
from celery_checkpoint.task import TIMER_TASK
from tests.unit.ops_harness import Ops, running

# Long enough that a resume sent right after PAUSED lands well before it.
BEFORE_DEADLINE = 4.0


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    # One worker for the module (stopping one takes seconds). The recovery pass
    # runs only at boot (and when a test calls it): the deadline timer alone
    # fires the timeouts here.
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
    assert ops.timers(result.parent.id) == []  # no timer message: the store keeps the deadline


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


def nothing_fired(ops: Ops, run_id: str, pause_seq: int = 1) -> list[str]:
    """Wait until the run's deadline timer went off and found nothing to fire."""
    text = f"run {run_id}: nothing to fire at the deadline of pause {pause_seq}"
    return ops.wait(lambda: ops.logged(text), "the deadline timer to go off")


def test_the_timer_of_a_run_resumed_before_the_deadline_does_nothing(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((3,), {"timeout": BEFORE_DEADLINE})
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.resume(result.id, {"approved": True})
    assert result.get(timeout=30) == "approved"
    nothing_fired(ops, result.id)
    assert result.state == "SUCCESS" and result.result == "approved"
    assert len(ops.bodies("approve", result.id)) == 1
    ended = ops.checkpoints.store.ended(result.id)  # completed, not expired
    assert ended is not None and ended.status == "completed"
    assert ops.checkpoints.store.stats()["due_timeouts"] == 0  # the deadline went with the run


def test_the_timer_of_an_earlier_pause_does_nothing(ops: Ops) -> None:
    result = ops.tasks["two_step"].apply_async((BEFORE_DEADLINE,))
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.resume(result.id, "a")
    store = ops.checkpoints.store
    ops.wait(lambda: (r := store.load(result.id)) is not None and r.pause_seq == 2, "pause 2")
    nothing_fired(ops, result.id, pause_seq=1)
    assert result.state == "PAUSED" and result.info["step"] == "second"
    paused = store.load(result.id)
    assert paused is not None and paused.expires_at is None and paused.resume is None
    ops.checkpoints.resume(result.id, "b")
    assert result.get(timeout=30) == [{"first": "a"}, "b"]


def test_the_timer_of_a_cancelled_run_does_nothing(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((4,), {"timeout": 1.0})
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.cancel(result.id, reason="not needed")
    nothing_fired(ops, result.id)
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


def test_a_deadline_paused_elsewhere_fires_from_the_timer_a_recovery_pass_armed(
    ops: Ops,
) -> None:
    result = ops.tasks["approve"].apply_async((9,), {"on_timeout": "resume"})
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    # A deadline this process never armed, as if another worker had paused the run.
    store.save(run.model_copy(update={"expires_at": utcnow() + timedelta(seconds=1.5)}))
    assert recover(ops.app).timeouts == 0  # not due yet: the pass arms the timer for it
    assert result.get(timeout=30) == "timed out"  # no other pass runs meanwhile
    assert len(ops.bodies("approve", result.id)) == 1


def test_a_deadline_behind_one_still_running_fires_once_that_one_ends(ops: Ops) -> None:
    store = ops.checkpoints.store
    ops.gate.clear()
    running = ops.tasks["gated"].apply_async()
    ops.wait_state(running, "PAUSED")
    run = store.load(running.id)
    assert run is not None
    # Answered before a deadline that has passed since (one save: no timer can
    # fire it in between): while its body runs, it stays the store's earliest
    # deadline and hides the ones after it.
    answer = ResumeRequest(request_id="answered-in-time", input="finish", pause_seq=1)
    past = utcnow() - timedelta(seconds=1)
    store.save(run.model_copy(update={"expires_at": past, "resume": answer}))
    ops.checkpoints.send(run, answer)
    ops.wait(lambda: ops.bodies("gated-start", running.id), "the answered body to start")
    waiting = ops.tasks["approve"].apply_async((10,), {"on_timeout": "resume"})
    ops.wait_state(waiting, "PAUSED")
    later = store.load(waiting.id)
    assert later is not None
    deadline = utcnow() + timedelta(seconds=1)
    store.save(later.model_copy(update={"expires_at": deadline}))  # paused elsewhere
    assert recover(ops.app).timeouts == 0
    ops.wait(lambda: utcnow() > deadline + timedelta(seconds=1), "the later deadline to pass")
    assert AsyncResult(waiting.id, app=ops.app).state == "PAUSED"  # hidden behind the other
    ops.gate.set()
    assert running.get(timeout=30) == "finished"
    assert waiting.get(timeout=60) == "timed out"  # found once the first one ended
    assert len(ops.bodies("approve", waiting.id)) == 1


# -- timer messages left in brokers by an earlier version ------------------------------


def test_an_old_timer_message_not_due_yet_is_acknowledged_without_running(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((7,), {"timeout": 3600})
    ops.wait_state(result, "PAUSED")
    sent = ops.app.send_task(TIMER_TASK, args=(result.id, 1), eta=utcnow() + timedelta(hours=1))
    ops.wait(lambda: ops.logged(f"timer message {sent.id}"), "the timer message to arrive")
    assert ops.logged(f"timer message {sent.id}")[0].endswith(
        "acknowledged on arrival: pause deadlines are kept and fired by the checkpoint store"
    )
    assert ops.timers(result.id) == []  # never ran, never held
    run = ops.checkpoints.store.load(result.id)
    assert run is not None and run.resume is None
    ops.checkpoints.cancel(result.id)


def test_an_old_timer_message_fires_a_due_unanswered_timeout_once(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((8,), {"on_timeout": "resume"})
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    # A deadline that passed with no timer armed in this process.
    past = utcnow() - timedelta(seconds=1)
    store.save(run.model_copy(update={"expires_at": past}))
    ops.app.send_task(TIMER_TASK, args=(result.id, 1), eta=past)
    assert ops.wait(lambda: ops.timers(result.id), "the timer message") == [True]
    assert result.get(timeout=30) == "timed out"
    ops.app.send_task(TIMER_TASK, args=(result.id, 1))  # a second copy, redelivered
    assert ops.wait(lambda: ops.timers(result.id)[1:], "the second copy") == [False]
    assert len(ops.bodies("approve", result.id)) == 1
