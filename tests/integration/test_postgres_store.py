"""The PostgreSQL store against the real server: racing processes, connections
killed under it, schema versions, forks, corrupt rows and what a URL may leak.

Every test works in a fresh schema of the session's database (``postgres_database``
in ``tests/conftest.py``). Faults are real: backends are ended with
``pg_terminate_backend``, children are real processes, nothing is mocked.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from celery_checkpoint import (
    CheckpointStore,
    CorruptCheckpoint,
    ImproperlyConfigured,
    PausedWorkflow,
    StoreUnavailable,
)
from celery_checkpoint.model import ResumeRequest, utcnow
from celery_checkpoint.store.postgres import PostgresStore
from celery_checkpoint.store.postgres._schema import MIGRATIONS, migrate
from tests.integration.helpers import ROOT

pytestmark = pytest.mark.postgres

CLAIMERS = 8
RUNS = 300
CHILD_TIMEOUT = 120.0


def _record(run_id: str, **fields: Any) -> PausedWorkflow:
    values: dict[str, Any] = {"task_name": "shop.ship", "step": "await_approval"}
    values.update(fields)
    return PausedWorkflow(run_id=run_id, **values)


@dataclass
class Schema:
    """A fresh schema in the session's database, dropped afterwards."""

    database: str
    name: str

    @property
    def url(self) -> str:
        return f"{self.database}?schema={self.name}"

    def sql(self, query: str, params: Any = None) -> list[Any]:
        """Run ``query`` ({s} is the schema) on a connection of our own; its rows, if any."""
        with psycopg.connect(self.database, autocommit=True) as conn:
            cur = conn.execute(query.replace("{s}", f'"{self.name}"'), params)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def schema(postgres_database: str) -> Iterator[Schema]:
    found = Schema(postgres_database, f"it_{uuid4().hex[:16]}")
    yield found
    found.sql("DROP SCHEMA IF EXISTS {s} CASCADE")


# -- (a) many processes race for the same runs --------------------------------------


def _claim_all(url: str, run_ids: list[str], start: Any, out: Any) -> None:
    try:
        store = CheckpointStore.open(url, lease_seconds=3600)
        try:
            start.wait(CHILD_TIMEOUT)
            won = []
            for run_id in run_ids:
                run = store.claim(run_id)
                if run is not None:
                    assert run.lease is not None
                    won.append((run_id, run.lease.token))
            out.put(("ok", (os.getpid(), won)))
        finally:
            store.close()
    except BaseException:
        out.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_eight_processes_racing_claims_on_300_runs_claim_each_run_exactly_once(
    schema: Schema,
) -> None:
    store = CheckpointStore.open(schema.url)
    run_ids = [f"race-{i:03d}" for i in range(RUNS)]
    for run_id in run_ids:
        store.save(_record(run_id))
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like separate workers
    start, out = ctx.Barrier(CLAIMERS), ctx.Queue()
    children = [
        ctx.Process(target=_claim_all, args=(schema.url, run_ids, start, out))
        for _ in range(CLAIMERS)
    ]
    for child in children:
        child.start()
    results = []
    for _ in range(CLAIMERS):
        status, value = out.get(timeout=CHILD_TIMEOUT)
        assert status == "ok", f"a claimer failed (a deadlock would show here):\n{value}"
        results.append(value)
    for child in children:
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0

    wins = Counter(run_id for _, won in results for run_id, _ in won)
    assert wins == Counter(dict.fromkeys(run_ids, 1)), "every run claimed exactly once"
    assert {token for _, won in results for _, token in won} == {1}
    winner_of = {run_id: pid for pid, won in results for run_id, _ in won}
    for run_id in run_ids:
        lease = store.lease(run_id)
        assert lease is not None
        assert (lease.token, lease.owner.pid) == (1, winner_of[run_id])
    assert store.count() == RUNS
    assert store.stats()["in_flight"] == RUNS
    # The claimers have exited: their owners are proved dead on this host.
    assert sorted(run.run_id for run in store.recover_orphaned()) == run_ids
    assert store.recover_orphaned() == []
    assert store.stats()["in_flight"] == 0
    store.close()


