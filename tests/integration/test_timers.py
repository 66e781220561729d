"""Pause timeouts through real workers: no broker message is held for a deadline.

A pause's deadline lives in the store's deadline index; the process that saved
the pause arms a timer for it, and every worker's recovery pass arms one for
the store's earliest deadline. These tests force the conditions under which a
held ``eta`` message hurts: RabbitMQ's ``consumer_timeout`` made short (a
delivery left unacknowledged longer than it closes the channel and stops a
Celery worker), and a Redis broker with a short ``visibility_timeout`` (an
unacknowledged message is restored and delivered again on every expiry). Where
a test checks that a timeout fires, its workers run with a recovery interval of
an hour: a timeout that fires during the test was fired by a timer, not by a
recovery pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from celery_checkpoint import PAUSED, Checkpoints
from celery_checkpoint.model import utcnow
from celery_checkpoint.task import TIMER_TASK
from tests.conftest import IN_CI, require_server
from tests.integration.conftest import AMQP_URL, REDIS_URL, Workers, make_settings
from tests.integration.helpers import (
    Worker,
    delete_redis_keys,
    get,
    remove_queue,
    wait_for_state,
    wait_until,
)
from tests.integration.proj import Settings, make_app, read_marks

pytestmark = [pytest.mark.slow, pytest.mark.redis]

#: No recovery pass runs after a worker's boot within a test: timers alone fire.
NO_PASSES = 3600.0

Fleet = Callable[..., tuple[Celery, Workers, Settings]]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Makes an app and its workers on a broker and a store; all cleaned up after."""
    require_server("Redis", "127.0.0.1", 6379)
    made: list[tuple[Celery, Workers, Settings]] = []

    def make(broker: str, store_kind: str, **options: Any) -> tuple[Celery, Workers, Settings]:
        home = tmp_path / f"fleet-{len(made)}"
        home.mkdir()
        (home / "logs").mkdir()
        settings = make_settings(broker, store_kind, home, **options)
        app = make_app(settings)
        workers = Workers(app, settings, home / "logs")
        made.append((app, workers, settings))
        return app, workers, settings

    yield make
    for app, workers, settings in made:
        workers.stop_all()
        remove_queue(app, settings.queue)
        Checkpoints.for_app(app).reset()  # closes the store if this process opened it
        app.close()
        delete_redis_keys(REDIS_URL, settings.prefix)


def deadline_of(result: AsyncResult, *workers: Worker) -> datetime:
    """The pause's deadline, as the PAUSED state announces it."""
    paused = wait_for_state(result, PAUSED, *workers)
    return datetime.fromisoformat(paused.info["expires_at"])


def body_starts(settings: Settings, run_id: str) -> list[tuple[int, float]]:
    """(pid, time) of every start of the run's resumed body."""
    return read_marks(settings.markers, "body", run_id)


# -- RabbitMQ: consumer_timeout -------------------------------------------------------

CONSUMER_TIMEOUT_MS = 10_000
#: RabbitMQ 3.10 checks the consumer timeout on a channel tick once a minute: a
#: delivery is caught between 10 and about 70 s after it was delivered.
PAST_CONSUMER_TIMEOUT = 90.0


def _rabbitmqctl_eval(expression: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "eval", expression], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl eval {expression!r} failed: {done.stdout}{done.stderr}")
    return done.stdout.strip()


@contextlib.contextmanager
def consumer_timeout(milliseconds: int) -> Iterator[None]:
    """RabbitMQ's ``consumer_timeout`` set to ``milliseconds``, restored afterwards.

    RabbitMQ 3.10 reads it at run time; it is a server-wide setting, so the
    window is kept as short as the test allows.
    """
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not on PATH: cannot change RabbitMQ's consumer_timeout"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    before = _rabbitmqctl_eval("application:get_env(rabbit, consumer_timeout).")
    found = re.fullmatch(r"\{ok,(\d+)\}", before)
    if found is None and before != "undefined":
        pytest.fail(f"unexpected consumer_timeout reading: {before!r}")
    _rabbitmqctl_eval(f"application:set_env(rabbit, consumer_timeout, {milliseconds}).")
    try:
        yield
    finally:
        if found is None:
            _rabbitmqctl_eval("application:unset_env(rabbit, consumer_timeout).")
        else:
            _rabbitmqctl_eval(f"application:set_env(rabbit, consumer_timeout, {found.group(1)}).")


