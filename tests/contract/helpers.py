"""Helpers shared by the contract tests and the child processes they start.

Everything a child process runs or unpickles lives at module top level here or
in a test module, so both the ``fork`` and ``spawn`` start methods find it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_checkpoint import CheckpointStore, PausedWorkflow

REDIS_URL = "redis://127.0.0.1:6379/15"


@dataclass
class StoreFactory:
    """Opens another instance of the store under test; picklable for child processes.

    Each call is a separate client on the same data (a new ``FileStore`` on the
    same directory, a new Redis connection under the same key prefix, a new
    connection pool on the same PostgreSQL schema).
    """

    backend: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    _opened: list[CheckpointStore] = field(default_factory=list, repr=False, compare=False)

    def __call__(self) -> CheckpointStore:
        store = CheckpointStore.open(self.target, **self.options)
        self._opened.append(store)
        return store

    def __reduce__(self) -> tuple[Any, ...]:
        # A child opens its own instances; the parent's open ones stay home.
        return (StoreFactory, (self.backend, self.target, dict(self.options)))

    @property
    def root(self) -> Path:
        """The store directory (file backend only)."""
        assert self.backend == "file", "only the file backend has a directory"
        return Path(self.target)

    @property
    def prefix(self) -> str:
        """The key prefix (redis), or the schema (postgres): what holds all the store's data."""
        if self.backend == "postgres":
            return self.schema
        assert self.backend == "redis", "only the redis backend has a key prefix"
        return str(self.options["prefix"])

    @property
    def schema(self) -> str:
        """The store's schema (postgres backend only)."""
        assert self.backend == "postgres", "only the postgres backend has a schema"
        return self.target.rpartition("schema=")[2]

    @property
    def database(self) -> str:
        """The URL of the store's database without the schema (postgres backend only)."""
        assert self.backend == "postgres", "only the postgres backend has a database"
        return self.target.partition("?")[0]

    def postgres_rows(self) -> list[bytes]:
        """Every row of every table in the store's schema, as ``table:json`` (postgres only)."""
        import psycopg

        found: list[bytes] = []
        with psycopg.connect(self.database, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (self.schema,),
            ).fetchall()
            for (table,) in tables:
                query = f'SELECT to_jsonb(t)::text FROM "{self.schema}"."{table}" AS t'
                found += [f"{table}:{row}".encode() for (row,) in conn.execute(query)]
        return sorted(found)

    def drop_schema(self) -> None:
        """Drop the store's schema and everything in it (postgres backend only)."""
        import psycopg

        with psycopg.connect(self.database, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def redis_client(self) -> Any:
        """A plain client on the store's server: a cluster client if it is a cluster."""
        import redis
        import redis.cluster

        client = redis.Redis.from_url(self.target)
        try:
            if client.info("server").get("redis_mode") != "cluster":
                return client
        except BaseException:
            client.close()
            raise
        client.close()
        return redis.cluster.RedisCluster.from_url(self.target)

    def scan_keys(self, pattern: str) -> list[bytes]:
        """Every key matching ``pattern``, on every node (redis backend); on the
        postgres backend every row of the store's schema (the pattern names it)."""
        if self.backend == "postgres":
            assert pattern == self.schema + "*", pattern
            return self.postgres_rows()
        client = self.redis_client()
        try:
            return list(client.scan_iter(match=pattern, count=1000))
        finally:
            client.close()

    def delete_matching(self, pattern: str) -> None:
        client = self.redis_client()
        try:
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
        finally:
            client.close()

    def close_all(self) -> None:
        while self._opened:
            self._opened.pop().close()


def mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` where it exists (no re-import per child: fast), else ``spawn``."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def make_run(run_id: str, **fields: Any) -> PausedWorkflow:
    """A small checkpoint with every field a test might compare filled in."""
    values: dict[str, Any] = {
        "task_name": "shop.ship",
        "step": "await_approval",
        "state": {"reserved": True, "items": [1, 2, 3]},
        "args": [42],
        "kwargs": {"express": False},
        "metadata": {"tenant": "acme"},
    }
    values.update(fields)
    return PausedWorkflow(run_id=run_id, **values)


def snapshot_tree(top: Path, *, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every entry under ``top`` except the ``exclude`` subtree: path -> (size, mtime_ns).

    Directories map to ``(-1, 0)``: only their existence matters.
    """
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != exclude]
        for name in dirnames:
            found[os.path.join(dirpath, name)] = (-1, 0)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                found[path] = (st.st_size, st.st_mtime_ns)
    return found
