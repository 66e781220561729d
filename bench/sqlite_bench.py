"""Benchmark the SQLite checkpoint store against LangGraph's ``SqliteSaver``.

Run it with ``.venv/bin/python bench/sqlite_bench.py [--cycles N] [--dir DIR]``
(needs ``pip install -e '.[bench]'`` for ``langgraph-checkpoint-sqlite``).
It prints a markdown table with two comparisons:

(a) **Durable cycles.** One cycle is what a resumed task costs the store:
    ``save`` (a pause) + ``claim`` (the resume) + ``complete`` (the body
    returned). LangGraph's nearest cycle on its SQLite saver is ``put`` of a
    thread's checkpoint + ``get_tuple`` + ``delete_thread``, in the same
    process, on the same disk, with a state of the same size. Both sides run
    in WAL mode; the script reads and prints each side's ``journal_mode`` and
    ``synchronous``. LangGraph sets only ``journal_mode=WAL``, so its
    ``synchronous`` is SQLite's compiled default (``DEFAULT_WAL_SYNCHRONOUS``):
    ``2`` (FULL, durable) on Debian's build, ``1`` (NORMAL, not durable) on
    others. When the default is not FULL, LangGraph is also measured with
    ``synchronous=FULL`` and the ratio is taken against that. Our store is
    measured as shipped (claim and heartbeat commit without an fsync, see the
    store's docstring) and with ``durable_leases=True`` (every commit fsynced).
    The ratio is the median of per-round ratios, rounds interleaved so a
    drift in the disk's speed hits every side. Target: >= 1.0x.

(b) **Recovery at start-up.** ``recover_orphaned()`` with 100 expired in-flight
    runs among 100,000 paused ones, against the same 100 runs alone. Recovery
    reads the in-flight index only, so the paused runs should not count.
    Target: <= 2x. The 100,000 paused runs are written in one transaction
    (set-up only); every timed operation runs durable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from celery_checkpoint import PausedWorkflow
from celery_checkpoint.store._local import fs_type
from celery_checkpoint.store.sqlite import SqliteStore
from celery_checkpoint.store.sqlite._sql import PUT, row_values


def make_state(i: int) -> dict[str, Any]:
    return {
        "order": i,
        "reserved": True,
        "customer": f"customer-{i}",
        "items": [i, i + 1, i + 2],
        "total": "129.90",
        "note": "gift wrap",
    }


def make_run(run_id: str, i: int) -> PausedWorkflow:
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step="await_approval",
        state=make_state(i),
        args=[i],
    )


class Side(Protocol):
    name: str

    def prepare(self, start: int, n: int) -> None: ...
    def run(self, start: int, n: int) -> None: ...
    def settings(self) -> str: ...


# -- (a) durable cycles --------------------------------------------------------------


class StoreCycles:
    """save + claim + complete through the SQLite store.

    Records are built before the clock starts: building one is the caller's
    work, not the store's.
    """

    def __init__(self, path: Path, *, durable_leases: bool) -> None:
        self.store = SqliteStore(path, durable_leases=durable_leases)
        self.name = "celery-checkpoint SqliteStore" + (
            " (durable_leases=True)" if durable_leases else ""
        )
        self.records: dict[int, PausedWorkflow] = {}

    def settings(self) -> str:
        db = sqlite3.connect(self.store.path)
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        db.close()
        leases = "every commit" if self.store.durable_leases else "save and complete"
        return f"journal_mode={mode}, synchronous=2 (FULL); fsync at {leases}"

    def prepare(self, start: int, n: int) -> None:
        self.records = {i: make_run(f"bench-{i}", i) for i in range(start, start + n)}

    def run(self, start: int, n: int) -> None:
        store, records = self.store, self.records
        for i in range(start, start + n):
            record = records[i]
            store.save(record)
            run = store.claim(record.run_id)
            assert run is not None and run.lease is not None
            store.complete(record.run_id, token=run.lease.token)


class LangGraphCycles:
    """put + get_tuple + delete_thread through LangGraph's SqliteSaver."""

    def __init__(self, path: Path, *, synchronous: str | None) -> None:
        from langgraph.checkpoint.base import empty_checkpoint
        from langgraph.checkpoint.sqlite import SqliteSaver

        # As its from_conn_string() opens it.
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.saver = SqliteSaver(self.conn)
        self.saver.setup()
        if synchronous is not None:
            self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.name = "LangGraph SqliteSaver " + (
            "(as shipped)" if synchronous is None else f"(synchronous={synchronous})"
        )
        self._empty = empty_checkpoint
        self.items: dict[int, tuple[dict[str, Any], Any]] = {}

    def settings(self) -> str:
        mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        sync = self.conn.execute("PRAGMA synchronous").fetchone()[0]
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return f"journal_mode={mode}, synchronous={sync} ({names.get(sync, '?')})"

    def prepare(self, start: int, n: int) -> None:
        self.items = {}
        for i in range(start, start + n):
            config = {"configurable": {"thread_id": f"bench-{i}", "checkpoint_ns": ""}}
            checkpoint = self._empty()
            checkpoint["channel_values"] = make_state(i)
            self.items[i] = (config, checkpoint)

    def run(self, start: int, n: int) -> None:
        saver, items = self.saver, self.items
        metadata: Any = {"source": "loop", "step": 1}
        for i in range(start, start + n):
            config, checkpoint = items[i]
            saved = saver.put(config, checkpoint, metadata, {})  # type: ignore[arg-type]
            assert saver.get_tuple(saved) is not None
            saver.delete_thread(f"bench-{i}")