@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_a_pause_longer_than_rabbitmqs_consumer_timeout_keeps_the_worker_up(
    fleet: Fleet,
) -> None:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    with consumer_timeout(CONSUMER_TIMEOUT_MS):
        app, workers, settings = fleet(AMQP_URL, "file", recovery_interval=NO_PASSES)
        worker = workers.start()
        result = app.tasks["proj.timed"].apply_async((1,), {"timeout": PAST_CONSUMER_TIMEOUT})
        deadline = deadline_of(result, worker)
        # A timer message as the previous version sent it at pause time, with
        # its eta at the deadline: a worker must not hold it either.
        app.send_task(TIMER_TASK, args=(result.id, 1), eta=deadline, queue=settings.queue)
        # Well past the consumer timeout (RabbitMQ checks it periodically), before
        # the deadline: the worker is up and answers.
        time.sleep(max(0.0, deadline.timestamp() - 8 - time.time()))
        assert worker.alive, worker.describe()
        worker.wait_ready(timeout=15)
        assert get(result, worker, timeout=120) == "timed out"
        starts = body_starts(settings, result.id)
        assert len(starts) == 1, starts
        assert worker.owns(starts[0][0])
        worker.wait_ready(timeout=15)
        assert "PreconditionFailed" not in worker.log_text()
        store = Checkpoints.for_app(app).store
        ended = store.ended(result.id)
        assert ended is not None and ended.status == "completed"
        assert store.count() == 0


# -- Redis: visibility_timeout ----------------------------------------------------------

VISIBILITY_TIMEOUT = 2.0
MANY = 2000
MiB = 1024 * 1024


def group_rss(worker: Worker) -> int:
    """Resident memory of the worker and its pool processes, in bytes."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != worker.proc.pid:
                continue
            status = (entry / "status").read_text()
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
    return total


def held_messages(settings: Settings) -> int:
    """Messages the Redis transport holds unacknowledged for its consumers."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.hlen(f"{settings.prefix}:broker:unacked"))
    finally:
        client.close()


def queued_messages(settings: Settings) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.llen(f"{settings.prefix}:broker:{settings.queue}"))
    finally:
        client.close()


@pytest.mark.timeout(900)
def test_thousands_of_long_pauses_hold_no_broker_message_and_no_worker_memory(
    fleet: Fleet,
) -> None:
    app, workers, settings = fleet(
        REDIS_URL,
        "redis",
        visibility_timeout=VISIBILITY_TIMEOUT,
        restore_every_second=True,
        recovery_interval=2.0,
    )
    worker = workers.start()
    checkpoints = Checkpoints.for_app(app)
    timed = app.tasks["proj.timed"]
    results = [timed.apply_async((i,), {"timeout": 86400.0}) for i in range(MANY)]
    wait_until(lambda: checkpoints.store.count() == MANY, f"{MANY} runs paused", 600, worker)
    wait_until(lambda: queued_messages(settings) == 0, "the queue to drain", 120, worker)
    # A timer message as the previous version sent it, due in a day: acknowledged
    # on arrival instead of held.
    app.send_task(TIMER_TASK, args=(results[0].id, 1), eta=utcnow() + timedelta(days=1))
    wait_until(lambda: queued_messages(settings) == 0, "the old timer to be taken", 60, worker)
    time.sleep(1.0)  # let every pool process settle after the burst
    before = group_rss(worker)
    held = []
    for _ in range(10):  # ten visibility timeouts: each would restore every held message
        time.sleep(VISIBILITY_TIMEOUT + 1.0)
        held.append(held_messages(settings) + queued_messages(settings))
    grown = group_rss(worker) - before
    assert held == [0] * 10
    assert grown < 8 * MiB, f"worker memory grew {grown / MiB:.1f} MiB"
    assert worker.alive and checkpoints.store.count() == MANY
    assert checkpoints.store.stats()["due_timeouts"] == 0
    assert AsyncResult(results[-1].id, app=app).state == PAUSED


