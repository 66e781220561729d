"""Pause and resume through real ``celery worker`` processes on real brokers.

Every test runs on the Redis broker and on RabbitMQ (results in Redis), with
the file store and the Redis store. Body executions are counted from the
marker files the task bodies write (see ``tests/integration/proj.py``).
"""

from __future__ import annotations

import multiprocessing
import queue
import re
import socket
import subprocess
import threading
from datetime import timedelta
from typing import Any

import pytest
from celery import chain, chord, group
from celery.result import AsyncResult

from celery_checkpoint import (
    PAUSED,
    AlreadyResumed,
    Checkpoints,
    Owner,
    ResumeRejected,
)
from celery_checkpoint.model import utcnow
from tests.integration.conftest import Workers
from tests.integration.helpers import get, wait_for_state, wait_until
from tests.integration.proj import Settings, gate_path, read_marks, resume_from_child

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(120)
def test_pause_shows_paused_and_frees_the_only_worker_slot(
    app: Any, checkpoints: Checkpoints, workers: Workers
) -> None:
    worker = workers.start(concurrency=1)
    paused = app.tasks["proj.wait_for"].delay(1)
    paused = wait_for_state(paused, PAUSED, worker, step="await_number", pause_seq=1)

    # One pool process: a plain task can only run if the paused one gave it back.
    plain = app.tasks["proj.add"].delay(2, 3)
    assert get(plain, worker) == 5
    assert AsyncResult(paused.id, app=app).state == PAUSED
    stored = checkpoints.store.load(paused.id)
    assert stored is not None and stored.step == "await_number"
    assert checkpoints.store.lease(paused.id) is None