def bench_cycles(
    sides: list[Side], reference: str, cycles: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Per side: cycles/s, and the median per-round speed ratio to the ``reference`` side
    (its time / the side's time: above 1, the side is faster)."""
    warm = max(cycles // 10, 50)
    for side in sides:
        side.prepare(0, warm)
        side.run(0, warm)
    per_round = max(cycles // rounds, 1)
    spent = {side.name: 0.0 for side in sides}
    ratios: dict[str, list[float]] = {side.name: [] for side in sides}
    nxt = warm
    for r in range(rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        took: dict[str, float] = {}
        for side in order:
            side.prepare(nxt, per_round)
            t0 = time.perf_counter()
            side.run(nxt, per_round)
            took[side.name] = time.perf_counter() - t0
            spent[side.name] += took[side.name]
        for side in sides:
            ratios[side.name].append(took[reference] / took[side.name])
        nxt += per_round
    done = per_round * rounds
    return {
        side.name: (done / spent[side.name], statistics.median(ratios[side.name])) for side in sides
    }


# -- (b) recovery at start-up ------------------------------------------------------------


def populate(path: Path, paused: int, inflight: int) -> list[str]:
    """``paused`` idle runs (one transaction) and ``inflight`` runs claimed with an
    already expired lease."""
    store = SqliteStore(path)
    values = (
        row_values(
            make_run(f"idle-{i:06d}", i),
            status="paused",
            last_token=0,
            ended_by=None,
            resume=None,
            now=0,
        )
        for i in range(paused)
    )
    with store._conn.write("set-up", "*") as db:
        db.executemany(PUT, values)
    orphans = [f"orphan-{i:03d}" for i in range(inflight)]
    for i, run_id in enumerate(orphans):
        store.save(make_run(run_id, i))
    orphan(store, orphans)
    store.close()
    return orphans


def orphan(store: SqliteStore, run_ids: list[str]) -> None:
    for run_id in run_ids:
        assert store.claim(run_id, lease_seconds=0) is not None  # expired at once


def bench_recovery(base: Path, paused: int, inflight: int, repeats: int) -> tuple[float, float]:
    """Median recovery seconds: ``inflight`` orphans among ``paused`` runs, and alone."""
    t0 = time.perf_counter()
    big, small = base / "recovery-big.db", base / "recovery-small.db"
    orphans = {"big": populate(big, paused, inflight), "small": populate(small, 0, inflight)}
    print(
        f"(set-up: {paused:,} paused + {inflight} in-flight runs in "
        f"{time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
    )
    stores = {"big": SqliteStore(big), "small": SqliteStore(small)}
    times: dict[str, list[float]] = {"big": [], "small": []}
    for r in range(repeats):
        names = ["big", "small"] if r % 2 == 0 else ["small", "big"]
        for name in names:
            store = stores[name]
            if r:
                orphan(store, orphans[name])
            t0 = time.perf_counter()
            recovered = store.recover_orphaned()
            times[name].append(time.perf_counter() - t0)
            assert len(recovered) == inflight, (len(recovered), inflight)
    return statistics.median(times["big"]), statistics.median(times["small"])


# -- report -----------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"langgraph-checkpoint-sqlite {version('langgraph-checkpoint-sqlite')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000, help="cycles per side (a)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (a)")
    parser.add_argument("--paused", type=int, default=100_000, help="paused runs for (b)")
    parser.add_argument("--inflight", type=int, default=100, help="expired in-flight runs (b)")
    parser.add_argument("--repeats", type=int, default=5, help="recoveries timed per store (b)")
    parser.add_argument("--dir", default=None, help="where to create the databases (a temp dir)")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="sqlite-bench-", dir=args.dir))
    load_before = os.getloadavg()[0]
    try:
        print(f"machine: {machine()}; databases under {base} ({fs_type(base)})", file=sys.stderr)
        shipped = LangGraphCycles(base / "langgraph.db", synchronous=None)
        sides: list[Side] = [
            shipped,
            StoreCycles(base / "store.db", durable_leases=False),
            StoreCycles(base / "store-durable-leases.db", durable_leases=True),
        ]
        if "FULL" not in shipped.settings():
            sides.insert(1, LangGraphCycles(base / "langgraph-full.db", synchronous="FULL"))
        settings = {side.name: side.settings() for side in sides}
        durable_lg = sides[1].name if len(sides) == 4 else sides[0].name
        results = bench_cycles(sides, durable_lg, args.cycles, args.rounds)
        big, small = bench_recovery(base, args.paused, args.inflight, args.repeats)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()[0]

    print(f"\n{machine()}; load average {load_before:.2f} -> {load_after:.2f}\n")
    print("| (a) durable cycle | settings | cycles/s | vs durable LangGraph |")
    print("|---|---|---:|---:|")
    for side in sides:
        rate, ratio = results[side.name]
        print(f"| {side.name} | {settings[side.name]} | {rate:,.0f} | {ratio:.2f}x |")
    print(
        f"\n(a) ratio = median over {args.rounds} interleaved rounds of "
        f"(LangGraph time / our time), {args.cycles:,} cycles per side. Target >= 1.0x."
    )
    print("\n| (b) recover_orphaned() | seconds (median) |")
    print("|---|---:|")
    print(f"| {args.inflight} in flight among {args.paused:,} paused | {big:.4f} |")
    print(f"| {args.inflight} in flight alone | {small:.4f} |")
    print(f"| ratio | {big / small:.2f}x (target <= 2x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
