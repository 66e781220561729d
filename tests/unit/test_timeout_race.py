"""A person's resume and the pause's timeout racing in real processes on a real file store.

Each iteration pauses a fresh run and lets processes race, released together
by a barrier: people calling ``resume()`` (then delivering their own message),
timers firing the timeout (then delivering theirs), a recovery pass, and
duplicate deliveries. Every message is handled by the same code the task
wrapper runs (``Checkpoints._claim``, then ``_expire`` or complete). Whatever
the interleaving, exactly one of them may act, and what it does must match the
request the store accepted: an accepted resume always wins; otherwise the
timeout does what ``on_timeout`` says.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointNotFound,
    Checkpoints,
    PausedWorkflow,
    PauseExpired,
)
from celery_checkpoint._events import transitions
from celery_checkpoint.bootstep import recover
from celery_checkpoint.model import Owner, utcnow

ITERATIONS = 50
ROLES = ("person", "person", "timer", "timer", "sweep", "duplicate")
CTX = multiprocessing.get_context("fork")


def _checkpoints(store_dir: str) -> Checkpoints:
    app = Celery("race", broker="memory://", backend="cache+memory://", set_as_current=False)
    return Checkpoints(app, store=store_dir)


def _deliver(checkpoints: Checkpoints, run_id: str, pause_seq: int) -> tuple[Any, ...]:
    """Handle one resume message as the task wrapper does, without a body."""
    claim = checkpoints._executor._claim(run_id, pause_seq, Owner.current())
    if claim is None:
        return ("not claimed",)
    if claim.expires:
        try:
            checkpoints._executor._expire("race", claim)
        except PauseExpired:
            return ("expired",)
        raise AssertionError("_expire returned")
    checkpoints.store.complete(run_id, token=claim.token)
    request_id = None if claim.request is None else claim.request.request_id
    value = None if claim.request is None or claim.timed_out else claim.request.input
    return ("ran", request_id, claim.timed_out, value)


class _Firings(logging.Handler):
    """Counts this process's ``checkpoint.timed_out`` lines: one per timeout fired."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("checkpoint.timed_out "):
            self.count += 1


def _racer(
    store_dir: str,
    run_id: str,
    role: str,
    name: str,
    deadline: float,  # seconds after the start line
    barrier: Any,
    out: Any,
) -> None:
    firings = _Firings()
    transitions.addHandler(firings)
    transitions.setLevel(logging.DEBUG)

    def report(*fields: Any) -> None:
        out.put((*fields, firings.count))

    try:
        checkpoints = _checkpoints(store_dir)
        store = checkpoints.store
        store.load(run_id)  # open the store before the start line
        seq = 1
        barrier.wait()  # the parent writes the paused run, then everyone goes
        deadline += time.time()
        if role == "person":
            try:
                checkpoints.resume(run_id, {"by": name}, request_id=name)
            except (AlreadyResumed, PauseExpired, CheckpointNotFound) as exc:
                report(role, name, type(exc).__name__, None)
                return
            report(role, name, "accepted", _deliver(checkpoints, run_id, seq))
        elif role == "timer":
            # A timer that arrives early does nothing; this one keeps trying
            # until the deadline passes or the run has moved on.
            while True:
                if checkpoints.fire_timeout(run_id, seq):
                    report(role, name, "fired", _deliver(checkpoints, run_id, seq))
                    return
                run = store.load(run_id)
                answered = run is None or (run.resume is not None and run.resume.pause_seq == seq)
                if answered or time.time() > deadline + 2:
                    report(role, name, "not fired", None)
                    return
        elif role == "sweep":
            while time.time() < deadline:
                time.sleep(0.001)
            fired = recover(checkpoints.app).timeouts
            delivered = _deliver(checkpoints, run_id, seq) if fired else None
            report(role, name, f"fired {fired}", delivered)
        else:  # a duplicate delivery of whichever message was sent first
            while (run := store.load(run_id)) is not None and run.resume is None:
                if time.time() > deadline + 2:
                    break
            report(role, name, "duplicate", _deliver(checkpoints, run_id, seq))
    except BaseException as exc:  # report, never hang the barrier's other parties
        report(role, name, "crashed", repr(exc))


