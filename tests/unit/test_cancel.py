"""Cancelling paused and in-flight runs: durable, final, and fencing a running body."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery import Celery, chord
from celery.exceptions import ChordError

from celery_checkpoint import (
    CheckpointNotFound,
    Checkpoints,
    LeaseLost,
    PauseExpired,
    RunCancelled,
)
from celery_checkpoint.bootstep import recover
from celery_checkpoint.model import utcnow
from tests.unit.ops_harness import Ops, running


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    store = tmp_path_factory.mktemp("cancel") / "store"
    with running(store, checkpoint_recovery_interval=3600) as ops:
        yield ops


def test_cancel_of_a_paused_run_is_durable_and_final(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((1,), {"timeout": 3600})
    ops.wait_state(result, "PAUSED")
    ended = ops.checkpoints.cancel(result.id, reason="customer left")
    assert ended.status == "cancelled" and ended.ended_reason == "customer left"
    revoked = ops.wait_state(result, "REVOKED")
    assert isinstance(revoked.result, RunCancelled) and "customer left" in str(revoked.result)

    # Durable: another process opening the same store sees it cancelled.
    other = Checkpoints(Celery("other", set_as_current=False), store=str(ops.store_dir))
    assert other.store.load(result.id) is None
    stored = other.store.ended(result.id)
    assert stored is not None and stored.status == "cancelled"
    with pytest.raises(RunCancelled, match="customer left"):
        other.resume(result.id, {"approved": True})
    assert result.id not in {info.run.run_id for info in other.store.list()}

    # Nothing later runs it: not a timeout, not recovery, not a stray message.
    assert not ops.checkpoints.fire_timeout(result.id)
    assert recover(ops.app).timeouts == 0
    ops.checkpoints.send(ended, None)
    ops.wait(lambda: ops.ignored(result.id), "the stray message to be ignored")
    assert ops.bodies("approve", result.id) == []
    assert ops.wait_state(result, "REVOKED")


def test_cancel_twice_is_one_cancel_and_unknown_runs_are_not_found(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((2,))
    ops.wait_state(result, "PAUSED")
    first = ops.checkpoints.cancel(result.id, reason="dup")
    again = ops.checkpoints.cancel(result.id, reason="ignored, already cancelled")
    assert again.ended_reason == first.ended_reason == "dup"
    with pytest.raises(CheckpointNotFound):
        ops.checkpoints.cancel("never-paused")


def test_an_expired_run_cannot_be_cancelled(ops: Ops) -> None:
    result = ops.tasks["approve"].apply_async((3,))
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    run = store.load(result.id)
    assert run is not None
    store.save(run.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)}))
    assert ops.checkpoints.fire_timeout(result.id)
    ops.wait_state(result, "FAILURE")
    with pytest.raises(PauseExpired):
        ops.checkpoints.cancel(result.id)
    assert ops.wait_state(result, "FAILURE")


@pytest.mark.parametrize("ending", ["return", "raise", "pause"])
def test_cancel_fences_an_in_flight_body_whatever_it_ends_with(ops: Ops, ending: str) -> None:
    ops.gate.clear()
    result = ops.tasks["gated"].apply_async()
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.resume(result.id, ending)
    [(_, _, token)] = ops.wait(lambda: ops.bodies("gated-start", result.id), "the body to start")
    store = ops.checkpoints.store
    assert store.lease(result.id) is not None
    ops.checkpoints.cancel(result.id, reason="stop")  # returns at once: fenced, not waited for
    with pytest.raises(LeaseLost):
        store.heartbeat(result.id, token)  # what the body's heartbeat thread now gets
    ops.gate.set()
    ops.wait(lambda: ops.bodies("gated-end", result.id), "the body to end")
    ops.wait(lambda: ops.ignored(result.id), "the fenced outcome to be dropped")
    # Its return value, its failure or its new pause were all dropped.
    assert ops.wait_state(result, "REVOKED")
    assert store.load(result.id) is None
    ended = store.ended(result.id)
    assert ended is not None and ended.status == "cancelled" and ended.step == "await_go"
    with pytest.raises(RunCancelled):
        ops.checkpoints.resume(result.id, "again")


def test_cancelling_a_chord_member_fails_the_chord_instead_of_hanging_it(ops: Ops) -> None:
    approve, after = ops.tasks["approve"], ops.tasks["after"]
    header = [approve.s(20), approve.s(21)]
    result = chord(header)(after.s())
    cancelled, resumed = (member.id for member in result.parent.results)
    for run_id in (cancelled, resumed):
        ops.wait_state(ops.app.AsyncResult(run_id), "PAUSED")
    ops.checkpoints.cancel(cancelled, reason="one item is gone")
    ops.checkpoints.resume(resumed, {"approved": True})
    with pytest.raises((RunCancelled, ChordError), match="one item is gone"):
        result.get(timeout=30)
    assert [call for call in ops.calls if call[0] == "after"] == []
