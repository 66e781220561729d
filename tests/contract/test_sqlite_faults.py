"""The SQLite store by force: real processes, SIGKILL at random moments, races.

* A writer killed 60 times mid-work leaves every run whole (before or after
  each transition), loses no acknowledged write, and the database passes
  ``PRAGMA integrity_check``.
* Eight processes racing for the same runs: exactly one claim wins each.
* A reader (the CLI, a web app) beside a busy writer: never "database is
  locked", never a torn record.

Children are forked (``mp_context``) and report through pipes or queues; the
functions they run live at module top level.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import time
import traceback
from collections import Counter, defaultdict
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import AlreadyResumed, CheckpointExists, LeaseLost, PausedWorkflow
from celery_checkpoint.store.sqlite import SqliteStore
from tests.contract.helpers import mp_context

RUNS = 300
LAST_PAUSE = 3
KILLS = 60
MAX_KILLS = 600
CHILD_TIMEOUT = 60.0


def record(run_id: str, n: int) -> PausedWorkflow:
    """Pause ``n`` of a run: step, pause_seq and state all say ``n``, so a record
    written half by one transition and half by another would show."""
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step=f"s{n}",
        pause_seq=n,
        state={"n": n, "pad": "x" * (n * 97), "sum": n * 3},
    )


def whole(run: PausedWorkflow) -> bool:
    state = run.state
    assert isinstance(state, dict)
    n = state["n"]
    return (
        run.step == f"s{n}"
        and run.pause_seq == n
        and state["sum"] == n * 3
        and state["pad"] == "x" * (n * 97)
    )


# -- (a) a writer killed at random moments ---------------------------------------------------


def _write_until_killed(db: str, ack_fd: int, seed: int) -> None:
    """Walk random runs through their transitions, as a worker and its resumers
    would, acknowledging each one done."""
    rng = random.Random(seed)
    store = SqliteStore(db)

    def ack(*words: object) -> None:
        os.write(ack_fd, (" ".join(map(str, words)) + "\n").encode())

    for run in store.recover_orphaned():  # leases of the writers killed before
        ack("recovered", run.run_id, run.last_token)
    while True:
        run_id = f"run-{rng.randrange(RUNS):03d}"
        run = store.load(run_id)
        if run is None:
            if store.ended(run_id) is not None:
                continue
            try:
                store.save(record(run_id, 1), create=True)
                ack("saved", run_id, 1)
            except CheckpointExists:
                pass
        elif store.lease(run_id) is not None:
            continue  # a dead writer's lease: recovered by the next writer
        elif run.current_resume is None:
            try:
                store.request_resume(run_id, {"go": run.pause_seq}, f"req-{run_id}-{run.pause_seq}")
                ack("resumed", run_id, run.pause_seq)
            except AlreadyResumed:
                pass
        else:
            claimed = store.claim(run_id, pause_seq=run.pause_seq)
            if claimed is None or claimed.lease is None:
                continue
            token = claimed.lease.token
            ack("claimed", run_id, token)
            # The body ran: pause again, or return.
            n = claimed.pause_seq
            if n < LAST_PAUSE:
                store.save(record(run_id, n + 1), token=token)
                ack("repaused", run_id, n + 1)
            else:
                store.complete(run_id, token=token)
                ack("completed", run_id, token)


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_leaves_every_run_whole_and_loses_nothing(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "store.db")
    SqliteStore(db).close()
    ctx = mp_context()
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    acks: list[list[str]] = []
    pending = b""

    def drain() -> None:
        nonlocal pending
        while True:
            try:
                chunk = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            acks.extend(line.decode().split() for line in lines)

    rng = random.Random(20260101)
    kill = 0
    # At least KILLS kills, and on until runs got through to completion (a
    # loaded machine gets less done between two kills).
    while kill < KILLS or (sum(a[0] == "completed" for a in acks) < 20 and kill < MAX_KILLS):
        kill += 1
        child = ctx.Process(target=_write_until_killed, args=(db, write_fd, kill))
        child.start()
        deadline = time.monotonic() + rng.uniform(0.01, 0.08)
        while time.monotonic() < deadline:
            drain()
            time.sleep(0.002)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == -signal.SIGKILL, f"writer {kill} exited {child.exitcode}"
        drain()
    os.close(write_fd)
    drain()
    os.close(read_fd)

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = SqliteStore(db)
    store.recover_orphaned()  # the last writer's leases (its pid is gone)
    ops = Counter(words[0] for words in acks)
    assert kill >= KILLS and ops["saved"] > 20 and ops["claimed"] > 20, ops
    assert ops["completed"] >= 20, ops

    seen: dict[str, PausedWorkflow] = {}
    for i in range(RUNS):
        run_id = f"run-{i:03d}"
        paused, ended = store.load(run_id), store.ended(run_id)
        assert paused is None or ended is None, f"{run_id} is both paused and ended"
        run = paused or ended
        if run is not None:
            assert whole(run), f"{run_id} is torn: {run}"
            assert store.lease(run_id) is None, "every dead writer's lease was recovered"
            seen[run_id] = run
    tokens: dict[str, list[int]] = defaultdict(list)
    for op, run_id, value in acks:
        run = seen.get(run_id)
        assert run is not None, f"{run_id}: acknowledged {op} but the run is lost"
        if op == "saved":
            assert run.pause_seq >= 1
        elif op == "repaused":
            assert run.pause_seq >= int(value), f"{run_id}: acknowledged pause {value} lost"
        elif op == "resumed":
            assert run.pause_seq > int(value) or run.current_resume is not None or run.ended
        elif op == "completed":
            assert run.status == "completed", f"{run_id}: acknowledged completion lost"
            assert run.last_token == int(value)
        elif op == "claimed":
            tokens[run_id].append(int(value))
    for run_id, claimed in tokens.items():
        assert claimed == sorted(set(claimed)), f"{run_id}: a token was handed out twice"
        assert seen[run_id].last_token >= claimed[-1]
    stats = store.stats()
    listed = list(store.list())
    assert stats["runs"] == store.count() == len(listed)
    assert stats["in_flight"] == 0
    pending_requests = sum(
        1 for i in listed if i.run.current_resume and i.run.current_resume.status == "pending"
    )
    assert stats["pending_resumes"] == pending_requests
    store.close()


# -- (b) eight processes racing for the same runs ---------------------------------------------


def _claim_all(db: str, run_ids: list[str], start: Barrier, out: Any) -> None:
    try:
        store = SqliteStore(db)
        start.wait(CHILD_TIMEOUT)
        won = [run_id for run_id in run_ids if store.claim(run_id) is not None]
        out.put(("ok", os.getpid(), won))
    except BaseException:
        out.put(("error", os.getpid(), traceback.format_exc()))


def test_eight_processes_racing_claims_leave_exactly_one_winner_per_run(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    store = SqliteStore(db)
    run_ids = [f"race-{i:03d}" for i in range(200)]
    for run_id in run_ids:
        store.save(record(run_id, 1))
    ctx = mp_context()
    start, out = ctx.Barrier(8), ctx.Queue()
    children = [
        ctx.Process(
            target=_claim_all, args=(db, list(reversed(run_ids)) if i % 2 else run_ids, start, out)
        )
        for i in range(8)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=CHILD_TIMEOUT) for _ in children]
    for child in children:
        child.join(CHILD_TIMEOUT)
    assert [r for r in results if r[0] != "ok"] == []
    winners = Counter(run_id for _, _, won in results for run_id in won)
    assert winners == Counter(dict.fromkeys(run_ids, 1))
    pids = {pid for _, pid, _ in results}
    for run_id in run_ids:
        lease = store.lease(run_id)
        assert lease is not None and lease.token == 1 and lease.owner.pid in pids
    store.close()


# -- (c) a reader beside a busy writer --------------------------------------------------------


def _busy_writer(db: str, seconds: float, out: Any) -> None:
    try:
        store = SqliteStore(db)
        cycles = 0
        stop, hard_stop = time.monotonic() + seconds, time.monotonic() + 30
        while time.monotonic() < stop or (cycles < 20 and time.monotonic() < hard_stop):
            run_id = f"w-{cycles % 50:02d}"
            with contextlib.suppress(LeaseLost):
                store.save(record(run_id, 1))
            run = store.claim(run_id)
            assert run is not None and run.lease is not None
            store.save(record(run_id, 2), token=run.lease.token)
            run = store.claim(run_id)
            assert run is not None and run.lease is not None
            store.complete(run_id, token=run.lease.token)
            cycles += 1
        out.put(("writer", cycles, None))
    except BaseException:
        out.put(("writer", -1, traceback.format_exc()))


def _reader(db: str, seconds: float, out: Any) -> None:
    try:
        store = SqliteStore(db)
        reads = 0
        stop, hard_stop = time.monotonic() + seconds, time.monotonic() + 30
        while time.monotonic() < stop or (reads < 100 and time.monotonic() < hard_stop):
            for info in store.list():
                assert whole(info.run), info.run
                reads += 1
            for i in range(50):
                for run in (store.load(f"w-{i:02d}"), store.ended(f"w-{i:02d}")):
                    if run is not None:
                        assert whole(run), run
                        reads += 1
            stats = store.stats()
            assert stats["runs"] >= stats["in_flight"]
        out.put(("reader", reads, None))
    except BaseException:
        out.put(("reader", -1, traceback.format_exc()))


def test_a_reader_beside_a_busy_writer_never_waits_out_a_lock_nor_sees_a_torn_record(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "store.db")
    SqliteStore(db, busy_timeout=60).close()
    ctx = mp_context()
    out = ctx.Queue()
    children = [
        ctx.Process(target=_busy_writer, args=(db, 1.5, out)),
        ctx.Process(target=_reader, args=(db, 1.5, out)),
    ]
    for child in children:
        child.start()
    results = {
        name: (count, error) for name, count, error in (out.get(timeout=60) for _ in children)
    }
    for child in children:
        child.join(CHILD_TIMEOUT)
    assert results["writer"][1] is None, results["writer"][1]
    assert results["reader"][1] is None, results["reader"][1]
    assert results["writer"][0] > 20, "the writer kept writing"
    assert results["reader"][0] > 100, "the reader kept reading"