# -- (b) the server ends the store's connections while transitions run -----------------

# Each run follows one plan; the steps are applied in order until one raises.
PLANS: list[list[str]] = [
    ["save", "request_resume", "claim", "complete"],
    ["save", "request_resume", "claim", "release"],
    ["save", "request_resume", "claim", "repause", "complete"],
    ["save", "claim", "heartbeat", "cancel"],
]
DEADLINE = utcnow() + timedelta(days=1)


def _apply(store: CheckpointStore, run_id: str, step: str) -> None:
    if step == "save":
        store.save(_record(run_id, step="s1", expires_at=DEADLINE), create=True)
    elif step == "request_resume":
        store.request_resume(run_id, {"ok": True}, "req-1")
    elif step == "claim":
        run = store.claim(run_id, lease_seconds=3600)
        assert run is not None and run.lease is not None and run.lease.token == 1, run
    elif step == "complete":
        store.complete(run_id, token=1)
    elif step == "release":
        store.release(run_id, 1, error="boom")
    elif step == "repause":
        store.save(_record(run_id, step="s2", pause_seq=2), token=1)
    elif step == "heartbeat":
        store.heartbeat(run_id, 1, lease_seconds=3600)
    elif step == "cancel":
        assert store.cancel(run_id, reason="stop") is not None
    else:  # pragma: no cover
        raise AssertionError(step)


# What a caller can observe of a run: (record fields or None, lease token, ended status).
Observed = tuple[tuple[Any, ...] | None, int | None, str | None]


def _expected(plan: list[str], done: int) -> Observed:
    """The run after the first ``done`` steps of ``plan`` took effect."""
    record: dict[str, Any] | None = None
    lease: int | None = None
    ended: str | None = None
    for step in plan[:done]:
        if step == "save":
            record = {"step": "s1", "seq": 1, "last": 0, "by": None, "resume": None}
        elif step == "request_resume":
            assert record is not None
            record["resume"] = ("req-1", "pending")
        elif step == "claim":
            lease = 1
        elif step == "complete":
            if lease is not None:  # after a re-pause the fresh paused record stays
                record, ended = None, "completed"
            lease = None
        elif step == "release":
            assert record is not None
            record.update(last=1, by="release", resume=("req-1", "failed"))
            lease = None
        elif step == "repause":
            record = {"step": "s2", "seq": 2, "last": 1, "by": "repause", "resume": None}
            lease = None
        elif step == "cancel":
            record, lease, ended = None, None, "cancelled"
    fields = None if record is None else tuple(sorted(record.items()))
    return fields, lease, ended


def _observe(store: CheckpointStore, run_id: str) -> Observed:
    run = store.load(run_id)
    fields = None
    if run is not None:
        resume = None if run.resume is None else (run.resume.request_id, run.resume.status)
        record = {
            "step": run.step,
            "seq": run.pause_seq,
            "last": run.last_token,
            "by": run.lease_ended_by,
            "resume": resume,
        }
        fields = tuple(sorted(record.items()))
    lease = store.lease(run_id)
    ended = store.ended(run_id)
    return fields, None if lease is None else lease.token, None if ended is None else ended.status


@dataclass
class Outcome:
    plan: int
    done: int = 0  # steps that returned normally
    raised: bool = False  # the next step raised StoreUnavailable: applied whole, or not at all


class Stream(threading.Thread):
    """Walks fresh runs through their plans; a run whose step raises is left as it is."""

    def __init__(self, store: CheckpointStore, name: str) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.prefix = name
        self.outcomes: dict[str, Outcome] = {}
        self.ok = 0
        self.failures = 0
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                run_id, n = f"{self.prefix}-{n:06d}", n + 1
                outcome = self.outcomes[run_id] = Outcome(plan=n % len(PLANS))
                for step in PLANS[outcome.plan]:
                    try:
                        _apply(self.store, run_id, step)
                    except StoreUnavailable as exc:
                        assert isinstance(exc.cause, psycopg.Error), exc.cause
                        outcome.raised = True
                        self.failures += 1
                        break
                    outcome.done += 1
                    self.ok += 1
        except BaseException:
            self.error = traceback.format_exc()

    def wait_for(self, what: Callable[[], bool]) -> None:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not what():
            assert self.error is None, self.error
            assert self.is_alive(), "the stream stopped"
            assert time.monotonic() < deadline, "the stream made no progress"
            time.sleep(0.01)


