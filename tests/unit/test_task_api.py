"""The task-side API through an embedded worker (memory broker, no server)."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult
from pydantic import BaseModel

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointNotFound,
    Checkpoints,
    CheckpointStore,
    ImproperlyConfigured,
    InvalidRunId,
    Pause,
    ResumeRejected,
    RunCancelled,
)
from celery_checkpoint.config import CheckpointConfig


class Approval(BaseModel):
    approved: bool


@dataclass
class Harness:
    app: Celery
    checkpoints: Checkpoints
    calls: list[tuple[str, Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    tasks: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_copies: list[int] = field(default_factory=list)
    copy_gates: list[threading.Event] = field(
        default_factory=lambda: [threading.Event(), threading.Event()]
    )

    def wait_state(self, result: AsyncResult, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while result.state != state:
            assert time.monotonic() < deadline, f"state {result.state}, wanted {state}"
            time.sleep(0.05)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    app = Celery("api", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    checkpoints = Checkpoints(app, store=str(tmp_path / "store"))
    h = Harness(app=app, checkpoints=checkpoints)

    @checkpoints.task(bind=True, name="api.approve", shared=False)
    def approve(self: Any, order_id: int) -> str:
        run = checkpoints.current()
        h.calls.append(("approve", run.resumed))
        if not run.resumed:
            raise Pause("await_approval", state={"order": order_id}, expects=Approval)
        assert isinstance(run.state, dict)
        return f"{run.state['order']}:{'yes' if run.resume_input.approved else 'no'}"

    @checkpoints.task(name="api.twice", shared=False)
    def twice() -> list[Any]:
        run = checkpoints.current()
        h.calls.append(("twice", run.pause_seq))
        if run.pause_seq == 0:
            raise Pause("first")
        if run.pause_seq == 1:
            raise Pause("second", state={"first": run.resume_input})
        assert isinstance(run.state, dict)
        return [run.state["first"], run.resume_input]

    @checkpoints.task(name="api.flaky", shared=False)
    def flaky() -> str:
        run = checkpoints.current()
        h.calls.append(("flaky", run.resume_input))
        if not run.resumed:
            raise Pause("wait")
        if run.resume_input == "boom":
            raise ValueError("boom")
        return "ok"

    @checkpoints.task(name="api.slow", shared=False)
    def slow() -> str:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("wait")
        h.calls.append(("slow-start", run.token))
        h.gate.wait(20)
        h.calls.append(("slow-end", run.token))
        return "finished"

    @checkpoints.task(name="api.doubled", shared=False)
    def doubled() -> Any:
        run = checkpoints.current()
        if run.resumed:
            assert isinstance(run.state, dict)
            return [run.state["copy"], run.resume_input]
        with h.lock:
            copy = len(h.first_copies)
            h.first_copies.append(copy)
        h.copy_gates[copy].wait(20)
        raise Pause("wait", state={"copy": copy})

    h.tasks.update(approve=approve, twice=twice, flaky=flaky, slow=slow, doubled=doubled)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        yield h
    h.gate.set()
    for gate in h.copy_gates:
        gate.set()


def test_task_keeps_its_name_and_call_signature(harness: Harness) -> None:
    approve = harness.tasks["approve"]
    assert approve.name == "api.approve"
    assert list(inspect.signature(approve.run).parameters) == ["order_id"]  # bound: no self
    with pytest.raises(TypeError):
        approve.delay(1, 2, 3)  # Celery still checks call arguments at send time


def test_pause_sets_paused_state_and_resume_returns_the_value(harness: Harness) -> None:
    result = harness.tasks["approve"].delay(7)
    harness.wait_state(result, "PAUSED")
    assert result.info["step"] == "await_approval"
    assert harness.checkpoints.store.load(result.id) is not None
    harness.checkpoints.resume(result.id, {"approved": True})
    assert result.get(timeout=20) == "7:yes"
    assert harness.checkpoints.store.load(result.id) is None  # completed: nothing left


def test_bad_input_is_rejected_before_anything_changes(harness: Harness) -> None:
    result = harness.tasks["approve"].delay(8)
    harness.wait_state(result, "PAUSED")
    with pytest.raises(ResumeRejected) as info:
        harness.checkpoints.resume(result.id, {"approved": "perhaps"})
    assert info.value.errors and info.value.errors[0]["loc"] == ("approved",)
    stored = harness.checkpoints.store.load(result.id)
    assert stored is not None and stored.resume is None
    assert result.state == "PAUSED"
    harness.checkpoints.resume(result.id, {"approved": False})
    assert result.get(timeout=20) == "8:no"


def test_same_request_id_twice_is_one_resume(harness: Harness) -> None:
    result = harness.tasks["approve"].delay(9)
    harness.wait_state(result, "PAUSED")
    harness.checkpoints.resume(result.id, {"approved": True}, request_id="req-1")
    harness.checkpoints.resume(result.id, {"approved": True}, request_id="req-1")
    assert result.get(timeout=20) == "9:yes"
    time.sleep(0.5)  # give a duplicate message the chance to run the body again
    assert harness.calls.count(("approve", True)) == 1


def test_a_second_request_while_one_is_pending_is_refused(harness: Harness) -> None:
    harness.gate.clear()
    result = harness.tasks["slow"].delay()
    harness.wait_state(result, "PAUSED")
    harness.checkpoints.resume(result.id, None, request_id="first")
    with pytest.raises(AlreadyResumed):
        harness.checkpoints.resume(result.id, None, request_id="second")
    harness.gate.set()
    assert result.get(timeout=20) == "finished"


def test_unknown_and_hostile_run_ids_raise_specific_errors(harness: Harness) -> None:
    with pytest.raises(CheckpointNotFound):
        harness.checkpoints.resume("no-such-run", None)
    with pytest.raises(InvalidRunId):
        harness.checkpoints.resume("../etc/passwd", None)


def test_pausing_twice_in_one_run_resumes_twice(harness: Harness) -> None:
    result = harness.tasks["twice"].delay()
    harness.wait_state(result, "PAUSED")
    harness.checkpoints.resume(result.id, "a")
    deadline = time.monotonic() + 20
    while result.state != "PAUSED" or result.info["step"] != "second":
        assert time.monotonic() < deadline, (result.state, result.info)
        time.sleep(0.05)
    run = harness.checkpoints.store.load(result.id)
    assert run is not None and run.pause_seq == 2
    with pytest.raises(ResumeRejected):
        harness.checkpoints.resume(result.id, "stale", pause_seq=1)
    harness.checkpoints.resume(result.id, "b", pause_seq=2)
    assert result.get(timeout=20) == ["a", "b"]


def test_failed_resumed_body_goes_back_to_paused_and_can_be_resumed_again(
    harness: Harness,
) -> None:
    result = harness.tasks["flaky"].delay()
    harness.wait_state(result, "PAUSED")
    harness.checkpoints.resume(result.id, "boom")
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=20)
    stored = harness.checkpoints.store.load(result.id)
    assert stored is not None and stored.resume is not None
    assert stored.resume.status == "failed" and "boom" in (stored.resume.error or "")
    assert harness.checkpoints.store.lease(result.id) is None
    # resume() returns a fresh AsyncResult: the old one cached the FAILURE.
    again = harness.checkpoints.resume(result.id, "fine")
    assert again.get(timeout=20) == "ok"


def test_redelivered_first_execution_does_not_rerun_the_body(harness: Harness) -> None:
    result = harness.tasks["approve"].delay(10)
    harness.wait_state(result, "PAUSED")
    harness.tasks["approve"].apply_async((10,), task_id=result.id)  # a redelivery
    time.sleep(1.0)
    assert harness.calls.count(("approve", False)) == 1
    assert result.state == "PAUSED"


def test_a_second_copy_of_the_first_message_never_replaces_the_pause_or_its_resume(
    harness: Harness,
) -> None:
    # Two copies of one first message run at once (a broker redelivered it while
    # the first copy still ran); both pause. The first pause is resumed before the
    # second copy pauses: the second pause must not wipe that accepted resume.
    first = harness.tasks["doubled"].apply_async(task_id="doubled-run")
    harness.tasks["doubled"].apply_async(task_id="doubled-run")
    deadline = time.monotonic() + 20
    while len(harness.first_copies) < 2:
        assert time.monotonic() < deadline, "both copies should be running"
        time.sleep(0.02)
    harness.copy_gates[0].set()
    harness.wait_state(first, "PAUSED")
    harness.checkpoints.resume("doubled-run", "go")  # waits for a free worker slot
    harness.copy_gates[1].set()  # the second copy pauses now: refused, dropped
    assert first.get(timeout=20) == [0, "go"]
    assert harness.checkpoints.store.load("doubled-run") is None


def test_cancel_fences_an_in_flight_body_whose_late_result_is_dropped(harness: Harness) -> None:
    harness.gate.clear()
    result = harness.tasks["slow"].delay()
    harness.wait_state(result, "PAUSED")
    harness.checkpoints.resume(result.id, None)
    deadline = time.monotonic() + 20
    while not any(name == "slow-start" for name, _ in harness.calls):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    harness.checkpoints.cancel(result.id, reason="customer left")
    harness.gate.set()
    deadline = time.monotonic() + 20
    while not any(name == "slow-end" for name, _ in harness.calls):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert result.state == "REVOKED"  # the late SUCCESS never overwrote the cancel
    with pytest.raises(RunCancelled):
        harness.checkpoints.resume(result.id, None)


def test_bad_setting_is_a_clear_error_naming_the_key() -> None:
    app = Celery("conf", set_as_current=False)
    app.conf.checkpoint_lease_seconds = "soon"
    with pytest.raises(ImproperlyConfigured, match="checkpoint_lease_seconds"):
        CheckpointConfig.from_app(app)
    app.conf.checkpoint_lease_seconds = 10
    app.conf.checkpoint_heartbeat_interval = 30
    with pytest.raises(ImproperlyConfigured, match="shorter than"):
        CheckpointConfig.from_app(app)


def test_unknown_store_scheme_names_the_known_ones() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"file://.*redis://"):
        CheckpointStore.open("mongodb://localhost/x")


def test_expects_must_be_importable() -> None:
    class Local(BaseModel):
        x: int

    with pytest.raises(ImproperlyConfigured, match="module level"):
        Pause("step", expects=Local)


def test_pause_state_must_be_json_and_timeout_in_range() -> None:
    with pytest.raises(TypeError, match="state must be JSON"):
        Pause("step", state={"when": object()})
    with pytest.raises(ValueError, match="finite"):
        Pause("step", timeout=float("nan"))
    with pytest.raises(ValueError, match="at most"):
        Pause("step", timeout=10**12)


def test_a_url_without_slashes_is_refused_not_made_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="without '//'"):
        CheckpointStore.open("file:/abs/dir")


def test_the_worker_option_overrides_store_given_in_code(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from celery_checkpoint.bootstep import CheckpointRecovery

    app = Celery("override", set_as_current=False)
    checkpoints = Checkpoints(app, store=str(tmp_path / "in-code"))
    opened_first = checkpoints.store
    CheckpointRecovery(SimpleNamespace(app=app), checkpoint_store=str(tmp_path / "from-cli"))
    assert Checkpoints.for_app(app) is checkpoints
    assert checkpoints.config.store == str(tmp_path / "from-cli")
    assert checkpoints.store is not opened_first
    assert getattr(checkpoints.store, "root", None) == tmp_path / "from-cli"
