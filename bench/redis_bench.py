"""Benchmark the Redis checkpoint store against plain redis-py round trips.

Run it with ``.venv/bin/python bench/redis_bench.py [--url URL] [--cycles N]``.
One cycle is what a resumed task costs the store: ``save`` (a pause) +
``claim`` (the resume) + ``complete`` (the body returned) -- three scripts,
three round trips. In the same run it measures:

* **floor**: three ``EVALSHA`` of a trivial script (``return 1``) per cycle,
  through a client set up like the store's (same URL, no retries), sent with
  ``client.evalsha`` as the store sends its scripts. That is the
  least three round trips to the same server can cost; what is left between
  the two is the store's work (building and parsing JSON, pydantic, the keys
  and indexes each script touches). Target: store >= 0.5x floor.
* **file store (durable)**: the same cycle through ``FileStore`` with fsync on,
  in a temporary directory (``--dir``).
* With ``redis-server`` on PATH (and no ``--no-private``): the store and the
  floor again against a private server started with ``appendonly yes`` and
  ``appendfsync always``, the setting under which Redis loses nothing it
  acknowledged -- the fair comparison with the durable file store. Its floor
  is three ``EVALSHA`` of a script that ``SET``s one small key, so the floor
  pays one AOF fsync per round trip as the store does. The shared server
  (``--url``) may run without persistence.

Rounds of the measured variants alternate, so a drift in machine speed hits all
of them. Keys go under a fresh prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_checkpoint import CheckpointStore, PausedWorkflow
from celery_checkpoint.store.file import FileStore


def make_run(run_id: str, i: int) -> PausedWorkflow:
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step="await_approval",
        state={"order": i, "reserved": True},
        args=[i],
    )


class StoreCycles:
    """save + claim + complete through a checkpoint store.

    The checkpoints are built before the timed loop: making one is the task's
    work, not the store's.
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def prepare(self, start: int, n: int) -> list[PausedWorkflow]:
        return [make_run(f"bench-{i}", i) for i in range(start, start + n)]

    def run(self, runs: list[PausedWorkflow]) -> None:
        store = self.store
        for paused in runs:
            store.save(paused)
            run = store.claim(paused.run_id)
            assert run is not None and run.lease is not None
            store.complete(paused.run_id, token=run.lease.token)


class FloorCycles:
    """Three EVALSHA per cycle: three bare round trips.

    ``writes=False``: the script is ``return 1``. ``writes=True``: it SETs one
    small key, so a server with ``appendfsync always`` fsyncs its AOF for each,
    as it does for each of the store's three transitions.
    """

    def __init__(self, url: str, *, writes: bool = False) -> None:
        self.client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        source = "return redis.call('SET', KEYS[1], ARGV[1])" if writes else "return 1"
        self.script = self.client.register_script(source)
        self.script.sha = self.client.script_load(source)
        self.keys = [f"cc-bench-floor-{uuid.uuid4().hex[:8]}"] if writes else []

    def prepare(self, start: int, n: int) -> int:
        return n

    def run(self, n: int) -> None:
        # EVALSHA straight through the client, as the store sends its scripts:
        # the cheapest way to make the round trip.
        evalsha, sha = self.client.evalsha, self.script.sha
        call = (len(self.keys), *self.keys, *([b"x" * 64] if self.keys else []))
        for _ in range(n):
            evalsha(sha, *call)
            evalsha(sha, *call)
            evalsha(sha, *call)

    def close(self) -> None:
        if self.keys:
            self.client.delete(*self.keys)
        self.client.close()


def start_private_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("the private redis-server did not start") from None
            time.sleep(0.05)
    client.close()
    return process, f"redis://127.0.0.1:{port}/0"


def measure(variants: dict[str, Any], cycles: int, rounds: int) -> dict[str, float]:
    """Cycles per second of each variant, rounds interleaved (order rotated each round)."""
    warm = max(cycles // 10, 50)
    for variant in variants.values():
        variant.run(variant.prepare(0, warm))
    per_round = max(cycles // rounds, 1)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    nxt = warm
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            work = variants[name].prepare(nxt, per_round)
            t0 = time.perf_counter()
            variants[name].run(work)
            rates[name].append(per_round / (time.perf_counter() - t0))
        nxt += per_round
    return {name: statistics.median(values) for name, values in rates.items()}


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--cycles", type=int, default=5000, help="measured cycles per variant")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dir", default=None, help="where the file store writes (a local disk)")
    parser.add_argument(
        "--no-private", action="store_true", help="skip the private appendfsync-always server"
    )
    args = parser.parse_args(argv)

    prefix = f"cc-bench-{uuid.uuid4().hex[:8]}"
    cleanup: list[Callable[[], Any]] = []
    try:
        shared = CheckpointStore.open(args.url, prefix=prefix)
        cleanup.append(lambda: delete_prefix(args.url, prefix))
        cleanup.append(shared.close)
        floor = FloorCycles(args.url)
        cleanup.append(floor.close)
        workdir = Path(tempfile.mkdtemp(prefix="cc-bench-", dir=args.dir))
        cleanup.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        variants: dict[str, Any] = {
            "redis store": StoreCycles(shared),
            "floor": floor,
            "file store": StoreCycles(FileStore(workdir / "files", fsync=True)),
        }
        private_url = None
        if not args.no_private and shutil.which("redis-server"):
            (workdir / "aof").mkdir()
            process, private_url = start_private_server(workdir / "aof")
            cleanup.append(process.wait)
            cleanup.append(process.kill)
            private = CheckpointStore.open(private_url, prefix=prefix)
            cleanup.append(private.close)
            private_floor = FloorCycles(private_url, writes=True)
            cleanup.append(private_floor.close)
            variants["redis store (aof always)"] = StoreCycles(private)
            variants["floor (aof always)"] = private_floor
        rates = measure(variants, args.cycles, args.rounds)
    finally:
        for undo in reversed(cleanup):
            undo()

    info = redis.Redis.from_url(args.url).info("server")
    print(
        f"Python {platform.python_version()}, redis-py {redis.__version__}, "
        f"Redis {info['redis_version']}, {platform.machine()}; "
        f"{args.cycles} cycles per variant in {args.rounds} interleaved rounds (median)\n"
    )
    print("| variant | cycles/s | us/cycle | vs floor |")
    print("|---|---:|---:|---:|")

    def row(label: str, rate: float, floor_rate: float | None) -> None:
        ratio = f"{rate / floor_rate:.2f}x" if floor_rate else ""
        print(f"| {label} | {rate:,.0f} | {1e6 / rate:,.0f} | {ratio} |")

    row(f"Redis store, `{args.url}`", rates["redis store"], rates["floor"])
    row("floor: 3 x `EVALSHA` of `return 1`, same server", rates["floor"], rates["floor"])
    if private_url is not None:
        row(
            "Redis store, private server, `appendfsync always`",
            rates["redis store (aof always)"],
            rates["floor (aof always)"],
        )
        row(
            "floor: 3 x `EVALSHA` of a one-key `SET`, private server",
            rates["floor (aof always)"],
            rates["floor (aof always)"],
        )
    row("File store, fsync on (durable)", rates["file store"], None)
    ratio = rates["redis store"] / rates["floor"]
    verdict = "met" if ratio >= 0.5 else "MISSED"
    print(f"\nRedis store / floor: {ratio:.2f}x (target >= 0.5x: {verdict})")
    print(f"Redis store / file store: {rates['redis store'] / rates['file store']:.1f}x")


if __name__ == "__main__":
    main()
