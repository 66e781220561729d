"""What only the SQLite store has: its URL, its file's privacy, schema versions,
lock waits, corrupt rows, and the indexes that keep background passes off
paused runs. Crash and concurrency tests by force are in
``test_sqlite_faults.py``; the shared contract runs against it from
``conftest.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import (
    CheckpointStore,
    CorruptCheckpoint,
    ImproperlyConfigured,
    LeaseLost,
    StoreUnavailable,
)
from celery_checkpoint.store.sqlite import SqliteStore, sqlite_path
from celery_checkpoint.store.sqlite._schema import MIGRATIONS, SCHEMA_VERSION, migrate
from tests.contract.helpers import make_run, mp_context


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(f"sqlite:///{db}")
    yield opened
    opened.close()


def raw(db: Path) -> sqlite3.Connection:
    """A plain connection, as a person inspecting the database would open one."""
    return sqlite3.connect(db, isolation_level=None)


# -- opening ------------------------------------------------------------------------


def test_urls_follow_sqlalchemy_three_slashes_relative_four_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = CheckpointStore.open("sqlite:///sub/rel.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == tmp_path / "sub" / "rel.db"
    absolute = CheckpointStore.open(f"sqlite:///{tmp_path}/abs.db?busy_timeout=5")
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == tmp_path / "abs.db"
    assert absolute._conn.busy_timeout == 5
    relative.save(make_run("r1"))
    same = CheckpointStore.open(f"sqlite:///{tmp_path}/sub/rel.db")  # 4 slashes: absolute
    assert same.load("r1") == relative.load("r1")


@pytest.mark.parametrize(
    "target",
    [
        "sqlite://host/x.db",
        "sqlite:///:memory:",
        "sqlite:///",
        "sqlite:///x.db?colour=blue",
        "sqlite:x.db",
        "sqlite:/abs/x.db",
    ],
)
def test_bad_sqlite_targets_are_clear_errors(target: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        CheckpointStore.open(target)


def test_sqlite_path_takes_plain_paths_too(tmp_path: Path) -> None:
    assert sqlite_path(tmp_path / "x.db") == (tmp_path / "x.db", {})


def test_the_database_its_wal_and_shm_are_private_and_a_new_directory_is_0700(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "private" / "store.db")
    store.save(make_run("r1"))
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700
    for name in ("store.db", "store.db-wal", "store.db-shm"):
        path = tmp_path / "private" / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    store.close()


def test_wal_mode_and_a_durable_commit_are_set(store: SqliteStore, db: Path) -> None:
    conn = store._conn._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with contextlib.closing(raw(db)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal", "kept in the file"


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not SQLite " * 100)
    with pytest.raises(ImproperlyConfigured, match="not an SQLite database"):
        SqliteStore(tmp_path / "junk.db")


# -- schema versions ---------------------------------------------------------------------


def test_an_older_database_is_upgraded_when_a_newer_package_opens_it(db: Path) -> None:
    with contextlib.closing(raw(db)) as conn:
        assert migrate(conn, where=str(db), upto=1) == (0, 1)
        # A run written by a version-1 package, its key and deadline rule only in the JSON.
        run = make_run("old", key="stripe:pi_1", on_timeout="resume")
        conn.execute(
            "INSERT INTO runs (run_id, status, record, task_name, step, pause_seq, paused_at) "
            "VALUES (?, 'paused', ?, ?, ?, 1, 0)",
            ("old", run.model_dump_json(), run.task_name, run.step),
        )
    store = SqliteStore(db)
    with contextlib.closing(raw(db)) as conn:
        versions = conn.execute(
            "SELECT version, name, applied_at FROM schema_migrations"
        ).fetchall()
        assert [v for v, _, _ in versions] == [m.version for m in MIGRATIONS]
        assert all(applied for _, _, applied in versions)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "corrupt", "early_answers", "schema_migrations"} <= tables
        assert conn.execute("SELECT key, on_timeout FROM runs").fetchone() == (
            "stripe:pi_1",
            "resume",
        ), "the new columns are filled from the records written before"
    loaded = store.load("old")
    assert loaded is not None and loaded.key == "stripe:pi_1"
    assert store._find_key("stripe:pi_1") == "old"
    claimed = store.claim("old")
    assert claimed is not None
    store.close()
    SqliteStore(db).close()  # opening again applies nothing twice
    with contextlib.closing(raw(db)) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
            MIGRATIONS
        )


def test_a_newer_schema_is_refused_by_an_older_package(db: Path) -> None:
    SqliteStore(db).close()
    with contextlib.closing(raw(db)) as conn:
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?, 'from the future', '2099-01-01')",
            (SCHEMA_VERSION + 1,),
        )
    with pytest.raises(ImproperlyConfigured) as caught:
        SqliteStore(db)
    message = str(caught.value)
    assert f"newer celery-checkpoint (schema {SCHEMA_VERSION + 1})" in message
    assert "upgrade the package" in message


# -- waiting for another process's lock ---------------------------------------------------


def test_a_lock_held_past_busy_timeout_is_store_unavailable_naming_the_lock(db: Path) -> None:
    store = SqliteStore(db, busy_timeout=0.3)
    store.save(make_run("r1"))
    with contextlib.closing(raw(db)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process sits on the write lock
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.claim("r1")
        assert time.monotonic() - started >= 0.25, "it waited"
        assert "lock" in str(caught.value) and "nothing was changed" in str(caught.value)
        assert isinstance(caught.value.cause, sqlite3.OperationalError)
        assert store.load("r1") is not None, "reads go on while another process writes"
        other.execute("ROLLBACK")
    assert store.claim("r1") is not None, "and once the lock is free, writes go through"


def test_a_lock_released_within_busy_timeout_is_waited_for(db: Path) -> None:
    import threading

    store = SqliteStore(db, busy_timeout=10)
    store.save(make_run("r1"))
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()
    assert store.claim("r1") is not None
    other.close()


# -- corrupt rows ---------------------------------------------------------------------------


def test_a_corrupt_record_fails_only_its_run_and_listing_moves_it_aside(
    store: SqliteStore, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for run_id in ("a", "b", "c"):
        store.save(make_run(run_id))
    with contextlib.closing(raw(db)) as conn:
        conn.execute("UPDATE runs SET record = x'00ff10' WHERE run_id = 'b'")
    with pytest.raises(CorruptCheckpoint) as caught:
        store.load("b")
    assert caught.value.run_id == "b"
    with pytest.raises(CorruptCheckpoint):
        store.claim("b")
    assert store.lease("b") is None, "a claim of a corrupt record gives its lease back"
    assert store.load("a") is not None
    assert store.claim("c") is not None
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        assert sorted(info.run.run_id for info in store.list()) == ["a", "c"]
    assert any("b" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with contextlib.closing(raw(db)) as conn:
        moved = conn.execute("SELECT run_id, record, last_token FROM corrupt").fetchall()
    assert moved == [("b", b"\x00\xff\x10", 1)], "moved aside as it was, with its tokens"
    assert store.load("b") is None and store.count() == 2
    store.save(make_run("b"))  # a run saved again under the id
    again = store.claim("b")
    assert again is not None and again.lease is not None
    assert again.lease.token == 2, "tokens go on past the corrupt copy's"


def test_recovery_moves_a_corrupt_in_flight_record_aside_and_goes_on(
    store: SqliteStore, db: Path
) -> None:
    for run_id in ("bad", "good"):
        store.save(make_run(run_id))
        assert store.claim(run_id, lease_seconds=0) is not None  # expired at once
    with contextlib.closing(raw(db)) as conn:
        conn.execute("UPDATE runs SET record = '{\"run_id\": 3' WHERE run_id = 'bad'")
    assert [r.run_id for r in store.recover_orphaned()] == ["good"]
    with contextlib.closing(raw(db)) as conn:
        assert conn.execute("SELECT run_id, last_token FROM corrupt").fetchall() == [("bad", 1)]
        assert (
            conn.execute("SELECT count(*) FROM runs WHERE lease_token IS NOT NULL").fetchone()[0]
            == 0
        )


def test_a_corrupt_tombstone_is_corrupt_checkpoint_and_fences_nothing_open(
    store: SqliteStore, db: Path
) -> None:
    store.save(make_run("done"))
    run = store.claim("done")
    assert run is not None and run.lease is not None
    store.complete("done", token=run.lease.token)
    with contextlib.closing(raw(db)) as conn:
        conn.execute("UPDATE runs SET record = 'garbage' WHERE run_id = 'done'")
    with pytest.raises(CorruptCheckpoint):
        store.ended("done")
    store.complete("done", token=run.lease.token)  # still idempotent: the columns say so
    with pytest.raises(LeaseLost):
        store.complete("done", token=run.lease.token - 1)


# -- indexes: background passes never read paused runs ----------------------------------------


PLANS = {
    "recovery by expiry": (
        "SELECT run_id, lease_token FROM runs WHERE lease_token IS NOT NULL AND lease_expires <= ?",
        (0,),
        "runs_in_flight",
    ),
    "recovery by host": (
        "SELECT run_id, lease_token, lease_owner FROM runs WHERE lease_token IS NOT NULL "
        "AND lease_host = ? AND lease_expires > ?",
        ("h", 0),
        "runs_in_flight",
    ),
    "due timeouts": (
        "SELECT run_id FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
        "AND expires_at <= ? ORDER BY expires_at, run_id",
        (0,),
        "runs_deadline",
    ),
    "due resumes": (
        "SELECT run_id FROM runs WHERE resume_sent_at IS NOT NULL AND resume_sent_at <= ? "
        "AND lease_token IS NULL AND status = 'paused' LIMIT ?",
        (0, 10),
        "runs_pending",
    ),
    "undelivered": (
        "SELECT run_id FROM runs WHERE undelivered_at IS NOT NULL AND undelivered_at <= ? LIMIT ?",
        (0, 10),
        "runs_undelivered",
    ),
    "key": ("SELECT run_id FROM runs WHERE key = ? AND status = 'paused'", ("k",), "runs_key"),
    "pruning": (
        "SELECT run_id FROM runs WHERE status <> 'paused' AND ended_at <= ? LIMIT ?",
        (0, 10),
        "runs_ended",
    ),
    "list by age": (
        "SELECT run_id FROM runs WHERE status = 'paused' AND (paused_at, run_id) > (?, ?) "
        "ORDER BY paused_at ASC, run_id ASC LIMIT 200",
        (0, ""),
        "runs_paused_at",
    ),
    "list by task and step": (
        "SELECT run_id FROM runs WHERE status = 'paused' AND task_name = ? AND step = ? "
        "AND (paused_at, run_id) > (?, ?) ORDER BY paused_at ASC, run_id ASC LIMIT 200",
        ("t", "s", 0, ""),
        "runs_task_step",
    ),
    "list by deadline": (
        "SELECT run_id FROM runs WHERE status = 'paused' AND expires_at IS NOT NULL "
        "AND (expires_at, run_id) > (?, ?) ORDER BY expires_at ASC, run_id ASC LIMIT 200",
        (0, ""),
        "runs_deadline",
    ),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_each_background_query_searches_its_own_index(store: SqliteStore, name: str) -> None:
    sql, params, index = PLANS[name]
    conn = store._conn._connection()
    plan = " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan
    assert "SCAN runs" not in plan.replace(f"SCAN runs USING INDEX {index}", "").replace(
        f"SCAN runs USING COVERING INDEX {index}", ""
    ), plan
    assert "TEMP B-TREE" not in plan, f"sorted in memory: {plan}"


# -- fork ----------------------------------------------------------------------------------------


def test_a_forked_child_opens_its_own_connection_and_the_parent_goes_on(
    store: SqliteStore,
) -> None:
    store.save(make_run("parent"))
    store.save(make_run("child"))
    parent_conn = store._conn._connection()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            won = store.claim("child") is not None
            mine = store._conn._connection() is not parent_conn
            os.write(write, b"ok" if won and mine else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert store.lease("child") is not None
    assert store.claim("parent") is not None, "the parent's connection still works"
    assert store._conn._connection() is parent_conn


def _open_and_save(db: str, me: int, start: Any, out: Any) -> None:
    try:
        start.wait(30)
        store = SqliteStore(db)
        store.save(make_run(f"opener-{me}"))
        out.put(("ok", me))
    except BaseException as exc:
        out.put(("error", repr(exc)))


def test_processes_opening_a_new_database_at_once_apply_each_migration_once(db: Path) -> None:
    ctx = mp_context()
    start, out = ctx.Barrier(6), ctx.Queue()
    children = [
        ctx.Process(target=_open_and_save, args=(str(db), me, start, out)) for me in range(6)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(60)
    assert sorted(results) == [("ok", me) for me in range(6)]
    with contextlib.closing(raw(db)) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in MIGRATIONS]
    assert SqliteStore(db).count() == 6
