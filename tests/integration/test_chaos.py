"""Chaos: SIGKILL the worker running a resumed body, over and over.

On the file store, the Redis store and the Redis store on a private
three-primary Redis Cluster, two prefork workers share one Redis-broker queue
with late acks, a 2 s lease, a 0.5 s recovery timer and an 8 s visibility
timeout, so every copy of a run that can exist does: the re-armed resume the
survivor's recovery re-sends, and the broker's redelivery of the killed
worker's unacknowledged message. Each round pauses a run, resumes it, waits
until its body has started, kills the whole process group of the worker
running it, and expects the survivor to finish the run. The killed worker is
replaced for the next round.

Markers (``start``/``end`` with wall-clock times) show every body execution.
For each run the execution intervals — start to end, or start to the moment
the test sent SIGKILL — must not overlap: the survivor can only claim once the
killed owner is dead or its lease has run out, and both happen after the kill
was sent. This holds whatever the machine's speed, so nothing here is timed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import PAUSED, Checkpoints
from tests.conftest import require_server
from tests.integration.conftest import REDIS_URL, Workers, make_settings, redis_store_missing
from tests.integration.helpers import (
    Worker,
    delete_redis_keys,
    get,
    process_gone,
    wait_for_state,
    wait_until,
)
from tests.integration.proj import Settings, read_executions, read_marks

ROUNDS = 10

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture(
    params=["sqlite", "redis-cluster", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The default SQLite store, and the fleet stores: Redis (on a three-primary
    cluster, which runs the same scripts as one server) and PostgreSQL. The file
    store's transitions are killed at every system call in the contract suite."""
    if request.param == "postgres":
        return "postgres"
    if request.param != "sqlite":
        missing = redis_store_missing()
        if missing:
            pytest.skip(f"Redis checkpoint store not tested: {missing}")
    return str(request.param)


@pytest.fixture
def settings(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Redis broker, late acks, short leases, fast recovery, quick redelivery."""
    require_server("Redis", "127.0.0.1", 6379)
    store_url = REDIS_URL
    if store_kind == "redis-cluster":
        store_url = request.getfixturevalue("redis_cluster").url
    database = request.getfixturevalue("postgres_database") if store_kind == "postgres" else None
    settings = make_settings(
        REDIS_URL,
        store_kind,
        tmp_path,
        redis_store_url=store_url,
        postgres_database=database,
        lease_seconds=2.0,
        recovery_interval=0.5,
        acks_late=True,
        visibility_timeout=8.0,
        body_seconds=1.5,
    )
    yield settings
    delete_redis_keys(REDIS_URL, settings.prefix)


def _owner_of(pid: int, candidates: list[Worker]) -> Worker:
    for worker in candidates:
        if worker.owns(pid):
            return worker
    raise AssertionError(f"no running worker owns pid {pid}: {candidates}")


@pytest.mark.timeout(600)
def test_sigkill_mid_body_never_runs_a_body_twice_at_once_and_every_run_completes(
    app: Any, checkpoints: Checkpoints, workers: Workers, settings: Settings
) -> None:
    slow = app.tasks["proj.slow"]
    live = [workers.start("a", ready=False), workers.start("b", ready=False)]
    for worker in live:
        worker.wait_ready()
    killed: dict[str, tuple[int, float]] = {}  # run id -> (pid killed mid-body, kill time)

    for n in range(ROUNDS):
        result = slow.delay(n)
        wait_for_state(result, PAUSED, *live)
        checkpoints.resume(result.id, None)
        started = wait_until(
            lambda run_id=result.id: read_marks(settings.markers, "start", run_id),
            f"the body of round {n} to start",
            60,
            *live,
        )
        pid = started[0][0]
        victim = _owner_of(pid, live)
        sent_at = time.time()
        victim.kill()
        killed[result.id] = (pid, sent_at)
        live.remove(victim)
        replacement = workers.start(f"r{n}", ready=False)

        assert get(result, *live, timeout=120) == 2 * n

        live.append(replacement.wait_ready())

    for run_id, (pid, sent_at) in killed.items():
        executions = read_executions(settings.markers, run_id)
        finished = [(p, end) for p, _, end in executions if end is not None]
        assert len(finished) == 1, f"run {run_id}: body finished {len(finished)} times"
        assert finished[0][0] != pid, f"run {run_id}: the killed body in pid {pid} finished"
        assert len(executions) >= 2, f"run {run_id}: the body never ran again after the kill"
        intervals = []
        for body_pid, began, ended in executions:
            if ended is None:
                # Only the body the test killed may lack an end marker.
                assert body_pid == pid, f"run {run_id}: body in pid {body_pid} never ended"
                ended = sent_at
            intervals.append((began, ended, body_pid))
        for (_, end_a, pid_a), (begin_b, _, pid_b) in itertools.pairwise(intervals):
            assert begin_b >= end_a, (
                f"run {run_id}: body in pid {pid_b} started at {begin_b} while the body in "
                f"pid {pid_a} ran until {end_a}"
            )
    # The kills reached the pool children, not only the main processes.
    for pid, _ in killed.values():
        wait_until(lambda pid=pid: process_gone(pid), f"killed pool process {pid} to be gone")