def _race(
    store_dir: Path, run_id: str, *, on_timeout: str, expires_in: float, prerecorded: bool
) -> list[tuple[Any, ...]]:
    checkpoints = _checkpoints(str(store_dir))
    barrier = CTX.Barrier(len(ROLES) + 1)
    out = CTX.Queue()
    procs = [
        CTX.Process(
            target=_racer,
            args=(str(store_dir), run_id, role, f"{role}-{i}", expires_in, barrier, out),
        )
        for i, role in enumerate(ROLES)
    ]
    for proc in procs:
        proc.start()
    store = checkpoints.store
    run = PausedWorkflow(
        run_id=run_id,
        task_name="race.approve",
        step="await_approval",
        expires_at=None if prerecorded else utcnow() + timedelta(seconds=expires_in),
        on_timeout=on_timeout,  # type: ignore[arg-type]
    )
    store.save(run)
    if prerecorded:
        # A person's resume accepted before the deadline; the deadline then
        # passes while its message is still queued.
        checkpoints.resume(run_id, {"by": "early"}, request_id="early")
        accepted = store.load(run_id)
        assert accepted is not None and accepted.resume is not None
        store.save(accepted.model_copy(update={"expires_at": utcnow()}))
    barrier.wait(timeout=60)
    reports = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    crashed = [r for r in reports if r[2] == "crashed"]
    assert not crashed, crashed
    return reports


def _check(
    checkpoints: Checkpoints, run_id: str, reports: list[tuple[Any, ...]], **how: Any
) -> str:
    """Assert one outcome consistent with the accepted request; return which."""
    winners = [r for r in reports if r[3] is not None and r[3][0] != "not claimed"]
    assert len(winners) == 1, reports
    outcome = winners[0][3]
    accepted = [r[1] for r in reports if r[0] == "person" and r[2] == "accepted"]
    if how.get("prerecorded"):
        accepted.append("early")
    firings = sum(r[4] for r in reports)  # timeouts fired, counted from the log lines
    assert len(accepted) <= 1, reports
    store = checkpoints.store
    assert store.load(run_id) is None  # the run ended one way or the other
    if accepted:
        # An accepted resume always wins; the timeout then never fires.
        assert outcome == ("ran", accepted[0], False, {"by": accepted[0]}), reports
        assert firings == 0, reports
        ended = store.ended(run_id)  # completed, not expired
        assert ended is not None and ended.status == "completed", ended
        return "resumed"
    assert firings == 1, reports  # at most once, and here exactly once
    refused = {r[2] for r in reports if r[0] == "person"}
    # Too late: the timeout's request won, or its run already finished.
    assert refused <= {"AlreadyResumed", "PauseExpired", "CheckpointNotFound"}, reports
    if how["on_timeout"] == "expire":
        assert outcome == ("expired",), reports
        ended = store.ended(run_id)
        assert ended is not None and ended.status == "expired"
        with pytest.raises(PauseExpired):
            checkpoints.resume(run_id, {"by": "late"})
        return "expired"
    assert outcome == ("ran", "timeout-1", True, None), reports
    return "timed out"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("on_timeout", "prerecorded"),
    [
        pytest.param("resume", False, id="on_timeout=resume"),
        pytest.param("expire", False, id="on_timeout=expire"),
        pytest.param("expire", True, id="resume-accepted-before-the-deadline"),
    ],
)
def test_resume_and_timeout_never_both_run(
    tmp_path: Path, on_timeout: str, prerecorded: bool
) -> None:
    rng = random.Random(20261128)
    checkpoints = _checkpoints(str(tmp_path / "store"))
    outcomes: dict[str, int] = {}
    for i in range(ITERATIONS):
        run_id = f"race-{i}"
        # The deadline lands inside the race: some people come before it, some after.
        expires_in = rng.uniform(0.0, 0.02)
        reports = _race(
            tmp_path / "store",
            run_id,
            on_timeout=on_timeout,
            expires_in=expires_in,
            prerecorded=prerecorded,
        )
        outcome = _check(
            checkpoints, run_id, reports, on_timeout=on_timeout, prerecorded=prerecorded
        )
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) == ITERATIONS
    if prerecorded:
        assert outcomes == {"resumed": ITERATIONS}
