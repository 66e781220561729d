"""Benchmark the file checkpoint store against what the disk allows.

Run it with ``.venv/bin/python bench/store_bench.py [--cycles N] [--dir DIR]``.
It prints a markdown table with two comparisons:

(a) **Durable cycles.** One cycle is what a resumed task costs the store:
    ``save`` (a pause) + ``request_resume`` (the answer) + ``claim`` (the
    resumed execution) + ``complete`` (the body returned), with fsync on.
    The *floor* is a plain Python loop making the same system calls on files
    of the same sizes: for each of the four steps,
    the stripe lock (open, ``flock``, close), the reads (and the failed
    lookups) of the record and the lease, the writes through a uniquely named
    temp file (open, write, ``fsync``, close, rename), the ``fsync`` of each
    changed directory, the pending entry, the move of the completed record
    into ``ended/``, the unlinks of the pending/deadline indexes and the
    ``ended/`` lookups (the lease owner's identity is read from ``/proc`` once
    per process, on neither side per cycle): the same six fsyncs per cycle on
    both sides. What is left between
    the two is the store's Python work (validation, JSON, pydantic). The ratio is the median
    of the per-round ratios (store and floor rounds interleaved). Target: >= 0.8x.

(b) **Recovery at start-up.** ``recover_orphaned()`` with 100 expired in-flight
    runs among 100,000 paused ones, against the same 100 runs alone. Recovery
    lists only ``inflight/`` and ``tmp/``, so the paused runs should not count.
    Target: <= 2x.

Floor and store rounds alternate, so a drift in the disk's speed hits both.
The 100,000 paused runs are created with fsync off (setup only); every
measured operation runs with fsync on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

from celery_checkpoint import Owner, PausedWorkflow
from celery_checkpoint.model import Lease, ResumeRequest, utcnow
from celery_checkpoint.store.file import FileStore

STRIPES = 256  # as in celery_checkpoint.store.file
KINDS = ("paused", "inflight", "pending", "deadlines", "ended", "tmp", "locks")


def make_run(run_id: str, i: int) -> PausedWorkflow:
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step="await_approval",
        state={"order": i, "reserved": True},
        args=[i],
    )


# -- (a) durable cycles --------------------------------------------------------------


class StoreCycles:
    """save + request_resume + claim + complete through the file store.

    The records are built before the clock starts: building one is the
    caller's work, not the store's.
    """

    def __init__(self, directory: Path) -> None:
        self.store = FileStore(directory)
        self.records: dict[int, PausedWorkflow] = {}

    def prepare(self, start: int, n: int) -> None:
        self.records = {i: make_run(f"bench-{i}", i) for i in range(start, start + n)}

    def run(self, start: int, n: int) -> None:
        store, records = self.store, self.records
        for i in range(start, start + n):
            record = records[i]
            store.save(record)
            store.request_resume(record.run_id, {"approved": True}, f"answer-{i}")
            run = store.claim(record.run_id)
            assert run is not None and run.lease is not None
            store.complete(record.run_id, token=run.lease.token)


class FloorCycles:
    """The same system calls as StoreCycles, made directly: no JSON, no models."""

    def __init__(self, directory: Path) -> None:
        self.dirs = {kind: str(directory / kind) for kind in KINDS}
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        # Payloads of the sizes the store writes for the same cycle.
        run = make_run("bench-0", 0)
        self.record = run.to_json()
        self.answered = run.model_copy(
            update={
                "resume": ResumeRequest(
                    request_id="answer-0", input={"approved": True}, pause_seq=1
                )
            }
        ).to_json()
        now = utcnow()
        self.lease = (
            Lease(token=1, owner=Owner.current(), claimed_at=now, expires_at=now)
            .model_dump_json()
            .encode()
        )
        self.pid = os.getpid()

    def _lock(self, run_id: str) -> int:
        stripe = zlib.crc32(run_id.encode()) % STRIPES
        fd = os.open(f"{self.dirs['locks']}/{stripe:03d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _read(path: str) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    @staticmethod
    def _unlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _sync_dir(self, kind: str) -> None:
        fd = os.open(self.dirs[kind], os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)

    def _write(self, kind: str, name: str, data: bytes, durable: bool = True) -> None:
        tmp = f"{self.dirs['tmp']}/{self.pid}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
        os.close(fd)
        os.rename(tmp, f"{self.dirs[kind]}/{name}")
        if durable:
            self._sync_dir(kind)

    def _touch(self, kind: str, name: str) -> None:
        fd = os.open(f"{self.dirs[kind]}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        now = time.time()
        os.utime(fd, (now, now))
        os.close(fd)
        self._sync_dir(kind)

    def prepare(self, start: int, n: int) -> None:
        pass

    def run(self, start: int, n: int) -> None:
        d = self.dirs
        for i in range(start, start + n):
            run_id = f"bench-{i}"
            paused = f"{d['paused']}/{run_id}.json"
            inflight = f"{d['inflight']}/{run_id}.json"
            ended = f"{d['ended']}/{run_id}.json"
            pending = f"{d['pending']}/{run_id}"
            deadline = f"{d['deadlines']}/{run_id}"
            # save: lock, look up record, lease and an ended run of the same id,
            # write the record, drop the indexes
            lock = self._lock(run_id)
            self._read(paused)
            self._read(inflight)
            self._read(ended)
            self._write("paused", f"{run_id}.json", self.record)
            self._unlink(deadline)
            self._unlink(pending)
            os.close(lock)
            # request_resume: lock, read record, tombstone check, lease; create the
            # pending entry (its directory synced) before writing the record
            lock = self._lock(run_id)
            self._read(paused)
            os.path.lexists(ended)
            self._read(inflight)
            self._touch("pending", run_id)
            self._write("paused", f"{run_id}.json", self.answered)
            os.close(lock)
            # claim: lock, read record, tombstone check, lease, write lease (the
            # owner's identity is read from /proc once per process, not per claim)
            lock = self._lock(run_id)
            self._read(paused)
            os.path.lexists(ended)
            self._read(inflight)
            self._write("inflight", f"{run_id}.json", self.lease, durable=False)
            os.close(lock)
            # complete: lock, read record, tombstone check, lease; move the record into
            # ended/ (that directory synced), rewrite it as the tombstone (not synced),
            # drop the indexes and the lease
            lock = self._lock(run_id)
            self._read(paused)
            os.path.lexists(ended)
            self._read(inflight)
            os.rename(paused, ended)
            self._sync_dir("ended")
            self._write("ended", f"{run_id}.json", self.answered, durable=False)
            self._unlink(pending)
            self._unlink(deadline)
            os.unlink(inflight)
            os.close(lock)


def bench_cycles(base: Path, cycles: int, rounds: int) -> tuple[float, float, float]:
    """Cycles/s of the store and of the floor, and the median per-round ratio.

    Rounds alternate (store first, then floor first), and each round's ratio
    compares two runs seconds apart, so a shared machine's changing load
    disturbs the median ratio far less than the totals.
    """
    store, floor = StoreCycles(base / "cycles-store"), FloorCycles(base / "cycles-floor")
    warm = max(cycles // 10, 50)
    for side in (store, floor):
        side.prepare(0, warm)
        side.run(0, warm)
    per_round = max(cycles // rounds, 1)
    spent = {"store": 0.0, "floor": 0.0}
    ratios = []
    nxt = warm
    for r in range(rounds):
        order: list[tuple[str, StoreCycles | FloorCycles]] = [("store", store), ("floor", floor)]
        if r % 2:
            order.reverse()
        took = {}
        for name, side in order:
            side.prepare(nxt, per_round)
            t0 = time.perf_counter()
            side.run(nxt, per_round)
            took[name] = time.perf_counter() - t0
            spent[name] += took[name]
        ratios.append(took["floor"] / took["store"])  # = store rate / floor rate
        nxt += per_round
    done = per_round * rounds
    return done / spent["store"], done / spent["floor"], statistics.median(ratios)


# -- (b) recovery at start-up ------------------------------------------------------------


def populate(directory: Path, paused: int, inflight: int) -> list[str]:
    """``paused`` idle runs and ``inflight`` runs claimed with an already expired lease."""
    setup = FileStore(directory, fsync=False)
    for i in range(paused):
        setup.save(make_run(f"idle-{i:06d}", i))
    orphans = [f"orphan-{i:03d}" for i in range(inflight)]
    for i, run_id in enumerate(orphans):
        setup.save(make_run(run_id, i))
    orphan(directory, orphans)
    return orphans


def orphan(directory: Path, run_ids: list[str]) -> None:
    setup = FileStore(directory, fsync=False)
    for run_id in run_ids:
        assert setup.claim(run_id, lease_seconds=0) is not None  # expired at once


def time_recovery(directory: Path, orphans: list[str]) -> float:
    store = FileStore(directory)  # what a worker opens at boot: fsync on
    t0 = time.perf_counter()
    recovered = store.recover_orphaned()
    elapsed = time.perf_counter() - t0
    assert len(recovered) == len(orphans), (len(recovered), len(orphans))
    return elapsed


def bench_recovery(base: Path, paused: int, inflight: int, repeats: int) -> tuple[float, float]:
    """Median recovery seconds: ``inflight`` orphans among ``paused`` runs, and alone."""
    big, small = base / "recovery-big", base / "recovery-small"
    t0 = time.perf_counter()
    big_orphans = populate(big, paused, inflight)
    small_orphans = populate(small, 0, inflight)
    print(
        f"(set-up: {paused:,} paused + {inflight} in-flight runs in "
        f"{time.perf_counter() - t0:.1f} s, fsync off)",
        file=sys.stderr,
    )
    times: dict[str, list[float]] = {"big": [], "small": []}
    for r in range(repeats):
        pairs = [("big", big, big_orphans), ("small", small, small_orphans)]
        if r % 2:
            pairs.reverse()
        for name, directory, orphans in pairs:
            if r:
                orphan(directory, orphans)
            times[name].append(time_recovery(directory, orphans))
    return statistics.median(times["big"]), statistics.median(times["small"])


# -- report -----------------------------------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count() or 0
    python = platform.python_version()
    return f"{platform.system()} {platform.release()}, {cpus} CPU(s), Python {python}"


def fs_type(path: Path) -> str:
    best = ("", "?")
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                mount = fields[1]
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(
                    mount
                ) > len(best[0]):
                    best = (mount, fields[2])
    except OSError:
        pass
    return best[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000, help="durable cycles per side")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (a)")
    parser.add_argument("--paused", type=int, default=100_000, help="paused runs for (b)")
    parser.add_argument("--inflight", type=int, default=100, help="expired in-flight runs (b)")
    parser.add_argument("--repeats", type=int, default=5, help="recoveries timed per store (b)")
    parser.add_argument("--dir", default=None, help="where to create the stores (a temp dir)")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    filesystem = fs_type(base)
    load_before = os.getloadavg()[0]
    try:
        print(f"machine: {machine()}; stores under {base} ({filesystem})", file=sys.stderr)
        store_rate, floor_rate, cycle_ratio = bench_cycles(base, args.cycles, args.rounds)
        big, small = bench_recovery(base, args.paused, args.inflight, args.repeats)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()[0]

    recovery_ratio = big / small
    rows = [
        (
            f"durable save+request_resume+claim+complete, cycles/s ({args.cycles:,} cycles, "
            f"fsync on; ratio: median of {args.rounds} interleaved rounds)",
            f"{store_rate:,.0f}",
            f"{floor_rate:,.0f} (raw syscall floor)",
            f"{cycle_ratio:.2f}x",
            ">= 0.80x",
            "ok" if cycle_ratio >= 0.8 else "MISSED",
        ),
        (
            f"recover_orphaned(), {args.inflight} expired in flight among "
            f"{args.paused:,} paused (median of {args.repeats})",
            f"{big * 1000:,.1f} ms",
            f"{small * 1000:,.1f} ms ({args.inflight} runs in all)",
            f"{recovery_ratio:.2f}x",
            "<= 2x",
            "ok" if recovery_ratio <= 2 else "MISSED",
        ),
    ]
    print(f"\nFile store: {machine()}, {filesystem} filesystem")
    print(f"(1-minute load average {load_before:.1f} before, {load_after:.1f} after)\n")
    print("| measurement | file store | reference | ratio | target | |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