class Terminator(threading.Thread):
    """Ends the server processes of every connection named ``victim``, again and again."""

    def __init__(self, database: str, victim: str) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.victim = victim
        self.stop = threading.Event()
        self.killed = 0
        self.error: str | None = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.database, autocommit=True) as conn:
                while not self.stop.is_set():
                    rows = conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND pid <> pg_backend_pid()",
                        (self.victim,),
                    ).fetchall()
                    self.killed += sum(1 for (ok,) in rows if ok)
                    time.sleep(rng.uniform(0.05, 0.2))
        except BaseException:
            self.error = traceback.format_exc()


@pytest.mark.slow
def test_connections_ended_by_the_server_mid_stream_leave_every_operation_whole_or_absent(
    schema: Schema,
) -> None:
    victim = f"cc-victim-{uuid4().hex[:8]}"
    url = f"{schema.url}&application_name={victim}"
    stores = [CheckpointStore.open(url, lease_seconds=3600) for _ in range(2)]
    streams = [Stream(store, f"s{i}") for i, store in enumerate(stores)]
    for stream in streams:
        stream.start()
    terminator = Terminator(schema.database, victim)
    try:
        for stream in streams:
            stream.wait_for(lambda s=stream: s.ok >= 200)
        terminator.start()
        for stream in streams:
            stream.wait_for(lambda s=stream: s.failures >= 15)
        terminator.stop.set()
        terminator.join(CHILD_TIMEOUT)
        after = [stream.ok for stream in streams]
        for stream, ok in zip(streams, after, strict=True):
            stream.wait_for(lambda s=stream, ok=ok: s.ok >= ok + 100)
    finally:
        terminator.stop.set()
        for stream in streams:
            stream.stop.set()
            stream.join(CHILD_TIMEOUT)
    assert terminator.error is None, terminator.error
    assert terminator.killed > 0
    checker = CheckpointStore.open(schema.url)
    uncertain = 0
    for stream in streams:
        assert stream.error is None, stream.error
        for run_id, outcome in stream.outcomes.items():
            plan = PLANS[outcome.plan]
            allowed = {_expected(plan, outcome.done)}
            if outcome.raised:
                uncertain += 1
                allowed.add(_expected(plan, outcome.done + 1))
            actual = _observe(checker, run_id)
            assert actual in allowed, (
                f"{run_id}: plan {plan}, {outcome.done} steps returned, "
                f"next {'raised' if outcome.raised else 'not run'}; saw {actual}, allowed {allowed}"
            )
    assert uncertain > 0
    # No half transition in the indexes and counters either.
    live = schema.sql("SELECT count(*) FROM {s}.runs WHERE status = 'paused'")[0][0]
    stats = checker.stats()
    assert stats["runs"] == checker.count() == live
    flying = schema.sql("SELECT count(*) FROM {s}.runs WHERE lease_token IS NOT NULL")[0][0]
    assert stats["in_flight"] == flying
    assert checker.recover_orphaned() == [], "leases of a live process, far from expiring"
    for store in (*stores, checker):
        store.close()


def test_connections_ended_between_operations_are_replaced_unseen(schema: Schema) -> None:
    victim = f"cc-idle-{uuid4().hex[:8]}"
    store = CheckpointStore.open(f"{schema.url}&application_name={victim}")
    store.save(_record("r1"))
    for i in range(5):
        schema.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (victim,),
        )
        time.sleep(0.05)  # the ended session's goodbye reaches the pooled socket
        run = store.claim("r1")  # a transition: sent once, on a connection checked first
        assert run is not None and run.lease is not None
        store.release("r1", run.lease.token)
        assert store.load("r1") is not None, f"round {i}"
    store.close()


