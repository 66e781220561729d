"""Each SQLite transition killed at each of its writes, locks and syncs.

For every transition, a forked child opens the store, stops itself, and is
resumed under ``strace -p`` with ``-e inject=SYSCALL:signal=SIGKILL:when=K``:
it dies as it enters the K-th ``pwrite64``, ``fdatasync`` or ``fcntl`` of the
transition, for every K until the transition gets through. After each death
the database must pass ``PRAGMA integrity_check`` and show the run exactly as
before the transition or exactly as after it (the same as a run that was not
killed), through the public API.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import PausedWorkflow
from celery_checkpoint.model import ResumeRequest
from celery_checkpoint.store.sqlite import SqliteStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)"),
]

SYSCALLS = ("pwrite64", "fdatasync", "fcntl")


def record(n: int, **fields: Any) -> PausedWorkflow:
    return PausedWorkflow(
        run_id="r1", task_name="t", step=f"s{n}", pause_seq=n, state={"n": n}, **fields
    )


def paused(store: SqliteStore) -> None:
    store.save(record(1))


def resumed(store: SqliteStore) -> None:
    store.save(record(1))
    store.request_resume("r1", "yes", "req-1")


def in_flight(store: SqliteStore) -> None:
    resumed(store)
    assert store.claim("r1", lease_seconds=3600) is not None


def lapsed(store: SqliteStore) -> None:
    resumed(store)
    assert store.claim("r1", lease_seconds=0) is not None


def answered_early(store: SqliteStore) -> None:
    request = ResumeRequest(request_id="evt-1", input=1, pause_seq=0)
    store._answer_key("k:1", request, 3600)


# name: (prepare in the parent, the transition in the child)
TRANSITIONS: dict[str, tuple[Callable[[SqliteStore], None], Callable[[SqliteStore], Any]]] = {
    "first pause": (lambda store: None, lambda store: store.save(record(1), create=True)),
    "pause naming a key with an early answer": (
        answered_early,
        lambda store: store.save(record(1, key="k:1"), create=True),
    ),
    "request_resume": (paused, lambda store: store.request_resume("r1", "yes", "req-1")),
    "claim": (resumed, lambda store: store.claim("r1", lease_seconds=3600)),
    "heartbeat": (in_flight, lambda store: store.heartbeat("r1", 1, lease_seconds=7200)),
    "re-pause": (in_flight, lambda store: store.save(record(2), token=1)),
    "complete": (in_flight, lambda store: store._complete("r1", 1, '"done"')),
    "release": (in_flight, lambda store: store.release("r1", 1, error="boom")),
    "cancel": (in_flight, lambda store: store.cancel("r1", reason="stop")),
    "recovery": (lapsed, lambda store: store.recover_orphaned()),
}


def observe(db: Path) -> tuple[Any, ...]:
    """What the public API shows of run r1, without the times that differ per run."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        early = conn.execute("SELECT count(*) FROM early_answers").fetchone()[0]
    store = SqliteStore(db)
    try:
        live, ended, lease = store.load("r1"), store.ended("r1"), store.lease("r1")
        run = live or ended
        shown: tuple[Any, ...] = ()
        if run is not None:
            resume = run.resume
            shown = (
                run.status,
                run.step,
                run.state,
                run.last_token,
                run.lease_ended_by,
                run.recoveries,
                run.ended_reason,
                run.result,
                None if resume is None else (resume.request_id, resume.status, resume.error),
            )
        return (
            live is not None,
            ended is not None,
            shown,
            None if lease is None else lease.token,
            lease is not None and lease.expires_at.timestamp() - time.time() > 3600,
            store.count(),
            dict(store.stats()),
            early,
        )
    finally:
        store.close()


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("TracerPid:"):
                return line.split()[1] != "0"
    return False


def run_transition(db: Path, act: Callable[[SqliteStore], Any], inject: str | None) -> int:
    """Run ``act`` in a forked child, under strace injecting ``inject`` if given.

    Returns the child's wait status: 0 when it got through.
    """
    pid = os.fork()
    if pid == 0:  # the child: open the store, wait to be traced, act
        code = 1
        try:
            store = SqliteStore(db)
            os.kill(os.getpid(), signal.SIGSTOP)
            act(store)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    tracer = None
    if inject is not None:
        syscall, when = inject.split("@")
        tracer = subprocess.Popen(
            [
                "strace",
                "-qq",
                "-o",
                "/dev/null",
                "-p",
                str(pid),
                "-e",
                f"trace={syscall}",
                "-e",
                f"inject={syscall}:signal=SIGKILL:when={when}",
            ]
        )
        deadline = time.monotonic() + 10
        while not _traced(pid):
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.005)
    os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    if tracer is not None:
        tracer.wait(10)
    return status


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_a_transition_killed_at_any_write_lock_or_sync_leaves_the_run_before_or_after_it(
    tmp_path: Path, name: str
) -> None:
    prepare, act = TRANSITIONS[name]

    def fresh(tag: str) -> Path:
        db = tmp_path / tag / "store.db"
        store = SqliteStore(db)
        prepare(store)
        store.close()
        return db

    db = fresh("clean")
    before = observe(db)
    assert run_transition(db, act, None) == 0
    after = observe(db)
    assert after != before, "the transition changed something"

    kills = 0
    for syscall in SYSCALLS:
        for when in range(1, 200):
            db = fresh(f"{syscall}-{when}")
            status = run_transition(db, act, f"{syscall}@{when}")
            if status == 0:
                break  # the transition makes fewer such calls: every one was tried
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            kills += 1
            seen = observe(db)
            assert seen in (before, after), f"killed at {syscall} #{when}: {seen}"
            shutil.rmtree(db.parent)
    assert kills >= 2, "the transition was killed at least at its write and its lock"
