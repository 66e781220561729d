"""Each transition sends its signal with the right arguments and writes one log line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from celery_checkpoint import PausedWorkflow, PauseExpired
from celery_checkpoint import signals as checkpoint_signals
from celery_checkpoint._events import transitions
from celery_checkpoint.bootstep import recover
from celery_checkpoint.model import utcnow
from tests.unit.ops_harness import Ops, running

SIGNALS = {
    name: getattr(checkpoint_signals, name)
    for name in (
        "checkpoint_paused",
        "checkpoint_resumed",
        "checkpoint_completed",
        "checkpoint_expired",
        "checkpoint_cancelled",
        "checkpoint_recovered",
    )
}


@dataclass
class Seen:
    sent: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def of(self, name: str, run_id: str) -> list[tuple[Any, dict[str, Any]]]:
        return [(s, kw) for n, s, kw in self.sent if n == name and kw["run"].run_id == run_id]

    def log(self, event: str, run_id: str) -> list[str]:
        return [
            line for line in self.lines if line.startswith(f"checkpoint.{event} run_id={run_id} ")
        ]


class _Lines(logging.Handler):
    def __init__(self, seen: Seen) -> None:
        super().__init__(logging.DEBUG)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    store = tmp_path_factory.mktemp("signals") / "store"
    with running(store, checkpoint_recovery_interval=3600) as ops:
        yield ops


@pytest.fixture
def seen() -> Iterator[Seen]:
    seen = Seen()
    receivers = {}
    for name, signal in SIGNALS.items():

        def receiver(sender: Any = None, _name: str = name, **kwargs: Any) -> None:
            kwargs.pop("signal", None)
            seen.sent.append((_name, sender, kwargs))

        signal.connect(receiver, weak=False)
        receivers[name] = receiver
    handler = _Lines(seen)
    level = transitions.level
    transitions.addHandler(handler)
    transitions.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        transitions.removeHandler(handler)
        transitions.setLevel(level)
        for name, signal in SIGNALS.items():
            signal.disconnect(receivers[name])


def test_pause_resume_complete_send_their_signals_and_log_lines(ops: Ops, seen: Seen) -> None:
    approve = ops.tasks["approve"]
    result = approve.apply_async((7,), {"timeout": 3600})
    ops.wait_state(result, "PAUSED")
    [(sender, kw)] = seen.of("checkpoint_paused", result.id)
    assert sender is ops.app.tasks["ops.approve"]
    assert isinstance(kw["run"], PausedWorkflow)
    assert kw["step"] == "await_approval" == kw["run"].step
    assert kw["reason"] == "order 7"
    assert kw["expires_at"] == kw["run"].expires_at is not None
    [line] = seen.log("paused", result.id)
    assert line.startswith(
        f"checkpoint.paused run_id={result.id} task=ops.approve step=await_approval pause_seq=1 "
    )
    assert 'reason="order 7"' in line and "on_timeout=expire" in line

    ops.checkpoints.resume(result.id, {"approved": True}, request_id="req-7")
    assert result.get(timeout=30) == "approved"
    [(sender, kw)] = seen.of("checkpoint_resumed", result.id)
    assert sender is ops.app.tasks["ops.approve"]
    assert kw["step"] == "await_approval" and kw["request_id"] == "req-7"
    assert kw["timed_out"] is False and kw["run"].lease is not None
    [(sender, kw)] = seen.of("checkpoint_completed", result.id)
    assert sender is ops.app.tasks["ops.approve"]
    assert kw["result"] == "approved" and kw["step"] == "await_approval"
    assert seen.log("resume_requested", result.id)
    [resumed] = seen.log("resumed", result.id)
    assert "request_id=req-7" in resumed and "timed_out=false" in resumed and "token=1" in resumed
    assert len(seen.log("completed", result.id)) == 1
    assert seen.of("checkpoint_expired", result.id) == []


def test_expiry_sends_checkpoint_expired(ops: Ops, seen: Seen) -> None:
    result = ops.tasks["approve"].apply_async((8,), {"timeout": 0.2})
    ops.wait_state(result, "FAILURE")
    assert isinstance(result.result, PauseExpired)
    [(sender, kw)] = seen.of("checkpoint_expired", result.id)
    assert sender is ops.app.tasks["ops.approve"]
    assert kw["step"] == "await_approval" and kw["run"].status == "expired"
    assert seen.of("checkpoint_resumed", result.id) == []  # expiring is not resuming
    assert seen.of("checkpoint_completed", result.id) == []
    assert len(seen.log("timed_out", result.id)) == 1
    assert len(seen.log("expired", result.id)) == 1


def test_timed_out_resume_sends_resumed_with_timed_out(ops: Ops, seen: Seen) -> None:
    result = ops.tasks["approve"].apply_async((9,), {"timeout": 0.2, "on_timeout": "resume"})
    assert result.get(timeout=30) == "timed out"
    [(_, kw)] = seen.of("checkpoint_resumed", result.id)
    assert kw["timed_out"] is True and kw["request_id"] == "timeout-1"
    assert len(seen.of("checkpoint_completed", result.id)) == 1


def test_cancel_sends_checkpoint_cancelled_from_the_app(ops: Ops, seen: Seen) -> None:
    result = ops.tasks["approve"].apply_async((10,))
    ops.wait_state(result, "PAUSED")
    ops.checkpoints.cancel(result.id, reason="changed my mind")
    [(sender, kw)] = seen.of("checkpoint_cancelled", result.id)
    assert sender is ops.app
    assert kw["reason"] == "changed my mind" and kw["in_flight"] is False
    assert kw["step"] == "await_approval" and kw["run"].status == "cancelled"
    [line] = seen.log("cancelled", result.id)
    assert 'reason="changed my mind"' in line and "in_flight=false" in line
    ops.checkpoints.cancel(result.id)  # a second cancel changes nothing, announces nothing
    assert len(seen.of("checkpoint_cancelled", result.id)) == 1


def test_recovery_sends_checkpoint_recovered_from_the_app(ops: Ops, seen: Seen) -> None:
    result = ops.tasks["approve"].apply_async((11,))
    ops.wait_state(result, "PAUSED")
    store = ops.checkpoints.store
    # A worker claimed it and vanished: its lease runs out with nobody renewing it.
    assert store.claim(result.id, lease_seconds=0.01) is not None
    run = store.lease(result.id)
    assert run is not None
    ops.wait(lambda: run.expired(utcnow()), "the lease to run out")
    assert recover(ops.app).rearmed >= 1
    [(sender, kw)] = seen.of("checkpoint_recovered", result.id)
    assert sender is ops.app
    assert kw["step"] == "await_approval" and kw["run"].recoveries == 1
    [line] = seen.log("recovered", result.id)
    assert line.endswith("recoveries=1")


def test_a_failing_receiver_does_not_stop_the_transition(ops: Ops, seen: Seen) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    checkpoint_signals.checkpoint_paused.connect(broken, weak=False)
    try:
        result = ops.tasks["approve"].apply_async((12,))
        ops.wait_state(result, "PAUSED")
    finally:
        checkpoint_signals.checkpoint_paused.disconnect(broken)
    ops.checkpoints.resume(result.id, {"approved": False})
    assert result.get(timeout=30) == "refused"


def test_log_values_are_quoted_when_they_need_it() -> None:
    from celery_checkpoint._events import kv

    when = utcnow() - timedelta(days=1)
    line = kv(run_id="r-1", reason='say "hi"', empty="", gone=None, flag=True, at=when)
    assert line == f'run_id=r-1 reason="say \\"hi\\"" empty="" flag=true at={when.isoformat()}'
