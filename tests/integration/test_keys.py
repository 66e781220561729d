"""Pauses named by a business key, answers that arrive early, and results delivered
after a worker died between the store's completion and Celery's SUCCESS.

Through real ``celery worker`` processes on the Redis broker, on each store.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from celery import Celery, chain

from celery_checkpoint import AlreadyResumed, CheckpointExists, Checkpoints, ResumeRejected
from tests.conftest import require_server
from tests.integration.conftest import REDIS_URL, Workers
from tests.integration.helpers import get, wait_for_state, wait_until
from tests.integration.proj import Settings, make_app, read_marks

PAID = {"status": "succeeded", "amount": 1200}


@pytest.fixture
def broker() -> str:
    """These tests are about the store and the answer, not the broker: Redis only."""
    require_server("Redis", "127.0.0.1", 6379)
    return REDIS_URL


def _paused(app: Celery, checkpoints: Checkpoints, order: str, intent: str) -> str:
    result = app.tasks["proj.pay"].delay(order, intent)
    # exists, not load: a pause that takes an early answer may end before we look
    wait_until(lambda: checkpoints.store.exists(result.id), f"{order} to pause")
    return str(result.id)


def test_a_webhook_answers_by_key_once_however_often_it_is_delivered(
    app: Celery, checkpoints: Checkpoints, settings: Settings, workers: Workers
) -> None:
    worker = workers.start()
    run_id = _paused(app, checkpoints, "o1", "pi_1")
    assert checkpoints.store.find_key("stripe:pi_1") == run_id

    first = checkpoints.resume_key("stripe:pi_1", PAID, request_id="evt_1", via="webhook")
    again = checkpoints.resume_key("stripe:pi_1", PAID, request_id="evt_1", via="webhook")
    assert first is not None and again is not None and first.id == again.id == run_id
    assert get(app.AsyncResult(run_id), worker) == {"order": "o1", "payment": PAID}
    assert len(read_marks(settings.markers, "body", run_id)) == 1

    # Another event for the key of a completed run: no live pause holds the key
    # any more, so it is kept for the next pause naming it (a new correlation).
    assert checkpoints.store.find_key("stripe:pi_1") is None
    with pytest.raises(ResumeRejected):
        checkpoints.resume_key("stripe:pi_1", {1, 2})  # without a pause: JSON only
    assert checkpoints.resume_key("stripe:pi_1", PAID, request_id="evt_2") is None
    reused = _paused(app, checkpoints, "o1-again", "pi_1")
    assert reused != run_id
    assert get(app.AsyncResult(reused), worker) == {"order": "o1-again", "payment": PAID}


def test_the_first_of_two_events_for_a_key_wins_and_the_other_is_refused(
    app: Celery, checkpoints: Checkpoints, workers: Workers
) -> None:
    worker = workers.start()
    run_id = _paused(app, checkpoints, "o2", "pi_2")
    checkpoints.resume_key("stripe:pi_2", PAID, request_id="evt_a")
    with pytest.raises(AlreadyResumed):
        checkpoints.resume_key(
            "stripe:pi_2", {"status": "failed", "amount": 1200}, request_id="evt_b"
        )
    assert get(app.AsyncResult(run_id), worker)["payment"] == PAID

    # Early: the same, before any pause names the key.
    assert checkpoints.resume_key("stripe:pi_3", PAID, request_id="evt_c") is None
    with pytest.raises(AlreadyResumed):
        checkpoints.resume_key("stripe:pi_3", {"status": "failed", "amount": 5}, request_id="evt_d")
    early = _paused(app, checkpoints, "o3", "pi_3")
    assert get(app.AsyncResult(early), worker) == {"order": "o3", "payment": PAID}


def test_a_second_live_pause_with_the_same_key_fails_and_an_early_answer_that_does_not_match_waits(
    app: Celery, checkpoints: Checkpoints, workers: Workers
) -> None:
    worker = workers.start()
    holder = _paused(app, checkpoints, "o4", "pi_4")
    second = app.tasks["proj.pay"].delay("o4-copy", "pi_4")
    wait_for_state(second, "FAILURE", worker)
    # The task fails with the error itself, rebuilt by the result backend.
    assert isinstance(second.result, CheckpointExists), repr(second.result)
    assert "held by run" in str(second.result)
    assert checkpoints.store.find_key("stripe:pi_4") == holder

    # An early answer is checked against expects when the pause takes it: a bad
    # one leaves the run paused, refused, for a valid answer.
    assert checkpoints.resume_key("stripe:pi_5", {"status": "maybe"}, request_id="evt_x") is None
    waiting = _paused(app, checkpoints, "o5", "pi_5")

    def refused() -> bool:
        run = checkpoints.store.load(waiting)
        return run is not None and run.resume is not None and run.resume.status == "failed"

    wait_until(refused, "the bad early answer to be refused", 60, worker)
    checkpoints.resume(waiting, PAID, request_id="evt_y")
    assert get(app.AsyncResult(waiting), worker)["payment"] == PAID


def test_early_answers_expire(
    app: Celery, checkpoints: Checkpoints, settings: Settings, workers: Workers
) -> None:
    app.conf.checkpoint_early_answer_ttl = 0.5
    checkpoints.reset()
    assert checkpoints.resume_key("stripe:pi_6", PAID, request_id="evt_old") is None
    time.sleep(1.0)
    assert checkpoints.store.prune_ended(3600) == 0  # early answers are not counted
    worker = workers.start()
    run_id = _paused(app, checkpoints, "o6", "pi_6")
    time.sleep(1.0)
    run = checkpoints.store.load(run_id)
    assert run is not None and run.resume is None, "an expired answer is never taken"
    assert not read_marks(settings.markers, "body", run_id)
    checkpoints.resume_key("stripe:pi_6", PAID, request_id="evt_new")
    assert get(app.AsyncResult(run_id), worker)["payment"] == PAID


def _answer_keys(settings: Settings, intents: list[str]) -> None:
    """In a process of its own: answer each key as soon as possible, once."""
    app = make_app(settings)
    checkpoints = Checkpoints.for_app(app)
    for intent in intents:
        checkpoints.resume_key(f"stripe:{intent}", PAID, request_id=f"evt-{intent}")
    checkpoints.store.close()


def test_an_answer_racing_its_pause_from_another_process_is_taken_exactly_once(
    app: Celery, checkpoints: Checkpoints, settings: Settings, workers: Workers
) -> None:
    worker = workers.start(concurrency=4)
    rounds = 200
    intents = [f"race{i}" for i in range(rounds)]
    answering = multiprocessing.get_context("spawn").Process(
        target=_answer_keys, args=(settings, intents)
    )
    answering.start()
    results = [app.tasks["proj.pay"].delay(f"o-{i}", intent) for i, intent in enumerate(intents)]
    answering.join(120)
    assert answering.exitcode == 0
    for result in results:
        assert get(result, worker, timeout=120)["payment"] == PAID
    for result in results:
        assert len(read_marks(settings.markers, "body", result.id)) == 1


def test_a_result_kept_with_the_completion_reaches_get_and_the_chain_after_the_worker_died(
    app: Celery, checkpoints: Checkpoints, settings: Settings, workers: Workers
) -> None:
    first = workers.start(name="doomed")
    flow = chain(app.tasks["proj.approve"].s("o7"), app.tasks["proj.tsum"].si([1, 2]))
    result = flow.apply_async()
    run_id = str(result.parent.id)
    wait_until(lambda: checkpoints.store.load(run_id) is not None, "o7 to pause", 60, first)
    Path(settings.markers, f"kill-after-complete-{run_id}").touch()
    checkpoints.resume(run_id, {"approved": True, "approver": "ana"})
    wait_until(lambda: not first.alive, "the worker to die after completing", 60)
    ended = checkpoints.store.ended(run_id)
    assert ended is not None and ended.status == "completed" and ended.result is not None
    assert app.AsyncResult(run_id).state != "SUCCESS"

    survivor = workers.start(name="survivor", resend_after=1.0)
    assert get(app.AsyncResult(run_id), survivor) == "o7 approved by ana"
    assert get(result, survivor) == 3
    # Delivered once: the index is empty, a later pass delivers nothing again.
    wait_until(lambda: not checkpoints.store.due_deliveries(0), "the delivery to be recorded")
