"""Timeouts, cancel and ``celery checkpoint`` against real worker and CLI processes.

The worker is a ``celery -A tests.integration.opsapp worker`` subprocess (prefork,
four processes) on the Redis broker with Redis results and a file store in the
test's directory; commands run as real ``celery -A tests.integration.opsapp
checkpoint ...`` subprocesses. Waits poll with generous deadlines that only turn
a hang into a failure; nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from celery_checkpoint import (
    AlreadyResumed,
    CheckpointNotFound,
    Checkpoints,
    PausedWorkflow,
    PauseExpired,
)
from celery_checkpoint.store.file import FileStore
from tests.conftest import require_server
from tests.integration.helpers import delete_redis_keys, wait_until
from tests.integration.opsapp import environment, make_app, marks

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/15"
MODULE = "tests.integration.opsapp"


def _env(settings: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def cli(settings: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    """``celery -A tests.integration.opsapp checkpoint ARGS`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", MODULE, "checkpoint", *args],
        cwd=ROOT,
        env=_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


class OpsWorker:
    """A ``celery worker`` subprocess in its own process group."""

    def __init__(self, settings: dict[str, str], log: Path) -> None:
        self.log = log
        self.node = f"ops-{uuid.uuid4().hex[:8]}@cc-it"
        queue = settings["OPS_IT_QUEUE"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", MODULE, "worker"),
                    *("--pool=prefork", "-c", "4", "-n", self.node, "-Q", queue),
                    *("--without-mingle", "--without-gossip", "--without-heartbeat"),
                    "--loglevel=INFO",
                ],
                cwd=ROOT,
                env=_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(lambda: self.ready(), "the worker to be ready", 60)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.text()}")
        return " ready." in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def ops_settings(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_server("Redis", "127.0.0.1", 6379)
    prefix = f"cc-ops-{uuid.uuid4().hex[:12]}"
    markers = tmp_path / "markers"
    markers.mkdir()
    yield environment(
        broker=REDIS_URL,
        backend=REDIS_URL,
        store=str(tmp_path / "store"),
        queue=prefix,
        prefix=prefix,
        markers=str(markers),
        recovery_interval="0.2",
    )
    delete_redis_keys(REDIS_URL, prefix)


@pytest.fixture
def ops_app(ops_settings: dict[str, str]) -> Iterator[Celery]:
    app = make_app(ops_settings)
    yield app
    Checkpoints.for_app(app).store.close()
    app.close()


@pytest.fixture
def ops_worker(ops_settings: dict[str, str], tmp_path: Path) -> Iterator[OpsWorker]:
    worker = OpsWorker(ops_settings, tmp_path / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


def state_of(app: Celery, run_id: str) -> AsyncResult:
    return AsyncResult(run_id, app=app)


def wait_state(app: Celery, run_id: str, *states: str, worker: OpsWorker) -> AsyncResult:
    def reached() -> bool:
        return state_of(app, run_id).state in states

    try:
        wait_until(reached, f"{run_id} to be {states}", 60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; worker log:\n{worker.text()[-4000:]}") from None
    return state_of(app, run_id)


@pytest.mark.redis
@pytest.mark.slow
def test_expiry_through_a_real_worker_fails_the_run_and_runs_its_errback(
    ops_app: Celery, ops_settings: dict[str, str], ops_worker: OpsWorker
) -> None:
    markers = ops_settings["OPS_IT_MARKERS"]
    approve, record_error = ops_app.tasks["opsapp.approve"], ops_app.tasks["opsapp.record_error"]
    result = approve.apply_async(("o-1",), {"timeout": 0.5}, link_error=record_error.s())
    failed = wait_state(ops_app, result.id, "FAILURE", worker=ops_worker)
    assert isinstance(failed.result, PauseExpired)
    errbacks = wait_until(lambda: marks(markers, "errback", result.id), "the errback", 60)
    assert errbacks == [f"PauseExpired: {failed.result}"]
    assert marks(markers, "body", result.id) == []
    checkpoints = Checkpoints.for_app(ops_app)
    with pytest.raises(PauseExpired):
        checkpoints.resume(result.id, {"approved": True, "approver": "ana"})
    shown = cli(ops_settings, "show", result.id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "expired"


@pytest.mark.redis
@pytest.mark.slow
def test_a_person_and_the_timeout_racing_on_a_real_worker_never_both_run(
    ops_app: Celery, ops_settings: dict[str, str], ops_worker: OpsWorker
) -> None:
    """50 runs, each resumed right around its deadline while its timer and the
    worker's recovery sweep (every 0.2 s) fire the timeout."""
    markers = ops_settings["OPS_IT_MARKERS"]
    checkpoints = Checkpoints.for_app(ops_app)
    rng = random.Random(5)
    approve = ops_app.tasks["opsapp.approve"]
    runs = []
    for i in range(50):
        mode = "expire" if i % 2 else "resume"
        runs.append((approve.apply_async((f"o-{i}",), {"timeout": 2.0, "on_timeout": mode}), mode))
    deadlines = []
    for result, mode in runs:
        paused = wait_state(ops_app, result.id, "PAUSED", "FAILURE", "SUCCESS", worker=ops_worker)
        info = paused.info if isinstance(paused.info, dict) else {}
        if info.get("expires_at"):
            deadlines.append((datetime.fromisoformat(info["expires_at"]).timestamp(), result, mode))
    assert len(deadlines) == len(runs), "every run must be seen PAUSED first"
    accepted: dict[str, bool] = {}
    for deadline, result, _ in sorted(deadlines, key=lambda item: item[0]):
        # Aim at the deadline: a little before, a little after, or right on it.
        time.sleep(max(0.0, deadline + rng.uniform(-0.05, 0.05) - time.time()))
        try:
            checkpoints.resume(result.id, {"approved": True, "approver": result.id[:8]})
        except (AlreadyResumed, PauseExpired, CheckpointNotFound):
            accepted[result.id] = False
        else:
            accepted[result.id] = True
    outcomes = {"resumed": 0, "expired": 0, "timed out": 0}
    for result, mode in runs:
        final = wait_state(ops_app, result.id, "SUCCESS", "FAILURE", worker=ops_worker)
        bodies = marks(markers, "body", result.id)
        assert len(bodies) <= 1, (result.id, bodies)  # never both, never twice
        if accepted[result.id]:
            # An accepted resume always wins over the timeout.
            assert final.state == "SUCCESS" and bodies == [result.id[:8]], (result.id, bodies)
            outcomes["resumed"] += 1
        elif mode == "expire":
            assert final.state == "FAILURE" and isinstance(final.result, PauseExpired)
            assert bodies == []
            outcomes["expired"] += 1
        else:
            assert final.state == "SUCCESS" and final.result.endswith("timed out")
            assert bodies == ["timed out"]
            outcomes["timed out"] += 1
    assert sum(outcomes.values()) == 50
    store = Checkpoints.for_app(ops_app).store
    assert store.count() == 0  # every run ended; nothing left behind


@pytest.mark.redis
@pytest.mark.slow
def test_cancel_of_an_in_flight_run_on_a_real_worker_drops_its_result(
    ops_app: Celery, ops_settings: dict[str, str], ops_worker: OpsWorker
) -> None:
    markers = ops_settings["OPS_IT_MARKERS"]
    result = ops_app.tasks["opsapp.gated"].apply_async()
    wait_state(ops_app, result.id, "PAUSED", worker=ops_worker)
    checkpoints = Checkpoints.for_app(ops_app)
    checkpoints.resume(result.id, None)
    wait_until(lambda: marks(markers, "start", result.id), "the body to start", 60)
    done = cli(ops_settings, "cancel", result.id, "--reason", "operator stop", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["was_in_flight"] is True
    Path(markers, f"gate-{result.id}").touch()
    wait_until(lambda: marks(markers, "end", result.id), "the body to end", 60)
    wait_until(lambda: "result dropped" in ops_worker.text(), "the drop to be logged", 60)
    final = state_of(ops_app, result.id)
    assert final.state == "REVOKED" and "operator stop" in str(final.result)


@pytest.mark.redis
@pytest.mark.slow
def test_celery_checkpoint_list_show_resume_cancel_as_subprocesses(
    ops_app: Celery, ops_settings: dict[str, str], ops_worker: OpsWorker
) -> None:
    approve = ops_app.tasks["opsapp.approve"]
    first = approve.apply_async(("o-1",), {"timeout": 3600})
    second = approve.apply_async(("o-2",))
    for result in (first, second):
        wait_state(ops_app, result.id, "PAUSED", worker=ops_worker)

    listed = cli(ops_settings, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:-1]}
    assert set(rows) == {first.id, second.id}
    assert rows[first.id].split()[1:5] == ["opsapp.approve", "await_approval", "1", "paused"]
    as_json = [json.loads(line) for line in cli(ops_settings, "list", "--json").stdout.splitlines()]
    assert {r["run_id"] for r in as_json} == {first.id, second.id}

    shown = cli(ops_settings, "show", first.id)
    assert shown.returncode == 0, shown.stderr
    assert "tests.integration.opsapp:Approval" in shown.stdout
    assert "then expire" in shown.stdout

    bad = cli(ops_settings, "resume", first.id, "--input", '{"approved": true}')
    assert bad.returncode == 1 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and "approver" in bad.stderr
    assert cli(ops_settings, "resume", first.id, "--input", "{nope").returncode == 2

    done = cli(ops_settings, "resume", first.id, "--input", '{"approved": true, "approver": "ana"}')
    assert done.returncode == 0, done.stderr
    assert first.get(timeout=60) == "o-1 approved by ana"
    done_run = cli(ops_settings, "show", first.id)  # the completed run's tombstone
    assert done_run.returncode == 0, done_run.stderr
    assert "completed" in done_run.stdout
    again = cli(ops_settings, "resume", first.id, "--input", '{"approved": false, "approver": "x"}')
    assert again.returncode == 1 and len(again.stderr.splitlines()) == 1
    assert "already completed" in again.stderr

    cancelled = cli(ops_settings, "cancel", second.id, "--reason", "duplicate order")
    assert cancelled.returncode == 0, cancelled.stderr
    assert wait_state(ops_app, second.id, "REVOKED", worker=ops_worker).state == "REVOKED"
    decision = '{"approved": true, "approver": "b"}'
    refused = cli(ops_settings, "resume", second.id, "--input", decision)
    assert refused.returncode == 1 and "cancelled" in refused.stderr

    counts = json.loads(cli(ops_settings, "stats", "--json").stdout)
    assert counts["runs"] == 0
    assert cli(ops_settings, "recover").returncode == 0


def _clone_runs(directory: Path, count: int) -> None:
    """``count`` paused runs: the first written by ``FileStore``, the rest copies of it
    under new ids (``paused/<run_id>.json`` is the store's documented layout)."""
    store = FileStore(directory, fsync=False)
    template = PausedWorkflow(run_id="run-0000000", task_name="opsapp.approve", step="wait")
    store.save(template)
    data = (directory / "paused" / "run-0000000.json").read_bytes()
    paused = directory / "paused"
    for i in range(1, count):
        run_id = f"run-{i:07d}"
        (paused / f"{run_id}.json").write_bytes(data.replace(b"run-0000000", run_id.encode()))
    assert store.count() == count
    assert store.load(f"run-{count - 1:07d}") is not None


@pytest.mark.slow
def test_list_over_100k_paused_runs_starts_printing_before_it_has_read_them(
    tmp_path: Path,
) -> None:
    """The command must stream: the test reads one line, stops reading (so the
    command blocks on a full pipe), then swaps the store's records away. A command
    that had read every record before printing would still print all 100,000;
    one that streams prints only the few it had read."""
    total = 100_000
    store = tmp_path / "store"
    _clone_runs(store, total)
    settings = environment(
        broker="memory://", backend="cache+memory://", store=str(store), markers=str(tmp_path)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", MODULE, "checkpoint", "list", "--json"],
        cwd=ROOT,
        env=_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["step"] == "wait" and first["run_id"].startswith("run-")
        # Every record it has not read yet disappears (as if completed meanwhile).
        (store / "paused").rename(store / "paused.gone")
        (store / "paused").mkdir()
        rest, errors = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errors
    printed = 1 + len(rest.splitlines())
    assert printed < total // 2, f"printed {printed} rows: it read the store before printing"
