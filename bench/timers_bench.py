"""Worker memory and held broker messages against the number of paused runs with timeouts.

Run it with ``.venv/bin/python bench/timers_bench.py [--sizes 1000,10000,100000]
[--out FILE]``. It measures the ``celery_checkpoint`` it imports, so to measure
another version put that version's tree first on ``PYTHONPATH``::

    PYTHONPATH=/path/to/old/tree .venv/bin/python bench/timers_bench.py --label before --out b.json
    .venv/bin/python bench/timers_bench.py --label after --out a.json
    .venv/bin/python bench/timers_bench.py --compare b.json a.json     # the table

It needs Redis on ``127.0.0.1:6379``: the broker, the result backend and the
Redis checkpoint store, in database 15 under a fresh key prefix deleted
afterwards. For each size N it starts one ``celery worker`` (prefork ``-c 2``,
log level WARNING, the broker's ``visibility_timeout`` set to ``--visibility``
seconds and its restore of unacknowledged messages run every second, to
compress time) and:

1. reads the worker's resident memory (main process and pool processes) once
   it answers a ping and each pool process has paused a run (40 runs without
   a timeout, paused and cancelled: imports and connections are warm);
2. pauses N runs with a one-day timeout: through the worker up to
   ``--through-worker`` runs (each run's first execution raises ``Pause``);
   above that the records are saved straight into the store, as a worker
   would have saved them, and for a version that sent a timer message per
   pause the same message is sent for each record (pausing 100,000 runs
   through one worker takes most of an hour);
3. waits until the queue is empty (at most ``--drain`` seconds: a worker that
   holds every message it takes may never empty it, and that is recorded),
   then reads memory and the messages the broker holds for the worker (the
   Redis transport's ``unacked`` hash, plus the queue), and again after each of
   ``--cycles`` visibility timeouts, over which the transport restores and
   re-delivers every message held that long.

It also measures how late ``--short`` timeouts of a few seconds fire (from the
deadline to the resumed body's start), twice on a fresh worker: paused through
that worker, and saved in the store before the worker started (paused by a
worker that is gone: this one learns them from the store); and, where the store
has ``next_deadline()``, what one call costs with N deadlines in the file store
and in the Redis store. ``--sizes ''`` measures only the lateness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_checkpoint import Checkpoints, CheckpointStore, Pause, RunRecord
from celery_checkpoint.model import utcnow
from celery_checkpoint.task import TIMER_TASK

HERE = Path(__file__).resolve().parent
ENV = "TIMERS_BENCH_"
REDIS = "redis://127.0.0.1:6379/15"
DAY = 86400.0
MiB = 1024 * 1024


def make_app(prefix: str, visibility: float) -> Celery:
    app = Celery("timers_bench")
    app.conf.update(
        broker_url=REDIS,
        result_backend=REDIS,
        broker_transport_options={
            "global_keyprefix": f"{prefix}:broker:",
            "visibility_timeout": visibility,
            # Look for messages past their visibility timeout every second
            # (kombu's default: every 10 x 10 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"global_keyprefix": f"{prefix}:results:"},
        result_expires=3600,
        task_default_queue=prefix,
        broker_connection_retry_on_startup=True,
        checkpoint_store=f"{REDIS}?prefix={prefix}:store:",
        worker_hijack_root_logger=True,
    )
    checkpoints = Checkpoints(app)

    @checkpoints.task(bind=True, shared=False, name="bench.timed")
    def timed(self: Any, i: int, timeout: float | None) -> float:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_deadline", state={"i": i}, timeout=timeout, on_timeout="resume")
        return time.time()  # when the resumed body started

    return app


def __getattr__(name: str) -> Any:
    # ``celery -A timers_bench`` looks up ``app``: build it from the environment then.
    if name == "app":
        app = make_app(os.environ[ENV + "PREFIX"], float(os.environ[ENV + "VISIBILITY"]))
        globals()["app"] = app
        return app
    raise AttributeError(name)


# -- the worker -----------------------------------------------------------------------


class Worker:
    def __init__(self, prefix: str, visibility: float, log: Path) -> None:
        env = dict(os.environ)
        env.update({ENV + "PREFIX": prefix, ENV + "VISIBILITY": str(visibility)})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(HERE)]))
        self.node = f"timers-{uuid.uuid4().hex[:8]}@bench"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "timers_bench", "worker"),
                    *("--pool=prefork", "-c", "2", "-n", self.node, "-Q", prefix),
                    *("--without-mingle", "--without-gossip", "--without-heartbeat"),
                    "--loglevel=WARNING",
                ],
                cwd=HERE,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, app: Celery) -> None:
        deadline = time.monotonic() + 60
        while not any(self.node in r for r in app.control.ping([self.node], timeout=0.5)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the worker did not start:\n" + self.log.read_text())

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> tuple[int, int]:
        """Resident memory of the worker's main process and of its pool processes, in bytes.

        Apart because they grow for different reasons: the main process holds
        the messages the consumer received (an ``eta`` message until it is due),
        a pool process what the task executions leave behind.
        """
        main = pool = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                found = re.search(r"^VmRSS:\s+(\d+) kB", (entry / "status").read_text(), re.M)
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            size = int(found.group(1)) * 1024 if found else 0
            if int(entry.name) == self.proc.pid:
                main = size
            else:
                pool += size
        return main, pool

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def held(client: Any, prefix: str) -> int:
    """Messages the broker holds for the worker: unacknowledged ones plus the queue."""
    unacked = int(client.hlen(f"{prefix}:broker:unacked"))
    return unacked + int(client.llen(f"{prefix}:broker:{prefix}"))


def drain(empty: Any, timeout: float, worker: Worker) -> bool:
    """Wait up to ``timeout`` seconds for the queue to be empty; whether it was."""
    deadline = time.monotonic() + timeout
    while not empty():
        if not worker.alive or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def wait_for(predicate: Any, what: str, timeout: float, worker: Worker) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not worker.alive:
            tail = worker.log.read_text()[-3000:]
            raise SystemExit(f"the worker died waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.5)


def sends_timer_messages() -> bool:
    """Whether this version sends a timer message with an eta at each pause."""
    return not hasattr(CheckpointStore, "next_deadline")


# -- the measurements ---------------------------------------------------------------------


def one_size(n: int, args: argparse.Namespace, workdir: Path, client: Any) -> dict[str, Any]:
    prefix = f"cc-timers-bench-{uuid.uuid4().hex[:10]}"
    app = make_app(prefix, args.visibility)
    checkpoints = Checkpoints.for_app(app)
    worker = Worker(prefix, args.visibility, workdir / f"worker-{n}.log")
    row: dict[str, Any] = {"runs": n}
    try:
        worker.wait_ready(app)
        warm_up(app, checkpoints, worker)
        time.sleep(2.0)
        row["rss_ready"] = worker.rss()
        began = time.monotonic()
        if n <= args.through_worker:
            row["created"] = "through the worker"
            timed = app.tasks["bench.timed"]
            for i in range(n):
                timed.apply_async((i, DAY))
        else:
            row["created"] = "saved in the store"
            save_directly(checkpoints.store, app, n)
        wait_for(lambda: checkpoints.store.count() == n, f"{n} paused runs", 3600, worker)
        queue = f"{prefix}:broker:{prefix}"
        row["drained"] = drain(lambda: client.llen(queue) == 0, args.drain, worker)
        row["create_seconds"] = time.monotonic() - began
        time.sleep(2.0)
        row["rss_paused"], row["held_paused"] = worker.rss(), held(client, prefix)
        row["rss_cycles"], row["held_cycles"] = [], []
        for _ in range(args.cycles):
            time.sleep(args.visibility + 1.0)
            row["rss_cycles"].append(worker.rss())
            row["held_cycles"].append(held(client, prefix))
        row["rss_last"] = row["rss_cycles"][-1] if row["rss_cycles"] else row["rss_paused"]
        row["worker_alive"] = worker.alive
        if hasattr(checkpoints.store, "next_deadline"):
            row["redis_next_deadline_ms"] = timed_call(checkpoints.store.next_deadline)
    finally:
        worker.stop()
        checkpoints.store.close()
        app.close()
        delete_prefix(client, prefix)
    return row


def warm_up(app: Celery, checkpoints: Checkpoints, worker: Worker) -> None:
    """Pause and cancel runs without a timeout, so every pool process has run one."""
    runs = [app.tasks["bench.timed"].apply_async((i, None)) for i in range(40)]
    wait_for(lambda: checkpoints.store.count() == len(runs), "the warm-up pauses", 120, worker)
    for run in runs:
        checkpoints.cancel(run.id)


def save_directly(store: CheckpointStore, app: Celery, n: int) -> None:
    """N paused runs as the worker would have saved them (and their timer messages,
    for a version that sent one per pause)."""
    now = utcnow()
    for i in range(n):
        save_one(store, app, f"direct-{i}-{uuid.uuid4().hex[:8]}", i, now, DAY)


def save_one(
    store: CheckpointStore, app: Celery, run_id: str, i: int, now: Any, timeout: float
) -> None:
    run = RunRecord(
        run_id=run_id,
        task_name="bench.timed",
        step="await_deadline",
        args=[i, timeout],
        paused_at=now,
        expires_at=now + timedelta(seconds=timeout),
        on_timeout="resume",
    )
    store.save(run, create=True)
    if sends_timer_messages():
        app.send_task(
            TIMER_TASK,
            args=(run_id, 1),
            eta=run.expires_at,
            ignore_result=True,
            add_to_parent=False,
        )


def lateness(
    args: argparse.Namespace, workdir: Path, client: Any, *, from_store: bool
) -> dict[str, Any]:
    """How late ``--short`` timeouts of a few seconds fire: deadline to the body's start.

    ``from_store``: the runs are saved in the store (deadlines 12 to 15.5 s
    ahead) before the worker starts, as if paused by a worker that is gone.
    """
    prefix = f"cc-timers-bench-{uuid.uuid4().hex[:10]}"
    app = make_app(prefix, args.visibility)
    checkpoints = Checkpoints.for_app(app)
    run_ids = []
    if from_store:
        now = utcnow()
        for i in range(args.short):
            run_ids.append(f"gone-{i}-{uuid.uuid4().hex[:8]}")
            save_one(checkpoints.store, app, run_ids[-1], i, now, 12.0 + (i % 8) * 0.5)
            # What the pausing worker stored; a resumed body waits (up to 5 s) to see it.
            app.backend.store_result(run_ids[-1], {"pause_seq": 1}, "PAUSED")
    worker = Worker(prefix, args.visibility, workdir / "worker-lateness.log")
    try:
        worker.wait_ready(app)
        if not from_store:
            timed = app.tasks["bench.timed"]
            run_ids = [timed.apply_async((i, 3.0 + (i % 8) * 0.5)).id for i in range(args.short)]
        late = []
        for run_id in run_ids:
            started = float(app.AsyncResult(run_id).get(timeout=120))
            ended = checkpoints.store.ended(run_id)
            assert ended is not None and ended.expires_at is not None
            late.append(started - ended.expires_at.timestamp())
    finally:
        worker.stop()
        checkpoints.store.close()
        app.close()
        delete_prefix(client, prefix)
    late.sort()
    return {
        "runs": len(late),
        "median": statistics.median(late),
        "p95": late[int(0.95 * (len(late) - 1))],
        "max": late[-1],
    }


def file_next_deadline(n: int, workdir: Path) -> float:
    """One ``next_deadline()`` on a file store holding n deadlines (fsync off to fill it)."""
    from celery_checkpoint.store.file import FileStore

    store = FileStore(workdir / f"file-{n}", fsync=False)
    now = utcnow()
    for i in range(n):
        store.save(
            RunRecord(
                run_id=f"f-{i}",
                task_name="bench.timed",
                step="s",
                expires_at=now + timedelta(seconds=DAY + i),
            )
        )
    cost = timed_call(store.next_deadline)  # type: ignore[attr-defined]
    shutil.rmtree(workdir / f"file-{n}", ignore_errors=True)
    return cost


def timed_call(call: Any, repeat: int = 5) -> float:
    """Median milliseconds of ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def delete_prefix(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


# -- output -------------------------------------------------------------------------------


def mib(value: int) -> str:
    return f"{value / MiB:.1f}"


def grown(row: dict[str, Any], start: str, end: str, which: int) -> str:
    """Growth of the main (0) or pool (1) processes' memory from ``start`` to ``end``."""
    return f"{(row[end][which] - row[start][which]) / MiB:+.1f} MiB"


def held_after(row: dict[str, Any]) -> str:
    return " / ".join(f"{n:,}" for n in [row["held_paused"], *row["held_cycles"]])


def print_one(result: dict[str, Any]) -> None:
    print(f"\n{result['label']}: {result['machine']}; visibility_timeout {result['visibility']} s")
    print(
        "| paused runs | created | main process RSS ready | main: pausing | main: cycles "
        "| pool: pausing | pool: cycles | held: paused / after each cycle | worker |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---|")
    for row in result["sizes"]:
        print(
            f"| {row['runs']:,} | {row['created']} | {mib(row['rss_ready'][0])} MiB "
            f"| {grown(row, 'rss_ready', 'rss_paused', 0)} "
            f"| {grown(row, 'rss_paused', 'rss_last', 0)} "
            f"| {grown(row, 'rss_ready', 'rss_paused', 1)} "
            f"| {grown(row, 'rss_paused', 'rss_last', 1)} | {held_after(row)} "
            f"| {'up' if row['worker_alive'] else 'died'} |"
        )
        if not row.get("drained", True):
            print(f"  ({row['runs']:,}: the queue was not empty after --drain seconds)")
    print_lateness(result)
    for row in result["sizes"]:
        if "redis_next_deadline_ms" in row:
            print(
                f"next_deadline() with {row['runs']:,} deadlines: Redis store "
                f"{row['redis_next_deadline_ms']:.2f} ms, file store "
                f"{row.get('file_next_deadline_ms', float('nan')):.1f} ms"
            )


def print_lateness(result: dict[str, Any]) -> None:
    kinds = (
        ("lateness", "paused through the worker"),
        ("lateness_from_store", "read from the store (paused before the worker started)"),
    )
    for key, what in kinds:
        late = result.get(key)
        if late:
            median, p95, most = (late[k] * 1000 for k in ("median", "p95", "max"))
            print(
                f"{result['label']}: {late['runs']} short timeouts {what}: late by {median:.0f} "
                f"ms (median), p95 {p95:.0f} ms, max {most:.0f} ms"
            )


def compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    cycles = len(after["sizes"][0]["held_cycles"]) if after["sizes"] else 0
    print(
        f"\nPaused runs with a one-day timeout, one worker (prefork -c 2), Redis broker with "
        f"visibility_timeout {after['visibility']} s, {cycles} cycles; {after['machine']}; "
        f"{before['label']} -> {after['label']}\n"
    )
    print(
        "| paused runs | main process RSS, pausing | main, over the cycles | pool, pausing "
        "| held messages after the cycles | worker |"
    )
    print("|---:|---|---|---|---|---|")
    for old, new in zip(before["sizes"], after["sizes"], strict=True):
        last_old = old["held_cycles"][-1] if old["held_cycles"] else old["held_paused"]
        last_new = new["held_cycles"][-1] if new["held_cycles"] else new["held_paused"]
        print(
            f"| {new['runs']:,} ({new['created']}) "
            f"| {grown(old, 'rss_ready', 'rss_paused', 0)} -> "
            f"{grown(new, 'rss_ready', 'rss_paused', 0)} "
            f"| {grown(old, 'rss_paused', 'rss_last', 0)} -> "
            f"{grown(new, 'rss_paused', 'rss_last', 0)} "
            f"| {grown(old, 'rss_ready', 'rss_paused', 1)} -> "
            f"{grown(new, 'rss_ready', 'rss_paused', 1)} "
            f"| {last_old:,} -> {last_new:,} "
            f"| {'up' if old['worker_alive'] else 'died'} -> "
            f"{'up' if new['worker_alive'] else 'died'} |"
        )
    for side in (before, after):
        print_lateness(side)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--through-worker", type=int, default=10_000)
    parser.add_argument("--visibility", type=float, default=10.0)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--drain", type=float, default=600.0, help="longest wait for the queue")
    parser.add_argument("--short", type=int, default=40)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        compare(before, after)
        return 0

    logging.getLogger("celery_checkpoint").setLevel(logging.ERROR)  # no persistence: known
    client = redis.Redis.from_url(REDIS)
    workdir = Path(tempfile.mkdtemp(prefix="timers-bench-"))
    result: dict[str, Any] = {
        "label": args.label,
        "machine": f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs",
        "visibility": args.visibility,
        "timer_messages": sends_timer_messages(),
        "sizes": [],
    }
    try:
        for n in (int(s) for s in args.sizes.split(",") if s):
            row = one_size(n, args, workdir, client)
            if not sends_timer_messages():
                row["file_next_deadline_ms"] = file_next_deadline(n, workdir)
            result["sizes"].append(row)
            print(json.dumps(row), flush=True)
        if args.short:
            result["lateness"] = lateness(args, workdir, client, from_store=False)
            result["lateness_from_store"] = lateness(args, workdir, client, from_store=True)
    finally:
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print_one(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
