"""Benchmark the PostgreSQL checkpoint store: its durable cycle against LangGraph's
PostgresSaver, and recovery, listing and counting with many paused runs.

Run it with ``.venv/bin/python bench/postgres_bench.py [--server URL]`` after
``pip install -e '.[bench]'`` (LangGraph's saver is the comparison). It makes a
database of its own on the server (``cc_bench_<random>``) and drops it at the end.

1. **The durable cycle.** What a resumed task costs the store: ``save`` (a
   pause) + ``claim`` (the resume) + ``complete`` (the body returned), each a
   committed transaction. Against it, on the same server:

   * **LangGraph PostgresSaver**: ``put`` + ``get_tuple`` + ``delete_thread`` of a
     thread holding an equivalent checkpoint (the same small state), through
     ``PostgresSaver.from_conn_string`` as LangGraph documents it.
   * **floor**: three one-row autocommit statements on a plain table (``INSERT``,
     ``UPDATE``, ``DELETE``): the least three durable round trips cost.

   Rounds alternate between the variants so a drift in machine speed hits all.
   Target: the store at >= 1.0x LangGraph's cycles per second.

2. **Recovery with many paused runs.** A recovery pass that re-arms 100 expired
   leases, with 100,000 paused runs beside them and with the 100 runs alone.
   Target: within 2x.

3. **At scale.** With a million paused runs (bulk-loaded with ``COPY``) and with
   a thousand: the first page of ``list`` by age (oldest and newest), ``count``,
   ``stats`` and the recovery pass of part 2. Target: each within 2x.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import psycopg
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.postgres import PostgresSaver

from celery_checkpoint import CheckpointStore, PausedWorkflow
from celery_checkpoint.store.base import RunFilter
from celery_checkpoint.store.postgres import PostgresStore

EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)
FLYING = 100


def make_run(run_id: str, i: int) -> PausedWorkflow:
    return PausedWorkflow(
        run_id=run_id,
        task_name="shop.ship",
        step="await_approval",
        state={"order": i, "reserved": True},
        args=[i],
    )


@dataclass(frozen=True)
class OrderedFilter(RunFilter):
    """RunFilter with the extensions' ordering (the base grows these fields later)."""

    order: Literal["oldest", "newest", "deadline"] | None = None
    after: tuple[str, str] | None = None


# -- part 1: the durable cycle -------------------------------------------------------


