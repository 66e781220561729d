"""The SQLite store's tables, built by an ordered list of migrations.

Each migration runs once per database, inside the transaction that records it
in ``schema_migrations`` (version, name, applied_at), so a crash mid-upgrade
leaves the database at the previous version and the next open tries again.
A newer package opens an older database and upgrades it; an older package
refuses a database whose schema it does not know, rather than misreading it.
Migrations are only ever appended: a released one never changes.

Times are integer microseconds since the Unix epoch (UTC), so ordering and
equality are exact. Tables after every migration::

    runs            one row per run: paused or in flight (status 'paused') or ended
                    (a tombstone: 'completed', 'cancelled', 'expired', 'failed').
                    ``record`` is the RunRecord JSON as saved, without its resume
                    request and lease; the columns after it are authoritative for
                    the fields that transitions change and override the JSON.
                    The lease columns are set exactly while the run is in flight.
    corrupt         rows that could not be parsed, moved aside as they were
    early_answers   answers that arrived for a business key before its pause
    schema_migrations

Every index that a background pass reads is partial, so recovery, due
timeouts, due resumes and undelivered results cost what they find, never
what is paused.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from ...exceptions import ImproperlyConfigured

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "migrate", "schema_version"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    #: Python work after the SQL, in the same transaction (e.g. a backfill).
    then: Callable[[sqlite3.Connection], None] | None = None


_V1 = """
CREATE TABLE runs (
    run_id          TEXT PRIMARY KEY NOT NULL,
    status          TEXT NOT NULL,
    record          BLOB NOT NULL,
    task_name       TEXT NOT NULL,
    step            TEXT NOT NULL,
    pause_seq       INTEGER NOT NULL,
    paused_at       INTEGER NOT NULL,
    expires_at      INTEGER,
    last_token      INTEGER NOT NULL DEFAULT 0,
    lease_ended_by  TEXT,
    recoveries      INTEGER NOT NULL DEFAULT 0,
    ended_reason    TEXT,
    ended_at        INTEGER,
    resume          BLOB,
    resume_seq      INTEGER,
    resume_status   TEXT,
    resume_sent_at  INTEGER,
    lease_token     INTEGER,
    lease_owner     BLOB,
    lease_host      TEXT,
    lease_claimed   INTEGER,
    lease_expires   INTEGER
);
-- list(): by age, and by task and step, over live runs only
CREATE INDEX runs_paused_at ON runs (paused_at, run_id) WHERE status = 'paused';
CREATE INDEX runs_task_step ON runs (task_name, step, paused_at, run_id)
    WHERE status = 'paused';
-- due_timeouts() and list by deadline
CREATE INDEX runs_deadline ON runs (expires_at, run_id)
    WHERE status = 'paused' AND expires_at IS NOT NULL;
-- due_resumes(): pending requests by when they were last sent
CREATE INDEX runs_pending ON runs (resume_sent_at) WHERE resume_sent_at IS NOT NULL;
-- recover_orphaned(): in-flight runs (a handful: one per busy worker slot) by lease expiry
CREATE INDEX runs_in_flight ON runs (lease_expires) WHERE lease_token IS NOT NULL;
-- prune_ended(): tombstones by when they ended
CREATE INDEX runs_ended ON runs (ended_at, run_id) WHERE status <> 'paused';

CREATE TABLE corrupt (
    id          INTEGER PRIMARY KEY,
    run_id      TEXT NOT NULL,
    moved_at    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    status      TEXT,
    last_token  INTEGER,
    record      BLOB,
    resume      BLOB,
    lease_owner BLOB
);
CREATE INDEX corrupt_run ON corrupt (run_id);
"""

_V2 = """
ALTER TABLE runs ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'expire';
ALTER TABLE runs ADD COLUMN key TEXT;
ALTER TABLE runs ADD COLUMN result TEXT;
ALTER TABLE runs ADD COLUMN undelivered_at INTEGER;
-- Not UNIQUE: databases of version 1 never enforced it; save() does.
CREATE INDEX runs_key ON runs (key) WHERE key IS NOT NULL AND status = 'paused';
CREATE INDEX runs_undelivered ON runs (undelivered_at) WHERE undelivered_at IS NOT NULL;

CREATE TABLE early_answers (
    key         TEXT PRIMARY KEY NOT NULL,
    request     BLOB NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX early_answers_expiry ON early_answers (expires_at);
"""


def _backfill_v2(conn: sqlite3.Connection) -> None:
    """Copy ``on_timeout``, ``key`` and ``result`` out of the records written before."""
    rows = conn.execute("SELECT run_id, record FROM runs").fetchall()
    for run_id, record in rows:
        try:
            fields = json.loads(record)
        except (ValueError, TypeError):
            continue  # a corrupt record is moved aside when it is next read
        if not isinstance(fields, dict):
            continue
        on_timeout = fields.get("on_timeout")
        key, result = fields.get("key"), fields.get("result")
        conn.execute(
            "UPDATE runs SET on_timeout = ?, key = ?, result = ? WHERE run_id = ?",
            (
                on_timeout if on_timeout in ("expire", "resume") else "expire",
                key if isinstance(key, str) else None,
                result if isinstance(result, str) else None,
                run_id,
            ),
        )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs and corrupt copies", _V1),
    Migration(
        2, "deadline rule, business keys, early answers, results kept", _V2, then=_backfill_v2
    ),
)
#: The schema this package writes.
SCHEMA_VERSION = MIGRATIONS[-1].version

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    applied_at  TEXT NOT NULL
)
"""


def schema_version(conn: sqlite3.Connection) -> int:
    """The highest migration recorded in the database; 0 for a new one."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, *, where: str, upto: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the database up to version ``upto``; return (version before, after).

    A database already at ``upto`` is only read (no write lock). Otherwise the
    work runs in one ``BEGIN IMMEDIATE`` transaction (the caller's connection is
    in autocommit mode), so two processes opening a new database at once apply
    each migration once. Raises ``ImproperlyConfigured`` for a newer schema.
    """
    current = schema_version(conn)
    _refuse_newer(current, where)
    if current >= upto:
        return current, current
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_BOOKKEEPING)
        before = schema_version(conn)
        _refuse_newer(before, where)
        for migration in MIGRATIONS:
            if before < migration.version <= upto:
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                if migration.then is not None:
                    migration.then(conn)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (
                        migration.version,
                        migration.name,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    ),
                )
        after = schema_version(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return before, after


def _refuse_newer(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise ImproperlyConfigured(
            f"checkpoint store {where}: this database was written by a newer "
            f"celery-checkpoint (schema {version}); this package knows schema "
            f"{SCHEMA_VERSION} at most: upgrade the package"
        )


def _statements(script: str) -> list[str]:
    """Split a migration's SQL into statements (no ``;`` appears inside one)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
