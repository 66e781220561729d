"""Business keys: the cost of a key lookup and of an early answer taken by its pause.

Run it with ``.venv/bin/python bench/keys_bench.py [--stores sqlite,file,redis,postgres]``
(``make bench``). Per store, in the same run and against the same store:

* **key lookup**: ``find_key(key)`` among ``--runs`` keyed paused runs, next to
  ``load(run_id)`` of the same runs (the floor: reading a run by its id);
* **early answer**: ``answer_key(key, ...)`` before any pause holds the key,
  then the keyed first pause ``save(create=True)`` that takes it, next to the
  same effect without a key: ``save(create=True)`` then ``request_resume``.

Redis needs ``127.0.0.1:6379`` (database 15, a fresh key prefix deleted
afterwards); PostgreSQL ``127.0.0.1:5432`` (a database made for the run and
dropped afterwards). Stores that cannot be reached are left out with a line
saying why.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from celery_checkpoint import CheckpointStore, RunRecord

REDIS_URL = "redis://127.0.0.1:6379/15"
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
#: id(store) -> the URL of the database a PostgreSQL store was opened on
_DATABASES: dict[int, str] = {}


@contextmanager
def open_store(kind: str, workdir: Path) -> Iterator[CheckpointStore]:
    if kind == "sqlite":
        store = CheckpointStore.open(f"sqlite:///{workdir / 'keys.db'}")
        try:
            yield store
        finally:
            store.close()
    elif kind == "file":
        store = CheckpointStore.open(str(workdir / "files"))
        try:
            yield store
        finally:
            store.close()
    elif kind == "redis":
        import redis

        prefix = f"cc-keys-bench-{uuid.uuid4().hex[:10]}"
        store = CheckpointStore.open(f"{REDIS_URL}?prefix={prefix}", eviction="warn")
        try:
            yield store
        finally:
            store.close()
            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
            client.close()
    elif kind == "postgres":
        import psycopg

        name = f"cc_keys_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            store = CheckpointStore.open(f"{POSTGRES_SERVER}/{name}")
            _DATABASES[id(store)] = f"{POSTGRES_SERVER}/{name}"
            try:
                yield store
            finally:
                del _DATABASES[id(store)]
                store.close()
        finally:
            with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    else:
        raise SystemExit(f"unknown store {kind!r}")


def analyze(store: CheckpointStore) -> None:
    """``VACUUM ANALYZE`` the runs just written, as autovacuum would within a minute.

    The store's prepared statements were planned while the table was nearly
    empty; new statistics invalidate those plans, as in a database that has
    been running for a while."""
    import psycopg

    with psycopg.connect(_DATABASES[id(store)], autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def per_op(action: Callable[[int], object], n: int) -> float:
    """Microseconds per call of ``action(i)`` for i in range(n)."""
    began = time.perf_counter()
    for i in range(n):
        action(i)
    return (time.perf_counter() - began) / n * 1e6


def run(kind: str, runs: int, cycles: int, rounds: int) -> tuple[float, float, float, float]:
    workdir = Path(tempfile.mkdtemp(prefix="keys-bench-"))
    try:
        with open_store(kind, workdir) as store:
            tag = uuid.uuid4().hex[:8]
            for i in range(runs):
                store.save(
                    RunRecord(run_id=f"r-{tag}-{i}", task_name="b.t", step="s", key=f"k:{tag}:{i}"),
                    create=True,
                )
            if kind == "postgres":
                analyze(store)
            lookups, loads, early, plain = [], [], [], []
            for r in range(rounds):
                lookups.append(per_op(lambda i: store.find_key(f"k:{tag}:{i % runs}"), cycles))
                loads.append(per_op(lambda i: store.load(f"r-{tag}-{i % runs}"), cycles))

                def early_cycle(i: int, r: int = r) -> None:
                    key = f"e:{tag}:{r}:{i}"
                    store.answer_key(key, {"ok": True}, f"evt-{r}-{i}", ttl=3600)
                    taken = store.save(
                        RunRecord(run_id=f"e-{tag}-{r}-{i}", task_name="b.t", step="s", key=key),
                        create=True,
                    )
                    assert taken is not None

                def plain_cycle(i: int, r: int = r) -> None:
                    run_id = f"p-{tag}-{r}-{i}"
                    store.save(RunRecord(run_id=run_id, task_name="b.t", step="s"), create=True)
                    store.request_resume(run_id, {"ok": True}, f"evt-{r}-{i}")

                early.append(per_op(early_cycle, cycles))
                plain.append(per_op(plain_cycle, cycles))
            return (
                statistics.median(lookups),
                statistics.median(loads),
                statistics.median(early),
                statistics.median(plain),
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stores", default="sqlite,file,redis,postgres")
    parser.add_argument("--runs", type=int, default=10_000, help="keyed paused runs")
    parser.add_argument("--cycles", type=int, default=500, help="operations per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"\nBusiness keys: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; {args.runs:,} keyed paused runs, {args.cycles} operations "
        f"per round, median of {args.rounds} rounds\n"
    )
    print(
        "| store | find_key | load (floor) | lookup / floor | early answer + keyed pause "
        "| pause + request_resume (floor) | early / floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in args.stores.split(","):
        try:
            lookup, load, early, plain = run(kind, args.runs, args.cycles, args.rounds)
        except Exception as exc:  # a store that cannot be reached here
            print(f"| {kind} | not measured: {type(exc).__name__}: {exc} |||||| ")
            continue
        print(
            f"| {kind} | {lookup:,.0f} us | {load:,.0f} us | {lookup / load:.2f} "
            f"| {early:,.0f} us | {plain:,.0f} us | {early / plain:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
