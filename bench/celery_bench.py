"""Checkpointed runs next to plain Celery tasks, through one real worker.

Run it with ``.venv/bin/python bench/celery_bench.py [--runs N] [--store file|redis|TARGET]``
(``make bench``). It needs Redis on ``127.0.0.1:6379`` (``--broker``/``--backend``
to change): the broker and the result backend, in database 15, under a fresh key
prefix and queue that are deleted afterwards. It starts one ``celery worker``
(prefork, ``-c 2`` by default, log level WARNING) on this module and measures,
in the same run and against the same worker:

* **checkpoint**: ``N`` runs of ``bench.step``, each start -> ``Pause`` -> ``resume``
  -> done. A run is two task executions (the first pauses, the resumed one
  returns) plus one ``checkpoints.resume`` call in this process.
* **plain**: ``2N`` executions of ``bench.plain``, a task with the same trivial
  body, so both sides do the same number of task round trips.
* **Celery's own floor**: ``N`` executions of ``bench.floor``, which ends the way
  a pause must, with ``update_state(PAUSED)`` + ``raise Ignore()``, each followed
  (once seen PAUSED) by one ``bench.plain``: what a pause and its resume cost
  Celery itself, with no store at all.

Celery pays for every pause on its own: it builds two ``ExceptionInfo``s per
``Ignore``, copying the code positions of its ``trace_task`` frame, so an
ignored execution costs about as much as a whole plain task. The ratios are
``floor elapsed / checkpoint elapsed`` (target: >= 0.85: the plugin's own
cost, store included, is at most 15% on top of what Celery charges for the
same pause and resume) and, for reference, ``plain / checkpoint``.

Two modes, each measured ``--rounds`` times alternating plain and checkpoint
(the median is reported, so a drift in machine speed hits both):

* **throughput**: everything in flight at once. Plain: send 2N, wait for all
  results. Checkpoint: send N; resume each run as soon as it is seen PAUSED
  (one ``MGET`` of the pending result keys every 2 ms: a paused run has no
  completion event to wait on); wait for all results. Floor: the same, sending
  the follow-up plain task where the checkpoint side resumes.
* **latency**: one at a time, ``--serial`` round trips. Plain: two sequential
  ``delay().get()``. Checkpoint: ``delay()``, wait for PAUSED (polling the
  result key every 1 ms), ``resume()``, ``get()``. Floor: the same with a
  follow-up plain task for the resume.

``--cpu`` then runs each throughput batch twice more and prints the CPU it
cost the worker's main process, its pool processes, this client and a local
Redis server (read from ``/proc``): the benchmark is CPU-bound on a small
machine, so that table says where a run's extra time goes.

The default is the SQLite store (the package's default) in a temporary
directory; ``--store file`` the file store with fsync on, ``--store redis`` the
Redis store under the run's key prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import Ignore

from celery_checkpoint import Checkpoints, Pause

HERE = Path(__file__).resolve().parent
ENV = "CELERY_BENCH_"


def make_app(broker: str, backend: str, store: str, queue: str, prefix: str) -> Celery:
    app = Celery("celery_bench")
    broker_options = {"global_keyprefix": f"{prefix}:broker:"} if broker.startswith("redis") else {}
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        broker_transport_options=broker_options,
        result_backend_transport_options={"global_keyprefix": f"{prefix}:results:"},
        result_expires=3600,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        checkpoint_store=store,
        worker_hijack_root_logger=True,
    )
    checkpoints = Checkpoints(app)

    @app.task(shared=False, name="bench.plain")
    def plain(i: int) -> int:
        return i + 1

    @app.task(bind=True, shared=False, name="bench.floor")
    def floor(self: Any, i: int) -> int:
        self.update_state(state="PAUSED", meta={"run_id": self.request.id, "step": "await_go"})
        raise Ignore()

    @checkpoints.task(bind=True, shared=False, name="bench.step")
    def step(self: Any, i: int) -> int:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_go", state={"i": i})
        return i + int(run.resume_input)

    return app


def __getattr__(name: str) -> Any:
    # ``celery -A celery_bench`` looks up ``app``: build it from the environment then.
    if name == "app":
        env = os.environ
        app = make_app(
            env[ENV + "BROKER"],
            env[ENV + "BACKEND"],
            env[ENV + "STORE"],
            env[ENV + "QUEUE"],
            env[ENV + "PREFIX"],
        )
        globals()["app"] = app
        return app
    raise AttributeError(name)


class Bench:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self.checkpoints = Checkpoints.for_app(app)
        self.plain = app.tasks["bench.plain"]
        self.step = app.tasks["bench.step"]
        self.floor = app.tasks["bench.floor"]
        self.backend: Any = app.backend
        self.redis: Any = self.backend.client

    def _states(self, keys: list[str]) -> list[str | None]:
        states: list[str | None] = []
        for raw in self.redis.mget(keys):
            states.append(None if raw is None else json.loads(raw)["status"])
        return states

    # -- throughput ---------------------------------------------------------

    def plain_batch(self, n: int) -> float:
        began = time.perf_counter()
        results = [self.plain.delay(i) for i in range(2 * n)]
        for result in results:
            result.get(timeout=300)
        return time.perf_counter() - began

    def checkpoint_batch(self, n: int) -> float:
        began = time.perf_counter()
        results = [self.step.delay(i) for i in range(n)]
        self._on_paused(
            [result.id for result in results], lambda tid: self.checkpoints.resume(tid, 1)
        )
        for result in results:
            result.get(timeout=300)
        return time.perf_counter() - began

    def floor_batch(self, n: int) -> float:
        began = time.perf_counter()
        firsts = [self.floor.delay(i) for i in range(n)]
        follow_ups: list[Any] = []
        self._on_paused([r.id for r in firsts], lambda tid: follow_ups.append(self.plain.delay(1)))
        for result in follow_ups:
            result.get(timeout=300)
        return time.perf_counter() - began

    def _on_paused(self, task_ids: list[str], then: Callable[[str], Any]) -> None:
        """Call ``then(task_id)`` as soon as each task is seen PAUSED."""
        # Result keys built once, not on every poll: the poll is the benchmark's
        # own overhead and shares the CPUs with the worker it measures.
        waiting = {task_id: self.backend.get_key_for_task(task_id) for task_id in task_ids}
        deadline = time.monotonic() + 300
        while waiting:
            states = self._states(list(waiting.values()))
            for task_id, state in zip(list(waiting), states, strict=True):
                if state == "PAUSED":
                    then(task_id)
                    del waiting[task_id]
            if waiting:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(waiting)} runs never paused")
                time.sleep(0.002)

    # -- latency ------------------------------------------------------------

    def plain_serial(self, n: int) -> float:
        began = time.perf_counter()
        for i in range(n):
            self.plain.delay(i).get(timeout=60)
            self.plain.delay(i).get(timeout=60)
        return time.perf_counter() - began

    def checkpoint_serial(self, n: int) -> float:
        began = time.perf_counter()
        for i in range(n):
            result = self.step.delay(i)
            self._wait_paused(result.id)
            self.checkpoints.resume(result.id, 1)
            result.get(timeout=60)
        return time.perf_counter() - began

    def floor_serial(self, n: int) -> float:
        began = time.perf_counter()
        for i in range(n):
            self._wait_paused(self.floor.delay(i).id)
            self.plain.delay(i).get(timeout=60)
        return time.perf_counter() - began

    def _wait_paused(self, task_id: str) -> None:
        deadline = time.monotonic() + 60
        key = self.backend.get_key_for_task(task_id)
        while self._states([key])[0] != "PAUSED":
            if time.monotonic() > deadline:
                raise SystemExit(f"run {task_id} never paused")
            time.sleep(0.001)


def start_worker(env: dict[str, str], concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        *(sys.executable, "-m", "celery", "-A", "celery_bench", "worker"),
        *("--pool=prefork", "-c", str(concurrency), "-n", f"bench-{uuid.uuid4().hex[:8]}@%h"),
        *("-Q", env[ENV + "QUEUE"], "--loglevel=WARNING"),
        *("--without-mingle", "--without-gossip", "--without-heartbeat"),
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(child) for child in fh.read().split()]
    except OSError:
        return [pid]
    return [pid, *(p for child in children for p in _process_tree(child))]


def cpu_per_batch(
    sides: list[tuple[str, Callable[[], float]]], worker_pid: int, redis_pid: int | None
) -> list[tuple[str, float, float, float, float, float]]:
    """Run each side once; its elapsed time and the CPU seconds it cost the worker's
    main process, its pool processes, this process and the Redis server."""
    rows = []
    for name, side in sides:
        pids = _process_tree(worker_pid)
        before = {pid: _cpu_seconds(pid) for pid in pids}
        redis_before = _cpu_seconds(redis_pid) if redis_pid else 0.0
        client_before = sum(os.times()[:2])
        elapsed = side()
        client = sum(os.times()[:2]) - client_before
        redis = (_cpu_seconds(redis_pid) - redis_before) if redis_pid else 0.0
        spent = {pid: _cpu_seconds(pid) - before[pid] for pid in pids}
        pool = sum(cpu for pid, cpu in spent.items() if pid != worker_pid)
        rows.append((name, elapsed, spent[worker_pid], pool, client, redis))
    return rows


def measure(groups: list[tuple[Callable[[], float], ...]], rounds: int) -> list[list[float]]:
    """Alternate the sides of each group ``rounds`` times; the median of each side."""
    samples: list[list[list[float]]] = [[[] for _ in group] for group in groups]
    for _ in range(rounds):
        for group, times in zip(groups, samples, strict=True):
            for side, side_times in zip(group, times, strict=True):
                side_times.append(side())
    return [[statistics.median(side) for side in times] for times in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200, help="checkpoint runs per round (N)")
    parser.add_argument("--serial", type=int, default=50, help="runs in the latency mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="then run each throughput batch twice more and print the CPU it cost each "
        "process (worker main, pool processes, this client, a local Redis server)",
    )
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--backend", default="redis://127.0.0.1:6379/15")
    parser.add_argument(
        "--store",
        default="sqlite",
        help="sqlite (the default store, a temp database), file (a temp directory), redis, "
        "or a store target",
    )
    args = parser.parse_args(argv)

    prefix = f"cc-bench-{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    if args.store == "sqlite":
        store, store_label = f"sqlite:///{workdir / 'store.db'}", "SQLite store (the default)"
    elif args.store == "file":
        store, store_label = str(workdir / "store"), "file store (fsync on)"
    elif args.store == "redis":
        store, store_label = f"{args.backend}?prefix={prefix}:store:", "Redis store"
    else:
        store, store_label = args.store, args.store
    env = dict(os.environ)
    env.update(
        {
            ENV + "BROKER": args.broker,
            ENV + "BACKEND": args.backend,
            ENV + "STORE": store,
            ENV + "QUEUE": prefix,
            ENV + "PREFIX": prefix,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        }
    )
    app = make_app(args.broker, args.backend, store, prefix, prefix)
    worker = start_worker(env, args.concurrency, workdir / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "the worker did not start:\n" + (workdir / "worker.log").read_text()
                )
        bench = Bench(app)
        bench.plain_batch(20)  # warm up: pool processes, connections, imports
        bench.checkpoint_batch(10)
        bench.floor_batch(10)
        (batch_plain, batch_floor, batch_ckpt), (serial_plain, serial_floor, serial_ckpt) = measure(
            [
                (
                    lambda: bench.plain_batch(args.runs),
                    lambda: bench.floor_batch(args.runs),
                    lambda: bench.checkpoint_batch(args.runs),
                ),
                (
                    lambda: bench.plain_serial(args.serial),
                    lambda: bench.floor_serial(args.serial),
                    lambda: bench.checkpoint_serial(args.serial),
                ),
            ],
            args.rounds,
        )
        cpu_rows = []
        if args.cpu:
            redis_pid = int(bench.redis.info("server").get("process_id", 0)) or None
            sides = [
                ("Celery floor", lambda: bench.floor_batch(args.runs)),
                ("checkpoint", lambda: bench.checkpoint_batch(args.runs)),
            ]
            cpu_rows = cpu_per_batch(sides * 2, worker.pid, redis_pid)
        leftover = Checkpoints.for_app(app).store.count()
    finally:
        stop_worker(worker)
        Checkpoints.for_app(app).store.close()
        app.close()
        delete_prefix(args.backend, prefix)
        if args.broker != args.backend and args.broker.startswith("redis"):
            delete_prefix(args.broker, prefix)
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nCelery round trips: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, worker prefork -c {args.concurrency}, Redis broker and "
        f"results, {store_label}; median of {args.rounds} rounds\n"
    )
    print(
        "| mode | work | plain (2N tasks) | Celery floor (N ignored + N plain) "
        "| checkpoint (N runs) | floor/checkpoint | plain/checkpoint |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")

    def row(mode: str, n: int, plain: float, floor: float, ckpt: float) -> None:
        print(
            f"| {mode} | N={n}: {2 * n} executions | {plain:.2f} s ({2 * n / plain:,.0f} tasks/s) "
            f"| {floor:.2f} s ({n / floor:,.0f} pairs/s) | {ckpt:.2f} s ({n / ckpt:,.0f} runs/s) "
            f"| {floor / ckpt:.2f} | {plain / ckpt:.2f} |"
        )

    row("throughput", args.runs, batch_plain, batch_floor, batch_ckpt)
    row("latency (one at a time)", args.serial, serial_plain, serial_floor, serial_ckpt)
    ratio = batch_floor / batch_ckpt
    verdict = "meets" if ratio >= 0.85 else "misses"
    print(f"\nthroughput ratio to Celery's floor {ratio:.2f} {verdict} the target (>= 0.85)")
    if cpu_rows:
        print(f"\nCPU per throughput batch of N={args.runs} (seconds; two runs of each side)\n")
        print(
            "| batch | elapsed | worker main | pool processes | client | Redis | total | per run |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, elapsed, main_cpu, pool, client, redis in cpu_rows:
            total = main_cpu + pool + client + redis
            print(
                f"| {name} | {elapsed:.2f} | {main_cpu:.2f} | {pool:.2f} | {client:.2f} "
                f"| {redis:.2f} | {total:.2f} | {1000 * total / args.runs:.1f} ms |"
            )
    print(f"paused or in-flight runs left in the store: {leftover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