def test_an_unreachable_server_raises_store_unavailable_with_the_cause() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreUnavailable) as caught:
        CheckpointStore.open(f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres")
    assert isinstance(caught.value.cause, psycopg.OperationalError)
    assert "hunter2" not in str(caught.value)
    assert "postgres:***@127.0.0.1" in str(caught.value)


def _end_sessions_mid_statement(
    schema: Schema, victim: str, run_id: str, call: Callable[[], Any]
) -> BaseException | None:
    """Run ``call`` while another session holds ``run_id``'s row, end the store's
    sessions once ``call``'s statement waits on that lock, and return what it raised."""
    raised: list[BaseException | None] = []

    def attempt() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    with psycopg.connect(schema.database) as locker:  # a transaction, held open
        locker.execute(
            f'SELECT 1 FROM "{schema.name}".runs WHERE run_id = %s FOR UPDATE', (run_id,)
        )
        caller = threading.Thread(target=attempt)
        caller.start()
        deadline = time.monotonic() + CHILD_TIMEOUT
        waiting = (
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = %s"
        )
        while not schema.sql(waiting, (victim, "Lock")):
            assert time.monotonic() < deadline and caller.is_alive(), "the call never waited"
            time.sleep(0.01)
        schema.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (victim,),
        )
        caller.join(CHILD_TIMEOUT)
        locker.rollback()
    return raised[0]


@pytest.mark.parametrize(
    "transition",
    ["claim", "heartbeat", "complete", "request_resume", "keyed save", "answer to a key"],
)
def test_a_transition_whose_session_is_ended_mid_statement_raises_and_changes_nothing(
    schema: Schema, transition: str
) -> None:
    victim = f"cc-mid-{uuid4().hex[:8]}"
    store = CheckpointStore.open(f"{schema.url}&application_name={victim}")
    assert isinstance(store, PostgresStore)
    store.save(_record("r1", key="order:1"))
    answer = ResumeRequest(request_id="evt-1", input={"paid": True}, pause_seq=0)
    token = 0
    if transition in ("heartbeat", "complete"):
        run = store.claim("r1", lease_seconds=3600)
        assert run is not None and run.lease is not None
        token = run.lease.token
    calls: dict[str, Callable[[], Any]] = {
        "claim": lambda: store.claim("r1"),
        "heartbeat": lambda: store.heartbeat("r1", token, lease_seconds=7200),
        "complete": lambda: store.complete("r1", token=token),
        "request_resume": lambda: store.request_resume("r1", {"ok": True}, "req-1"),
        # The two short transactions (under the key's lock) that pauses and answers
        # naming a business key take.
        "keyed save": lambda: store.save(_record("r1", key="order:1", step="again")),
        "answer to a key": lambda: store._answer_key("order:1", answer, 60),
    }
    before = (store.load("r1"), store.lease("r1"), store.ended("r1"))
    raised = _end_sessions_mid_statement(schema, victim, "r1", calls[transition])
    assert isinstance(raised, StoreUnavailable), raised
    assert isinstance(raised.cause, psycopg.OperationalError)
    assert (store.load("r1"), store.lease("r1"), store.ended("r1")) == before
    calls[transition]()  # the store goes on, on new connections
    store.close()