# -- precision and exactly once ---------------------------------------------------------

SHORT = 40


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
@pytest.mark.timeout(300)
def test_short_timeouts_each_fire_exactly_once_on_two_workers(
    fleet: Fleet, store_kind: str
) -> None:
    app, workers, settings = fleet(REDIS_URL, store_kind, recovery_interval=NO_PASSES)
    first, second = workers.start("a"), workers.start("b")
    timed = app.tasks["proj.timed"]
    results = [timed.apply_async((i,), {"timeout": 4.0 + (i % 8) * 0.5}) for i in range(SHORT)]
    deadlines = {result.id: deadline_of(result, first, second) for result in results}
    for result in results:
        assert get(result, first, second) == "timed out"
    late = []
    for result in results:
        starts = body_starts(settings, result.id)
        assert len(starts) == 1, (result.id, starts)  # exactly once, on either worker
        late.append(starts[0][1] - deadlines[result.id].timestamp())
    assert min(late) >= 0, late  # never before the deadline
    # The figure itself is in bench/timers_bench.py; this only catches a timer
    # that does not fire at all (the next recovery pass is an hour away).
    assert statistics.median(late) < 5.0, late
    assert Checkpoints.for_app(app).store.count() == 0


@pytest.mark.parametrize("store_kind", ["sqlite"])
@pytest.mark.timeout(300)
def test_the_deadline_of_a_dead_worker_fires_from_the_timer_of_a_worker_started_later(
    fleet: Fleet, store_kind: str
) -> None:
    app, workers, settings = fleet(REDIS_URL, store_kind, recovery_interval=NO_PASSES)
    paused_by = workers.start("a", concurrency=1)
    result = app.tasks["proj.timed"].apply_async((1,), {"timeout": 20.0})
    deadline = deadline_of(result, paused_by)
    paused_by.kill()
    # Its boot pass finds the deadline in the store and arms the timer; no
    # other pass runs before the deadline.
    survivor = workers.start("b")
    assert time.time() < deadline.timestamp(), "the second worker started after the deadline"
    assert get(result, survivor) == "timed out"
    starts = body_starts(settings, result.id)
    assert len(starts) == 1 and survivor.owns(starts[0][0]), starts


# -- the store down when a timer fires ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of the test's own, with an append-only file fsynced on every
    write, so stopping and starting it again loses nothing."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            message = "redis-server is not on PATH"
            if IN_CI:
                pytest.fail(f"{message}; CI needs it", pytrace=False)
            pytest.skip(message)
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the server keeps it
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.directory), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port)
        try:
            wait_until(lambda: _pings(client), f"redis on port {self.port}", 30)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is whole
            self.process.wait(30)
        self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.timeout(300)
def test_a_timer_that_fires_while_the_store_is_down_fires_once_it_is_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        app, workers, settings = fleet(
            REDIS_URL,
            "redis",
            redis_store_url=server.url,
            recovery_interval=NO_PASSES,
        )
        worker = workers.start(concurrency=1)
        timed = app.tasks["proj.timed"]
        result = timed.apply_async((1,), {"timeout": 4.0})
        deadline = deadline_of(result, worker)
        server.stop()
        time.sleep(max(0.0, deadline.timestamp() + 3.0 - time.time()))
        worker.wait_for_log("could not fire")  # the timer tried, and will again
        assert worker.alive
        server.start()
        assert get(result, worker) == "timed out"
        assert len(body_starts(settings, result.id)) == 1
        # The timer outlived the outage: another pause's timeout fires too.
        again = timed.apply_async((2,), {"timeout": 1.0})
        assert get(again, worker) == "timed out"
        assert len(body_starts(settings, again.id)) == 1
    finally:
        server.stop()
