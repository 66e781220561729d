"""Pause, resume and cancel on every kind of result backend, under every pool.

The engine never reads a run's state back from the result backend: the store
is the truth. These tests run one real ``celery worker`` per result backend
(Redis, ``rpc://``, a SQLAlchemy database on PostgreSQL, none at all) and pool
(prefork, threads, solo), and check through it what a user relies on:

* a paused run resumes and completes, and ``get()`` returns its value where
  the backend can deliver one;
* a resumed body that fails leaves the run paused, and a second resume
  completes it (``get()`` waits again and returns the value);
* a cancel reaches a client waiting in ``get()``: it raises ``RunCancelled``
  (on ``rpc://`` from another process, the ``celery checkpoint`` command).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from celery.result import AsyncResult

from celery_checkpoint import PAUSED, CheckpointError, Checkpoints, RunCancelled
from tests.conftest import require_server
from tests.integration.conftest import AMQP_URL, REDIS_URL, make_settings
from tests.integration.helpers import (
    ROOT,
    Worker,
    delete_redis_keys,
    get,
    remove_queue,
    wait_for_state,
    wait_until,
)
from tests.integration.proj import Settings, make_app, read_marks

pytestmark = [pytest.mark.slow]

POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def database_backend() -> Iterator[str]:
    """A PostgreSQL database of its own for this test session, as a Celery result backend URL."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"cc_results_{uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"db+postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rpc", marks=pytest.mark.rabbitmq),
        pytest.param("database", marks=[pytest.mark.postgres, pytest.mark.redis]),
        pytest.param("none", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["prefork", "threads", "solo"])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """rpc:// on RabbitMQ (it needs an AMQP broker), the others on the Redis broker."""
    if backend == "rpc":
        require_server("RabbitMQ", "127.0.0.1", 5672)
        settings = make_settings(AMQP_URL, "file", tmp_path)
        settings = settings.__class__(**{**settings.__dict__, "backend": "rpc://"})
    else:
        require_server("Redis", "127.0.0.1", 6379)
        settings = make_settings(REDIS_URL, "file", tmp_path)
        url = {
            "redis": REDIS_URL,
            "database": request.getfixturevalue("database_backend")
            if backend == "database"
            else "",
            "none": "",
        }[backend]
        settings = settings.__class__(**{**settings.__dict__, "backend": url})
    yield settings
    delete_redis_keys(REDIS_URL, settings.prefix)


def _paused(checkpoints: Checkpoints, run_id: str, pause_seq: int, worker: Worker) -> None:
    """Wait until the store holds ``run_id`` paused at ``pause_seq``, no lease, no request."""

    def paused() -> bool:
        run = checkpoints.store.load(run_id)
        return (
            run is not None
            and run.pause_seq == pause_seq
            and run.lease is None
            and checkpoints.store.lease(run_id) is None
            and (run.current_resume is None or run.current_resume.status == "failed")
        )

    wait_until(paused, f"run {run_id} paused at pause {pause_seq}", 60, worker)


def _ended(checkpoints: Checkpoints, run_id: str, status: str, worker: Worker) -> None:
    def ended() -> bool:
        record = checkpoints.store.ended(run_id)
        return record is not None and record.status == status

    wait_until(ended, f"run {run_id} {status} in the store", 60, worker)