def test_a_password_never_appears_in_a_message_or_a_log_line(
    schema: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-pw"
    victim = f"cc-pw-{uuid4().hex[:8]}"
    # The server trusts local connections: the password is sent and ignored.
    url = schema.url.replace("postgres@", f"postgres:{secret}@") + f"&application_name={victim}"
    assert secret in url
    store = CheckpointStore.open(url)
    assert secret not in repr(store)
    store.save(_record("r1"))
    failed = _end_sessions_mid_statement(schema, victim, "r1", lambda: store.claim("r1"))
    assert isinstance(failed, StoreUnavailable)
    store.close()
    with pytest.raises(StoreUnavailable) as unreachable:
        CheckpointStore.open(f"{schema.url}&password={secret}".replace(":5432/", ":1/"))
    messages = [str(failed), str(unreachable.value), repr(store)]
    assert "postgres:***@" in str(failed) and "password=%2A%2A%2A" in str(unreachable.value)
    for text in [*messages, *(record.getMessage() for record in caplog.records)]:
        assert secret not in text


# -- schema versions ----------------------------------------------------------------


def test_a_database_at_an_older_schema_version_is_upgraded_on_open(schema: Schema) -> None:
    with psycopg.connect(schema.database, autocommit=True) as conn:
        assert migrate(conn, schema.name, upto=1) == 1
    # A run written as the release with only the first migration wrote it.
    old = _record("old-run", expires_at=utcnow() - timedelta(seconds=5))
    schema.sql(
        "INSERT INTO {s}.runs (run_id, record, task_name, step, pause_seq, paused_at, "
        "expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            old.run_id,
            old.model_dump_json(),
            old.task_name,
            old.step,
            old.pause_seq,
            old.paused_at,
            old.expires_at,
        ),
    )
    store = CheckpointStore.open(schema.url)
    latest = MIGRATIONS[-1].version
    versions = schema.sql("SELECT version FROM {s}.schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, latest + 1))
    assert isinstance(store, PostgresStore) and store.schema_version == latest
    assert store.load("old-run") == old
    assert store.count() == 1, "the counters were filled from the runs already there"
    assert store.due_timeouts() == ["old-run"]
    store.save(_record("new-run"))
    assert store.count() == 2
    store.close()


def test_a_schema_newer_than_the_package_is_refused(schema: Schema) -> None:
    CheckpointStore.open(schema.url).close()
    schema.sql("INSERT INTO {s}.schema_migrations (version, name) VALUES (999, 'from the future')")
    with pytest.raises(ImproperlyConfigured, match="version 999, newer than this") as caught:
        CheckpointStore.open(schema.url)
    assert "Upgrade celery-checkpoint" in str(caught.value)


def _open_and_report(url: str, start: Any, out: Any) -> None:
    try:
        start.wait(CHILD_TIMEOUT)
        store = CheckpointStore.open(url)
        store.close()
        out.put(("ok", None))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def test_workers_opening_a_new_schema_at_once_apply_each_migration_once(schema: Schema) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    start, out = ctx.Barrier(n), ctx.Queue()
    children = [
        ctx.Process(target=_open_and_report, args=(schema.url, start, out)) for _ in range(n)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=CHILD_TIMEOUT) for _ in range(n)]
    for child in children:
        child.join(CHILD_TIMEOUT)
    assert all(status == "ok" for status, _ in results), results
    versions = schema.sql("SELECT version FROM {s}.schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]


def test_the_schema_may_be_given_as_an_option_and_is_quoted(schema: Schema) -> None:
    name = "Mixed_" + schema.name  # upper case: kept as written, because it is quoted
    store = CheckpointStore.open(schema.database, schema=name)
    try:
        store.save(_record("r1"))
        found = schema.sql(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (name,)
        )
        assert found[0][0] >= 3
        with pytest.raises(ImproperlyConfigured, match="two schemas"):
            CheckpointStore.open(f"{schema.database}?schema=other", schema=name)
        with pytest.raises(ImproperlyConfigured, match="invalid schema name"):
            CheckpointStore.open(schema.database, schema='x"; DROP TABLE y; --')
    finally:
        store.close()
        schema.sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_an_option_libpq_does_not_know_is_a_configuration_error(schema: Schema) -> None:
    with pytest.raises(ImproperlyConfigured, match='invalid URI query parameter: "bogus"'):
        CheckpointStore.open(f"{schema.url}&bogus=1")


def test_libpq_options_in_the_url_reach_the_server_as_written(schema: Schema) -> None:
    # A space written %20 and an '=' written %3D: libpq decodes them, nobody else may.
    url = f"{schema.url}&options=-c%20statement_timeout%3D12345&application_name=cc%2Bopts"
    store = CheckpointStore.open(url)
    try:
        store.save(_record("r1"))
        found = schema.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cc+opts'"
        )
        assert found[0][0] >= 1, "the pool's connections carry the application name"
        assert isinstance(store, PostgresStore)
        shown = store._conn.read(
            "show", "*", lambda conn: conn.execute("SHOW statement_timeout").fetchone()
        )
        assert shown == ("12345ms",)
    finally:
        store.close()