class StoreCycles:
    """save + claim + complete through the store; records built before the timed loop."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def prepare(self, start: int, n: int) -> list[PausedWorkflow]:
        self.store.prune_ended(0)  # tombstones of earlier rounds: not part of the cycle
        return [make_run(f"bench-{i}", i) for i in range(start, start + n)]

    def run(self, runs: list[PausedWorkflow]) -> None:
        store = self.store
        for paused in runs:
            store.save(paused)
            run = store.claim(paused.run_id)
            assert run is not None and run.lease is not None
            store.complete(paused.run_id, token=run.lease.token)


class LangGraphCycles:
    """put + get_tuple + delete_thread through LangGraph's PostgresSaver.

    The checkpoint holds the values the store's record holds: the state's two
    fields and the task's arguments, a list -- which PostgresSaver keeps in its
    blob table (``flat=True``: the arguments as a plain int, so that every value
    is inline in the checkpoint row, LangGraph's cheapest case).
    """

    def __init__(self, saver: PostgresSaver, *, flat: bool = False) -> None:
        self.saver = saver
        self.flat = flat

    def prepare(self, start: int, n: int) -> list[tuple[dict[str, Any], Any]]:
        work = []
        for i in range(start, start + n):
            checkpoint = empty_checkpoint()
            args: Any = i if self.flat else [i]
            checkpoint["channel_values"] = {"order": i, "reserved": True, "args": args}
            checkpoint["channel_versions"] = {"order": 1, "reserved": 1, "args": 1}
            config = {"configurable": {"thread_id": f"bench-{i}", "checkpoint_ns": ""}}
            work.append((config, checkpoint))
        return work

    def run(self, work: list[tuple[dict[str, Any], Any]]) -> None:
        saver = self.saver
        for config, checkpoint in work:
            versions = checkpoint["channel_versions"]
            saver.put(config, checkpoint, {"source": "input", "step": 1}, versions)
            found = saver.get_tuple(config)
            assert found is not None
            saver.delete_thread(config["configurable"]["thread_id"])


class FloorCycles:
    """Three one-row autocommit statements: three durable round trips, nothing else."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("CREATE TABLE floor (id text PRIMARY KEY, body text, n int)")

    def prepare(self, start: int, n: int) -> list[str]:
        return [f"bench-{i}" for i in range(start, start + n)]

    def run(self, ids: list[str]) -> None:
        execute = self.conn.execute
        for run_id in ids:
            execute("INSERT INTO floor VALUES (%s, %s, 0)", (run_id, "x" * 400))
            execute("UPDATE floor SET n = 1 WHERE id = %s", (run_id,))
            execute("DELETE FROM floor WHERE id = %s", (run_id,))


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


# -- parts 2 and 3: many paused runs ---------------------------------------------------


def bulk_load(store: PostgresStore, url: str, n: int) -> None:
    """``n`` paused runs written straight into the store's table with COPY.

    Each row is what ``save`` writes for a small record (its JSON made from a
    template: building a million records through pydantic would take longer than
    the load). The live-run counters are bumped once instead of per row.
    """
    template = make_run("RUN-ID", 0).model_copy(update={"paused_at": EPOCH, "created_at": EPOCH})
    body = template.model_dump_json()
    stamp = '"2025-01-01T00:00:00Z"'
    assert body.count('"RUN-ID"') == 1 and body.count(stamp) == 2
    head, _, rest = body.partition('"RUN-ID"')
    schema = store.schema
    columns = "run_id, record, task_name, step, pause_seq, paused_at"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{schema}".runs DISABLE TRIGGER USER')
        try:
            with conn.transaction():
                with conn.cursor().copy(f'COPY "{schema}".runs ({columns}) FROM STDIN') as copy:
                    for i in range(n):
                        at = EPOCH + timedelta(seconds=i)
                        text = f'"{at:%Y-%m-%dT%H:%M:%S}Z"'
                        record = head + f'"paused-{i:07d}"' + rest.replace(stamp, text)
                        copy.write_row(
                            (f"paused-{i:07d}", record, "shop.ship", "await_approval", 1, at)
                        )
                conn.execute(
                    f'INSERT INTO "{schema}".run_counts AS c VALUES (%s, %s, 0, %s) '
                    "ON CONFLICT (task_name, step, stripe) DO UPDATE SET live = c.live + %s",
                    ("shop.ship", "await_approval", n, n),
                )
        finally:
            conn.execute(f'ALTER TABLE "{schema}".runs ENABLE TRIGGER USER')
        conn.execute(f'VACUUM ANALYZE "{schema}".runs')  # as autovacuum would, in time


class Population:
    """A schema with ``paused`` bulk-loaded runs and ``FLYING`` runs to claim and recover."""

    def __init__(self, database: str, name: str, paused: int) -> None:
        self.url = f"{database}?schema={name}"
        store = CheckpointStore.open(self.url)
        assert isinstance(store, PostgresStore)
        self.store = store
        t0 = time.perf_counter()
        if paused:
            bulk_load(store, database, paused)
        self.flying = [f"flying-{i:03d}" for i in range(FLYING)]
        for i, run_id in enumerate(self.flying):
            store.save(make_run(run_id, i))
        self.load_seconds = time.perf_counter() - t0
        assert store.count() == paused + FLYING

    def recovery_pass(self) -> float:
        """Seconds of one recovery pass that re-arms ``FLYING`` expired leases."""
        for run_id in self.flying:
            assert self.store.claim(run_id, lease_seconds=0.01) is not None
        time.sleep(0.05)
        t0 = time.perf_counter()
        recovered = self.store.recover_orphaned()
        seconds = time.perf_counter() - t0
        assert len(recovered) == FLYING, len(recovered)
        return seconds

    def first_page(self, order: Literal["oldest", "newest"], size: int = 50) -> float:
        t0 = time.perf_counter()
        page = list(itertools.islice(self.store._list(OrderedFilter(order=order)), size))
        seconds = time.perf_counter() - t0
        assert len(page) == size
        return seconds

    def timed(self, call: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0


def compare(
    title: str,
    small: Population,
    large: Population,
    checks: dict[str, Callable[[Population], float]],
    repeat: int = 15,
) -> list[tuple[str, float, float]]:
    """Median seconds of each check on both populations, measured alternately (so a
    burst of load on the machine hits both), after one warm-up call each."""
    rows = []
    for name, check in checks.items():
        check(small)  # warm: plans cached, statements prepared, pages in memory
        check(large)
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(repeat):
            order = (0, 1) if r % 2 else (1, 0)
            for which in order:
                times[which].append(check((small, large)[which]))
        rows.append((name, statistics.median(times[0]), statistics.median(times[1])))
    print(f"\n{title}\n")
    print("| operation | small | large | large / small | target <= 2x |")
    print("|---|---:|---:|---:|---|")
    for name, a, b in rows:
        verdict = "met" if b <= 2 * a else "MISSED"
        print(f"| {name} | {a * 1000:.2f} ms | {b * 1000:.2f} ms | {b / a:.2f}x | {verdict} |")
    return rows


# -- the run ----------------------------------------------------------------------------


@contextmanager
def bench_database(server: str) -> Iterator[str]:
    name = f"cc_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def part_one(database: str, cycles: int, rounds: int) -> None:
    store = CheckpointStore.open(f"{database}?schema=cycle")
    floor = FloorCycles(database)
    with PostgresSaver.from_conn_string(database) as saver:
        saver.setup()
        variants = {
            "store": StoreCycles(store),
            "langgraph": LangGraphCycles(saver),
            "langgraph-flat": LangGraphCycles(saver, flat=True),
            "floor": floor,
        }
        rates = measure(variants, cycles, rounds)
    store.close()
    floor.conn.close()
    print(f"\n1. The durable cycle: {cycles} cycles per variant in {rounds} interleaved rounds\n")
    print("| variant | cycles/s | us/cycle | vs LangGraph |")
    print("|---|---:|---:|---:|")
    for label, key in (
        ("PostgreSQL store: save + claim + complete", "store"),
        ("LangGraph PostgresSaver: put + get_tuple + delete_thread", "langgraph"),
        ("LangGraph, every value inline (no blob row)", "langgraph-flat"),
        ("floor: INSERT + UPDATE + DELETE, autocommit", "floor"),
    ):
        rate = rates[key]
        print(f"| {label} | {rate:,.0f} | {1e6 / rate:,.0f} | {rate / rates['langgraph']:.2f}x |")
    ratio = rates["store"] / rates["langgraph"]
    print(
        f"\nstore / LangGraph: {ratio:.2f}x (target >= 1.0x: {'met' if ratio >= 1 else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--cycles", type=int, default=3000, help="measured cycles per variant")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--paused", type=int, default=100_000, help="paused runs in part 2")
    parser.add_argument("--scale", type=int, default=1_000_000, help="paused runs in part 3")
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. 1 or 23")
    args = parser.parse_args(argv)

    with psycopg.connect(f"{args.server}/postgres") as conn:
        server_version = conn.execute("SHOW server_version").fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'shared_buffers', 'wal_sync_method')"
            ).fetchall()
        )
    print(
        f"Python {platform.python_version()}, psycopg {psycopg.__version__}, PostgreSQL "
        f"{server_version[0] if server_version else '?'} ({settings}), {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    with bench_database(args.server) as database:
        if "1" in args.parts:
            part_one(database, args.cycles, args.rounds)
        checks: dict[str, Callable[[Population], float]] = {
            f"recovery pass re-arming {FLYING} expired leases": Population.recovery_pass,
        }
        if "2" in args.parts:
            alone = Population(database, "alone", 0)
            many = Population(database, "many", args.paused)
            print(f"\n(loaded {args.paused:,} paused runs in {many.load_seconds:.1f} s)")
            title = (
                f"2. Recovery: {FLYING} runs alone (small), beside {args.paused:,} paused (large)"
            )
            compare(
                title,
                alone,
                many,
                checks,
            )
        if "3" in args.parts:
            small = Population(database, "thousand", 1000)
            large = Population(database, "million", args.scale)
            print(f"\n(loaded {args.scale:,} paused runs in {large.load_seconds:.1f} s)")
            checks.update(
                {
                    "list: first page (50) by age, oldest first": lambda p: p.first_page("oldest"),
                    "list: first page (50) by age, newest first": lambda p: p.first_page("newest"),
                    "count()": lambda p: p.timed(p.store.count),
                    "stats()": lambda p: p.timed(p.store.stats),
                }
            )
            compare(
                f"3. At scale: 1,000 paused (small) vs {args.scale:,} paused (large), "
                f"each with {FLYING} more to recover",
                small,
                large,
                checks,
            )


if __name__ == "__main__":
    main()
