"""The tables of a PostgreSQL store and the migrations that build them.

``MIGRATIONS`` is the ordered history of the schema. Each entry is applied once,
in order, and recorded in ``schema_migrations``; a released migration is never
edited, a change is a new one at the end. Opening a store brings its schema up
to the newest version under an advisory lock, so several workers opening at
once apply each migration exactly once, and refuses a schema newer than this
package knows (written by a newer release) with ``ImproperlyConfigured``.
Pending migrations run in one transaction: a failed one leaves the schema at
its previous version. One that builds an index holds writes to the table back
while it runs, which on a large table can take a while: roll a new release out
when that pause is acceptable.

In the statements ``{s}`` is the store's schema, quoted by ``psycopg.sql``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from psycopg import Connection

__all__ = ["MIGRATIONS", "SCHEMA_NAME", "current_version", "migrate"]

#: What a schema name may be: it is quoted anyway, and it also names the
#: advisory lock and appears inside function bodies.
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


_RUNS = (
    # One row per run: paused, in flight (lease_* set) or ended (a tombstone).
    # ``record`` is the RunRecord JSON exactly as saved (TEXT, not JSONB: JSONB
    # would reorder the user's keys and refuses "\u0000" in strings); the
    # columns after it are what transitions change without rewriting it, and
    # override the record's fields of the same names when it is read.
    """
    CREATE TABLE {s}.runs (
        run_id           text PRIMARY KEY,
        record           text NOT NULL,
        status           text NOT NULL DEFAULT 'paused' CHECK
                             (status IN ('paused', 'completed', 'cancelled', 'expired', 'failed')),
        task_name        text NOT NULL,
        step             text NOT NULL,
        pause_seq        integer NOT NULL,
        paused_at        timestamptz NOT NULL,
        expires_at       timestamptz,
        on_timeout       text NOT NULL DEFAULT 'expire' CHECK (on_timeout IN ('expire', 'resume')),
        key              text,
        last_token       bigint NOT NULL DEFAULT 0,
        lease_ended_by   text CHECK (lease_ended_by IN
                             ('repause', 'release', 'recovery', 'cancel', 'complete')),
        recoveries       integer NOT NULL DEFAULT 0,
        ended_reason     text,
        ended_at         timestamptz,
        result           text,
        undelivered_at   timestamptz,
        resume           text,
        resume_id        text,
        resume_seq       integer,
        resume_status    text CHECK (resume_status IN ('pending', 'failed')),
        resume_error     text,
        resume_sent_at   timestamptz,
        lease_token      bigint,
        lease_owner      text,
        lease_host       text,
        lease_claimed_at timestamptz,
        lease_expires_at timestamptz,
        CONSTRAINT only_live_runs_fly CHECK (lease_token IS NULL OR status = 'paused'),
        CONSTRAINT a_lease_is_the_next_claim
            CHECK (lease_token IS NULL OR lease_token > last_token),
        CONSTRAINT ended_runs_say_when CHECK (status = 'paused' OR ended_at IS NOT NULL)
    )
    """,
    # Records that did not parse, moved aside as evidence; never pruned.
    """
    CREATE TABLE {s}.corrupt_runs (
        id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id    text NOT NULL,
        moved_at  timestamptz NOT NULL DEFAULT now(),
        detail    text NOT NULL,
        record    text NOT NULL,
        row_data  jsonb NOT NULL
    )
    """,
    # Every index below is partial: each pass reads only the runs it concerns,
    # never the paused runs at large.
    # list(): by age, by task, by step (keyset pagination on (paused_at, run_id)).
    "CREATE INDEX runs_paused ON {s}.runs (paused_at, run_id) WHERE status = 'paused'",
    "CREATE INDEX runs_task ON {s}.runs (task_name, paused_at, run_id) WHERE status = 'paused'",
    "CREATE INDEX runs_step ON {s}.runs (step, paused_at, run_id) WHERE status = 'paused'",
    # due_timeouts(), the earliest deadline, list() by deadline.
    """
    CREATE INDEX runs_deadline ON {s}.runs (expires_at, run_id)
        WHERE status = 'paused' AND expires_at IS NOT NULL
    """,
    # recover_orphaned(): leases by expiry, and the leases held by one host.
    "CREATE INDEX runs_in_flight ON {s}.runs (lease_expires_at) WHERE lease_token IS NOT NULL",
    "CREATE INDEX runs_lease_host ON {s}.runs (lease_host) WHERE lease_token IS NOT NULL",
    # due_resumes(): accepted requests no worker holds, by when they were last sent.
    """
    CREATE INDEX runs_pending ON {s}.runs (resume_sent_at)
        WHERE resume_status = 'pending' AND status = 'paused' AND lease_token IS NULL
    """,
    # prune_ended() and the walk over tombstones.
    "CREATE INDEX runs_ended ON {s}.runs (ended_at, run_id) WHERE status <> 'paused'",
)

_COUNTS = (
    # How many live runs each (task, step) has, kept by triggers so that count()
    # and stats() read a few rows instead of every paused run. Each database
    # session adds to its own stripe (its pid modulo 16), so concurrent writers
    # seldom wait on the same counter row.
    """
    CREATE TABLE {s}.run_counts (
        task_name text NOT NULL,
        step      text NOT NULL,
        stripe    smallint NOT NULL,
        live      bigint NOT NULL,
        PRIMARY KEY (task_name, step, stripe)
    )
    """,
    """
    CREATE FUNCTION {s}.count_live_runs() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
        IF TG_OP <> 'INSERT' AND OLD.status = 'paused' THEN
            INSERT INTO {s}.run_counts AS c
                VALUES (OLD.task_name, OLD.step, pg_backend_pid() % 16, -1)
            ON CONFLICT (task_name, step, stripe) DO UPDATE SET live = c.live - 1;
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.status = 'paused' THEN
            INSERT INTO {s}.run_counts AS c
                VALUES (NEW.task_name, NEW.step, pg_backend_pid() % 16, 1)
            ON CONFLICT (task_name, step, stripe) DO UPDATE SET live = c.live + 1;
        END IF;
        RETURN NULL;
    END
    $body$
    """,
    # The triggers first: they lock the table against writers until the backfill
    # below commits, so no run is counted twice or missed.
    """
    CREATE TRIGGER runs_count_insert AFTER INSERT ON {s}.runs
        FOR EACH ROW WHEN (NEW.status = 'paused') EXECUTE FUNCTION {s}.count_live_runs()
    """,
    """
    CREATE TRIGGER runs_count_delete AFTER DELETE ON {s}.runs
        FOR EACH ROW WHEN (OLD.status = 'paused') EXECUTE FUNCTION {s}.count_live_runs()
    """,
    """
    CREATE TRIGGER runs_count_update AFTER UPDATE OF status, task_name, step ON {s}.runs
        FOR EACH ROW WHEN (
            (OLD.status = 'paused' OR NEW.status = 'paused')
            AND (OLD.status, OLD.task_name, OLD.step) IS DISTINCT FROM
                (NEW.status, NEW.task_name, NEW.step)
        ) EXECUTE FUNCTION {s}.count_live_runs()
    """,
    """
    INSERT INTO {s}.run_counts (task_name, step, stripe, live)
        SELECT task_name, step, 0, count(*) FROM {s}.runs WHERE status = 'paused'
        GROUP BY task_name, step
    """,
)

_KEYS = (
    # A business key names at most one live run.
    """
    CREATE UNIQUE INDEX runs_key ON {s}.runs (key)
        WHERE status = 'paused' AND key IS NOT NULL
    """,
    # Completed runs whose result was not delivered yet, by when last tried.
    "CREATE INDEX runs_undelivered ON {s}.runs (undelivered_at) WHERE undelivered_at IS NOT NULL",
    # Answers that came for a key before any run paused under it.
    """
    CREATE TABLE {s}.early_answers (
        key         text PRIMARY KEY,
        request_id  text NOT NULL,
        request     text NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now(),
        expires_at  timestamptz NOT NULL
    )
    """,
    "CREATE INDEX early_answers_expiry ON {s}.early_answers (expires_at)",
)

#: The schema's history, oldest first.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs", _RUNS),
    Migration(2, "live run counts", _COUNTS),
    Migration(3, "business keys, early answers, undelivered results", _KEYS),
)

_LOCK = "SELECT pg_advisory_xact_lock(hashtext('celery_checkpoint.schema'), hashtext(%s))"


def _compose(template: str, schema: str) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(s=sql.Identifier(schema))


def current_version(conn: Connection[Any], schema: str) -> int | None:
    """The schema's version, or None if the store's tables were never created there."""
    table = _compose("{s}.schema_migrations", schema).as_string(conn)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if row is None or not row[0]:
        return None
    query = _compose("SELECT coalesce(max(version), 0) FROM {s}.schema_migrations", schema)
    found = conn.execute(query).fetchone()
    return 0 if found is None else int(found[0])


def _refuse_newer(version: int, schema: str) -> None:
    latest = MIGRATIONS[-1].version
    if version > latest:
        raise ImproperlyConfigured(
            f"the checkpoint store schema {schema!r} is at version {version}, newer than this "
            f"celery-checkpoint knows (up to {latest}): a newer release wrote it. Upgrade "
            "celery-checkpoint on this machine, or give this store another ?schema="
        )


def migrate(conn: Connection[Any], schema: str, *, upto: int | None = None) -> int:
    """Bring ``schema`` up to the newest version (or ``upto``); return the version.

    ``conn`` is an autocommit connection. The migrations run in one transaction
    under an advisory lock on the schema's name: concurrent openers wait, then
    find the work done.
    """
    target = MIGRATIONS[-1].version if upto is None else upto
    found = current_version(conn, schema)
    if found is not None:
        _refuse_newer(found, schema)
        if found >= target:
            return found
    with conn.transaction():
        conn.execute(_LOCK, (schema,))
        conn.execute(_compose("CREATE SCHEMA IF NOT EXISTS {s}", schema))
        conn.execute(
            _compose(
                """
                CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """,
                schema,
            )
        )
        version = current_version(conn, schema) or 0
        _refuse_newer(version, schema)
        record = _compose(
            "INSERT INTO {s}.schema_migrations (version, name) VALUES (%s, %s)", schema
        )
        for migration in MIGRATIONS:
            if version < migration.version <= target:
                for statement in migration.statements:
                    conn.execute(_compose(statement, schema))
                conn.execute(record, (migration.version, migration.name))
                version = migration.version
    return version