def test_a_session_that_commits_without_waiting_for_the_disk_is_warned_about(
    schema: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint.store.postgres"):
        CheckpointStore.open(schema.url).close()
        assert not caplog.records
        CheckpointStore.open(f"{schema.url}&options=-c%20synchronous_commit%3Doff").close()
    [warning] = caplog.records
    assert "synchronous_commit = off" in warning.getMessage()


def test_a_missing_driver_names_the_extra_to_install(tmp_path: Any) -> None:
    script = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"  # what an environment without it looks like
        "from celery_checkpoint import CheckpointStore, ImproperlyConfigured\n"
        "try:\n"
        "    CheckpointStore.open('postgresql://localhost/db')\n"
        "except ImproperlyConfigured as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert "pip install 'celery-checkpoint[postgres]'" in done.stdout, done.stderr


# -- forks ---------------------------------------------------------------------------


def test_a_forked_child_gets_connections_of_its_own_and_leaves_the_parents_alone(
    schema: Schema,
) -> None:
    store = CheckpointStore.open(schema.url)
    store.save(_record("parent"))
    store.save(_record("child"))
    assert store.load("parent") is not None  # the parent's pool has a live connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: uses the store it inherited, then exits the usual way
        os.close(read)
        code = 1
        try:
            won = store.claim("child") is not None
            os.write(write, b"ok" if won else b"lost")
            store.close()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert answer == b"ok" and status == 0
    # The parent's connections were not closed by the child: its calls go on.
    for _ in range(8):
        assert store.load("parent") is not None
    lease = store.lease("child")
    assert lease is not None and lease.owner.pid == pid
    store.close()


# -- corrupt rows ----------------------------------------------------------------------


def test_a_corrupt_record_raises_for_its_run_only_and_is_moved_aside(schema: Schema) -> None:
    store = CheckpointStore.open(schema.url)
    store.save(_record("good"))
    store.save(_record("bad"))
    schema.sql("UPDATE {s}.runs SET record = '{not json' WHERE run_id = 'bad'")
    with pytest.raises(CorruptCheckpoint):
        store.load("bad")
    with pytest.raises(CorruptCheckpoint):
        store.claim("bad")
    assert store.lease("bad") is None, "the failed claim gave its lease back"
    assert store.load("good") is not None

    assert [info.run.run_id for info in store.list()] == ["good"]
    moved = schema.sql("SELECT run_id, record, row_data->>'status' FROM {s}.corrupt_runs")
    assert moved == [("bad", "{not json", "paused")]
    assert store.load("bad") is None
    assert store.count() == 1
    assert store.claim("good") is not None

    # A second corruption of the same run keeps the first copy.
    store.save(_record("bad"))
    schema.sql("""UPDATE {s}.runs SET record = '{"run_id": "someone-else"}' WHERE run_id = 'bad'""")
    assert [info.run.run_id for info in store.list()] == ["good"]
    assert len(schema.sql("SELECT 1 FROM {s}.corrupt_runs WHERE run_id = 'bad'")) == 2

    # Met by recovery: moved aside, and recovery goes on with the other runs.
    store.save(_record("orphan"))
    store.save(_record("fine"))
    assert store.claim("orphan", lease_seconds=0.1) is not None
    assert store.claim("fine", lease_seconds=0.1) is not None
    schema.sql("UPDATE {s}.runs SET record = 'garbage' WHERE run_id = 'orphan'")
    time.sleep(0.3)
    assert [run.run_id for run in store.recover_orphaned()] == ["fine"]
    assert store.load("orphan") is None
    assert len(schema.sql("SELECT 1 FROM {s}.corrupt_runs WHERE run_id = 'orphan'")) == 1
    assert store.count() == 2
    store.close()