def _cancel_from_another_process(settings: Settings, run_id: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **settings.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "celery", "-A", "tests.integration.proj", "checkpoint"]
    return subprocess.Popen(
        [*command, "cancel", run_id, "--reason", "changed my mind"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.timeout(180)
def test_pause_resume_a_failed_attempt_and_cancel_on_each_result_backend_and_pool(
    backend: str, pool: str, settings: Settings, tmp_path: Path
) -> None:
    app = make_app(settings)
    checkpoints = Checkpoints.for_app(app)
    logs = tmp_path / "logs"
    logs.mkdir()
    worker = Worker(app, settings, logs, pool=pool)
    has_results = backend != "none"
    try:
        worker.wait_ready()

        # Pause, resume, complete: get() returns the resumed value.
        first = app.tasks["proj.wait_for"].delay(40)
        _paused(checkpoints, first.id, 1, worker)
        if backend in ("redis", "database"):
            wait_for_state(first, PAUSED, worker, step="await_number", pause_seq=1)
        checkpoints.resume(first.id, 2)
        if has_results:
            assert get(first, worker) == 42
        _ended(checkpoints, first.id, "completed", worker)
        assert len(read_marks(settings.markers, "body", first.id)) == 1

        # A resumed body that fails, then a second resume: get() waits again.
        second = app.tasks["proj.fail_on_request"].delay(7)
        _paused(checkpoints, second.id, 1, worker)
        checkpoints.resume(second.id, {"fail": True}, request_id="attempt-1")
        if has_results:
            with pytest.raises(RuntimeError, match="failed on request"):
                get(second, worker)
        _paused(checkpoints, second.id, 1, worker)
        run = checkpoints.store.load(second.id)
        assert run is not None and run.resume is not None and run.resume.status == "failed"
        checkpoints.resume(second.id, {"fail": False}, request_id="attempt-2")
        if has_results:
            assert get(AsyncResult(second.id, app=app), worker) == 70
        _ended(checkpoints, second.id, "completed", worker)
        assert len(read_marks(settings.markers, "body", second.id)) == 2
        assert "RPC backend missing task request" not in worker.log_text()

        # A cancel reaches a client waiting in get().
        third = app.tasks["proj.wait_for"].delay(1)
        _paused(checkpoints, third.id, 1, worker)
        if backend == "rpc":
            cancel = _cancel_from_another_process(settings, third.id)
            with pytest.raises(RunCancelled, match="changed my mind"):
                get(third, worker)
            output = cancel.communicate(timeout=60)[0].decode(errors="replace")
            assert cancel.returncode == 0, output
        else:
            checkpoints.cancel(third.id, reason="changed my mind")
            if has_results:
                with pytest.raises(RunCancelled, match="changed my mind"):
                    get(third, worker)
        _ended(checkpoints, third.id, "cancelled", worker)
        with pytest.raises(RunCancelled):
            checkpoints.resume(third.id, 5)
        assert read_marks(settings.markers, "body", third.id) == []
    finally:
        worker.stop()
        remove_queue(app, settings.queue)
        checkpoints.store.close()
        app.close()


@pytest.mark.postgres
def test_a_second_resume_is_sent_even_when_the_result_backend_cannot_store_resuming(
    tmp_path: Path,
) -> None:
    """RESUMING is stored before the message is sent, and a failure to store it is only logged."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"cc_gone_{uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    settings = Settings(
        broker="memory://",
        backend=f"db+postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        store=str(tmp_path / "store"),
        markers=str(tmp_path),
        queue=f"cc-gone-{uuid4().hex[:8]}",
        prefix="unused",
    )
    app = make_app(settings)
    checkpoints = Checkpoints.for_app(app)
    store = checkpoints.store
    try:
        # A run whose first resumed attempt failed, as a worker leaves it.
        from celery_checkpoint import RunRecord

        store.save(
            RunRecord(run_id="run-1", task_name="proj.wait_for", step="s", args=[1]), create=True
        )
        store.request_resume("run-1", 1, "attempt-1", pause_seq=1)
        claimed = store.claim("run-1")
        assert claimed is not None and claimed.lease is not None
        store.release("run-1", claimed.lease.token, error="RuntimeError: boom")
        app.backend.store_result("run-1", {"step": "s"}, PAUSED)  # the backend works, then goes
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

        checkpoints.resume("run-1", 2, request_id="attempt-2")

        with app.connection_for_read() as conn:
            message = conn.SimpleQueue(settings.queue).get(timeout=5)
        assert message.headers["id"] == "run-1"
        assert message.headers["celery_checkpoint"]["request_id"] == "attempt-2"
        run = store.load("run-1")
        assert run is not None and run.resume is not None
        assert (run.resume.request_id, run.resume.status) == ("attempt-2", "pending")
    finally:
        store.close()
        app.close()
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.rabbitmq
@pytest.mark.timeout(180)
def test_on_rpc_a_run_recovery_gives_up_on_fails_the_waiting_get(tmp_path: Path) -> None:
    """FAILURE stored by a recovery pass on another worker reaches the client that sent it."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    settings = make_settings(AMQP_URL, "file", tmp_path, max_recoveries=0, body_seconds=120.0)
    settings = settings.__class__(**{**settings.__dict__, "backend": "rpc://"})
    app = make_app(settings)
    checkpoints = Checkpoints.for_app(app)
    logs = tmp_path / "logs"
    logs.mkdir()
    first = Worker(app, settings, logs, name="dies")
    later: Worker | None = None
    try:
        first.wait_ready()
        result = app.tasks["proj.slow"].delay(1)
        _paused(checkpoints, result.id, 1, first)
        checkpoints.resume(result.id, None)
        wait_until(lambda: read_marks(settings.markers, "start", result.id), "the body", 60, first)
        first.kill()  # the body dies with its worker: no recovery is allowed (max 0)
        later = Worker(app, settings, logs, name="recovers").wait_ready()
        with pytest.raises(CheckpointError, match="checkpoint_max_recoveries=0"):
            get(result, later)
        _ended(checkpoints, result.id, "failed", later)
    finally:
        for worker in (first, later):
            if worker is not None:
                worker.stop()
        remove_queue(app, settings.queue)
        checkpoints.store.close()
        app.close()