@pytest.mark.timeout(120)
def test_resume_gives_success_with_the_resumed_value(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.wait_for"].delay(40)
    wait_for_state(result, PAUSED, worker)

    checkpoints.resume(result.id, 2)

    assert get(result, worker) == 42
    assert AsyncResult(result.id, app=app).state == "SUCCESS"
    assert checkpoints.store.load(result.id) is None
    assert len(read_marks(settings.markers, "body", result.id)) == 1


@pytest.mark.timeout(120)
def test_chain_continues_with_the_value_of_the_resumed_link(
    app: Any, checkpoints: Checkpoints, workers: Workers
) -> None:
    worker = workers.start()
    add, wait_for = app.tasks["proj.add"], app.tasks["proj.wait_for"]
    last = chain(add.s(1, 2), wait_for.s(), add.s(10)).apply_async()
    middle = last.parent
    wait_for_state(middle, PAUSED, worker)
    assert AsyncResult(last.id, app=app).state == "PENDING"  # the rest of the chain waits

    checkpoints.resume(middle.id, 4)

    # a = 1 + 2 = 3; b = a + 4 = 7 (resumed); c = b + 10 = 17.
    assert get(AsyncResult(last.id, app=app), worker) == 17
    assert AsyncResult(middle.id, app=app).get(timeout=10) == 7


@pytest.mark.timeout(120)
def test_chord_completes_after_every_paused_header_task_is_resumed(
    app: Any, checkpoints: Checkpoints, workers: Workers
) -> None:
    worker = workers.start()
    wait_for, tsum = app.tasks["proj.wait_for"], app.tasks["proj.tsum"]
    body = chord(group(wait_for.s(x) for x in (1, 2, 3)), tsum.s()).apply_async()
    header = body.parent
    assert header is not None
    ids = [child.id for child in header.results]
    for task_id in ids:
        wait_for_state(AsyncResult(task_id, app=app), PAUSED, worker)

    for n, task_id in enumerate(ids[:-1]):
        checkpoints.resume(task_id, 100 * (n + 1))
    for task_id in ids[:-1]:
        get(AsyncResult(task_id, app=app), worker)
    assert AsyncResult(body.id, app=app).state == "PENDING"  # one header task still paused

    checkpoints.resume(ids[-1], 300)

    # (1 + 100) + (2 + 200) + (3 + 300)
    assert get(AsyncResult(body.id, app=app), worker) == 606


def _resume_in_thread(
    checkpoints: Checkpoints,
    run_id: str,
    value: int,
    go: threading.Barrier,
    out: queue.Queue[tuple[str, str, Any]],
) -> None:
    request_id = f"thread-{value}"
    go.wait()
    try:
        checkpoints.resume(run_id, value, request_id=request_id)
    except AlreadyResumed:
        out.put(("already", request_id, None))
    except Exception as exc:
        out.put(("error", request_id, repr(exc)))
    else:
        out.put(("accepted", request_id, value))


@pytest.mark.timeout(180)
def test_twenty_concurrent_resumes_accept_one_and_run_the_body_once(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.gated"].delay(0)
    wait_for_state(result, PAUSED, worker)

    # 10 resumes from child processes and 10 from threads, released together.
    context = multiprocessing.get_context("spawn")
    go_processes = context.Event()
    from_processes: Any = context.Queue()
    children = [
        context.Process(
            target=resume_from_child,
            args=(
                settings.to_env(),
                result.id,
                100 + n,
                f"process-{n}",
                go_processes,
                from_processes,
            ),
        )
        for n in range(10)
    ]
    for child in children:
        child.start()
    for _ in children:
        kind, request_id, detail = from_processes.get(timeout=120)
        assert kind == "ready", (request_id, detail)
    go_threads = threading.Barrier(11)
    from_threads: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    threads = [
        threading.Thread(
            target=_resume_in_thread, args=(checkpoints, result.id, n, go_threads, from_threads)
        )
        for n in range(10)
    ]
    for thread in threads:
        thread.start()
    go_processes.set()
    go_threads.wait()
    outcomes = [from_processes.get(timeout=120) for _ in children]
    for thread in threads:
        thread.join()
    for child in children:
        child.join()
    outcomes += [from_threads.get_nowait() for _ in threads]

    assert [o for o in outcomes if o[0] == "error"] == []
    accepted = [o for o in outcomes if o[0] == "accepted"]
    assert len(accepted) == 1, outcomes
    assert sum(1 for o in outcomes if o[0] == "already") == 19
    # The body is held at its gate until every resume call has returned.
    gate_path(settings.markers, result.id).touch()
    assert get(result, worker) == accepted[0][2]
    assert len(read_marks(settings.markers, "body", result.id)) == 1


@pytest.mark.timeout(120)
def test_bad_input_is_rejected_and_the_run_stays_paused_until_good_input(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.approve"].delay("order-7")
    wait_for_state(result, PAUSED, worker)

    with pytest.raises(ResumeRejected) as rejected:
        checkpoints.resume(result.id, {"approved": "maybe"})

    assert {error["loc"] for error in rejected.value.errors} == {("approved",), ("approver",)}
    stored = checkpoints.store.load(result.id)
    assert stored is not None and stored.resume is None
    assert AsyncResult(result.id, app=app).state == PAUSED

    checkpoints.resume(result.id, {"approved": True, "approver": "ana"})

    assert get(result, worker) == "order-7 approved by ana"
    assert len(read_marks(settings.markers, "body", result.id)) == 1


@pytest.mark.timeout(120)
def test_a_run_that_pauses_twice_is_resumed_twice(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.two_pauses"].delay(5)
    wait_for_state(result, PAUSED, worker, step="first", pause_seq=1)

    checkpoints.resume(result.id, "one")
    wait_for_state(result, PAUSED, worker, step="second", pause_seq=2)
    stored = checkpoints.store.load(result.id)
    assert stored is not None and (stored.step, stored.pause_seq) == ("second", 2)
    with pytest.raises(ResumeRejected):
        checkpoints.resume(result.id, "late", pause_seq=1)  # aimed at the first pause

    checkpoints.resume(result.id, "two", pause_seq=2)

    assert get(result, worker) == {"x": 5, "first": "one", "second": "two"}
    assert len(read_marks(settings.markers, "body-first", result.id)) == 1
    assert len(read_marks(settings.markers, "body-second", result.id)) == 1


@pytest.mark.timeout(120)
def test_a_body_failing_after_resume_leaves_the_run_paused_for_a_second_resume(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.fail_on_request"].delay(4)
    wait_for_state(result, PAUSED, worker)

    checkpoints.resume(result.id, {"fail": True})

    # Released to PAUSED in the store, then Celery's normal failure handling.
    failed = wait_for_state(result, "FAILURE", worker)
    assert "failed on request" in str(failed.result)
    stored = checkpoints.store.load(result.id)
    assert stored is not None and stored.resume is not None
    assert stored.resume.status == "failed"
    assert "failed on request" in (stored.resume.error or "")
    assert checkpoints.store.lease(result.id) is None

    checkpoints.resume(result.id, {"fail": False})

    succeeded = wait_for_state(result, "SUCCESS", worker)
    assert succeeded.get(timeout=10) == 40
    assert len(read_marks(settings.markers, "body", result.id)) == 2
    assert checkpoints.store.load(result.id) is None


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.timeout(180)
def test_tasks_queued_before_the_worker_boots_run_after_recovery(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    first = workers.start("before")
    result = app.tasks["proj.wait_for"].delay(1)
    wait_for_state(result, PAUSED, first)
    first.stop()

    # Leave what a worker that died mid-body leaves: a pending resume request,
    # and a claim whose owner process is gone (and whose lease has run out).
    store = checkpoints.store
    store.request_resume(result.id, 41, "orphaned-request", pause_seq=1)
    dead = _dead_pid()
    owner = Owner(node="gone@cc-it", host=socket.gethostname(), pid=dead)
    claimed = store.claim(result.id, owner=owner, lease_seconds=0.1)
    assert claimed is not None and claimed.lease is not None
    lease = store.lease(result.id)
    assert lease is not None and lease.owner.pid == dead
    wait_until(lambda: utcnow() > lease.expires_at + timedelta(seconds=0.05), "lease expiry")
    probes = [app.tasks["proj.lease_owner"].delay(result.id) for _ in range(4)]

    # A recovery timer too slow to matter: only the boot pass can re-arm the run.
    second = workers.start("after", recovery_interval=3600)

    owners = [get(probe, second) for probe in probes]
    assert dead not in owners, f"a task ran before the boot recovery: {owners}"
    assert get(result, second) == 42
    log = second.log_text()
    recovered = re.search(r"recovery .* at boot: 1 re-armed, 1 resume\(s\) re-sent", log)
    received_at = log.find("] received")
    assert recovered is not None, second.describe()
    assert -1 < recovered.start() < received_at, second.describe()


@pytest.mark.timeout(120)
def test_the_same_resume_message_delivered_twice_runs_the_body_once(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    worker = workers.start()
    result = app.tasks["proj.gated"].delay(0)
    wait_for_state(result, PAUSED, worker)

    # The same request id twice is one resume, and each call sends the message:
    # two identical messages reach the worker while the body holds the run.
    checkpoints.resume(result.id, "once", request_id="dup")
    checkpoints.resume(result.id, "once", request_id="dup")
    worker.wait_for_log(f"run {result.id}: message for pause 1 not claimed")
    gate_path(settings.markers, result.id).touch()

    assert get(result, worker) == "once"
    assert len(read_marks(settings.markers, "body", result.id)) == 1
