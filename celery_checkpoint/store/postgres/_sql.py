"""The statements of the PostgreSQL store, one per transition.

Each transition is a single statement, so it is atomic and runs in one round
trip: a conditional ``UPDATE ... RETURNING`` whose ``WHERE`` is the transition's
rule (the current token, the run's status), or a ``WITH ... FOR UPDATE`` that
locks the run's row, decides, and returns what the caller needs to tell why it
did not apply. A statement locks one run row, or -- in the passes over many runs
(recovery, due resumes, pruning) -- takes its batch with ``FOR UPDATE SKIP
LOCKED``, which never waits: concurrent workers never deadlock, they split the
work. Every time comes from the server's clock (``now()``, the start of the
statement's transaction), never from a worker's.

``{s}`` is the store's schema; :func:`render` quotes it with ``psycopg.sql`` once,
when the store opens, so that each statement is the same bytes on every call and
the server prepares it after a few executions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._codec import ROW

if TYPE_CHECKING:
    from psycopg import Connection

__all__ = ["LIST_ORDERS", "STATEMENTS", "render", "render_list"]

_CLEAR_LEASE = (
    "lease_token = NULL, lease_owner = NULL, lease_host = NULL, "
    "lease_claimed_at = NULL, lease_expires_at = NULL"
)
# What a claim that ended without its holder (an expiry, a dead owner) leaves:
# the run paused again past the lost token, its pending request due at once.
_REARM = f"""
    last_token = r.lease_token, lease_ended_by = 'recovery', recoveries = r.recoveries + 1,
    resume_sent_at = CASE WHEN r.resume_status = 'pending' THEN 'epoch'::timestamptz
                          ELSE r.resume_sent_at END,
    {_CLEAR_LEASE}
"""
_SAVE_COLUMNS = (
    "run_id, record, status, task_name, step, pause_seq, paused_at, expires_at, on_timeout, "
    "key, last_token, lease_ended_by, recoveries, ended_reason, ended_at, result, resume, "
    "resume_id, resume_seq, resume_status, resume_error, resume_sent_at, undelivered_at"
)
_SAVE_VALUES = """
    %(run_id)s, %(record)s, %(status)s, %(task_name)s, %(step)s, %(pause_seq)s, %(paused_at)s,
    %(expires_at)s, %(on_timeout)s, %(key)s, %(last_token)s, %(lease_ended_by)s, %(recoveries)s,
    %(ended_reason)s, %(ended_at)s, %(result)s, %(resume)s, %(resume_id)s, %(resume_seq)s,
    %(resume_status)s, %(resume_error)s, CASE WHEN %(pending)s THEN now() END, NULL
"""
# The record's own columns, as a save sets them (tokens and the lease apart).
_SAVE_SET = """
    record = %(record)s, status = %(status)s, task_name = %(task_name)s, step = %(step)s,
    pause_seq = %(pause_seq)s, paused_at = %(paused_at)s, expires_at = %(expires_at)s,
    on_timeout = %(on_timeout)s, key = %(key)s, recoveries = %(recoveries)s,
    ended_reason = %(ended_reason)s, ended_at = %(ended_at)s, result = %(result)s,
    resume = %(resume)s, resume_id = %(resume_id)s, resume_seq = %(resume_seq)s,
    resume_status = %(resume_status)s, resume_error = %(resume_error)s,
    resume_sent_at = CASE WHEN %(pending)s THEN now() END, undelivered_at = NULL
"""

STATEMENTS: dict[str, str] = {
    # -- saves ------------------------------------------------------------------
    # A first or repeated pause: create or replace, unless in flight. A new run
    # under an ended one's id replaces the tombstone; its tokens go on growing.
    "save": f"""
        INSERT INTO {{s}}.runs AS r ({_SAVE_COLUMNS}) VALUES ({_SAVE_VALUES})
        ON CONFLICT (run_id) DO UPDATE SET {_SAVE_SET},
            last_token = GREATEST(EXCLUDED.last_token, r.last_token),
            lease_ended_by = EXCLUDED.lease_ended_by
        WHERE r.lease_token IS NULL
        RETURNING 1
    """,
    # A run's first pause: only if the run has no row at all.
    "save_create": f"""
        INSERT INTO {{s}}.runs ({_SAVE_COLUMNS}) VALUES ({_SAVE_VALUES})
        ON CONFLICT (run_id) DO NOTHING
        RETURNING 1
    """,
    # A re-pause by the lease holder: the record replaced and the lease ended at once.
    "save_token": f"""
        UPDATE {{s}}.runs SET {_SAVE_SET},
            last_token = lease_token, lease_ended_by = 'repause', {_CLEAR_LEASE}
        WHERE run_id = %(run_id)s AND lease_token = %(token)s
        RETURNING 1
    """,
    "save_refused": "SELECT status, lease_token FROM {s}.runs WHERE run_id = %s",
    # -- reads ------------------------------------------------------------------
    "load": f"SELECT {ROW} FROM {{s}}.runs WHERE run_id = %s AND status = 'paused'",
    "ended": f"SELECT {ROW} FROM {{s}}.runs WHERE run_id = %s AND status <> 'paused'",
    "lease": """
        SELECT lease_token, lease_owner, lease_claimed_at, lease_expires_at
        FROM {s}.runs WHERE run_id = %s AND lease_token IS NOT NULL
    """,
    "exists": "SELECT EXISTS (SELECT 1 FROM {s}.runs WHERE run_id = %s)",
    "count": "SELECT coalesce(sum(live), 0)::bigint FROM {s}.run_counts",
    # Each count reads a counter table or a partial index: none grows with paused runs.
    "stats": """
        SELECT
            (SELECT coalesce(sum(live), 0)::bigint FROM {s}.run_counts),
            (SELECT count(*) FROM {s}.runs WHERE lease_token IS NOT NULL),
            (SELECT count(*) FROM {s}.runs
                WHERE resume_status = 'pending' AND status = 'paused' AND lease_token IS NULL
                  AND resume_seq = pause_seq),
            (SELECT count(*) FROM {s}.runs
                WHERE status = 'paused' AND expires_at IS NOT NULL AND expires_at <= now())
    """,
    "due_timeouts": """
        SELECT run_id FROM {s}.runs
        WHERE status = 'paused' AND expires_at IS NOT NULL
          AND expires_at <= coalesce(%s::timestamptz, now())
        ORDER BY expires_at, run_id
    """,
    # -- claim, heartbeat, release, complete, end ---------------------------------
    "claim": f"""
        UPDATE {{s}}.runs SET
            lease_token = last_token + 1, lease_owner = %s, lease_host = %s,
            lease_claimed_at = now(), lease_expires_at = now() + %s * interval '1 second'
        WHERE run_id = %s AND status = 'paused' AND lease_token IS NULL
          AND pause_seq = coalesce(%s::integer, pause_seq)
        RETURNING {ROW}
    """,
    # A claim whose record turned out unusable gives its lease back at once.
    "unclaim": f"""
        UPDATE {{s}}.runs SET last_token = lease_token, lease_ended_by = 'release', {_CLEAR_LEASE}
        WHERE run_id = %s AND lease_token = %s
    """,
    "heartbeat": """
        UPDATE {s}.runs SET lease_expires_at = now() + %s * interval '1 second'
        WHERE run_id = %s AND lease_token = %s
        RETURNING lease_owner, lease_claimed_at, lease_expires_at
    """,
    "release": f"""
        UPDATE {{s}}.runs SET
            last_token = lease_token, lease_ended_by = 'release',
            resume_status = CASE WHEN resume_id IS NULL THEN resume_status ELSE 'failed' END,
            resume_error = CASE WHEN resume_id IS NULL THEN resume_error ELSE %s END,
            {_CLEAR_LEASE}
        WHERE run_id = %s AND lease_token = %s
        RETURNING 1
    """,
    # Without a token (NULL) any in-flight run completes; with one, only its holder's.
    "complete": f"""
        UPDATE {{s}}.runs SET
            status = 'completed', lease_ended_by = 'complete', last_token = lease_token,
            ended_at = now(), result = %s,
            undelivered_at = CASE WHEN %s::text IS NULL THEN NULL ELSE now() END,
            resume_sent_at = NULL, {_CLEAR_LEASE}
        WHERE run_id = %s AND lease_token = coalesce(%s::bigint, lease_token)
        RETURNING 1
    """,
    "complete_refused": """
        SELECT status, last_token, lease_ended_by, lease_token FROM {s}.runs WHERE run_id = %s
    """,
    "end": f"""
        UPDATE {{s}}.runs SET
            status = %s, lease_ended_by = 'cancel', ended_reason = %s, ended_at = now(),
            last_token = coalesce(lease_token, last_token), resume_sent_at = NULL, {_CLEAR_LEASE}
        WHERE run_id = %s AND status = 'paused'
          AND lease_token IS NOT DISTINCT FROM coalesce(%s::bigint, lease_token)
        RETURNING {ROW}
    """,
    "is_live": "SELECT EXISTS (SELECT 1 FROM {s}.runs WHERE run_id = %s AND status = 'paused')",
    # -- request_resume: lock the row, decide, and say why when refused -------------
    "request_resume": """
        WITH cur AS (
            SELECT run_id, status, pause_seq, step, lease_token, resume, resume_id, resume_seq,
                   resume_status, resume_error, ended_reason,
                   (on_timeout = 'expire' AND expires_at IS NOT NULL AND now() >= expires_at)
                       AS expired
            FROM {s}.runs WHERE run_id = %(run_id)s FOR UPDATE
        ), accepted AS (
            UPDATE {s}.runs r SET
                resume = %(request)s, resume_id = %(request_id)s, resume_seq = cur.pause_seq,
                resume_status = 'pending', resume_error = NULL, resume_sent_at = now()
            FROM cur
            WHERE r.run_id = cur.run_id AND cur.status = 'paused' AND cur.lease_token IS NULL
              AND cur.pause_seq = coalesce(%(pause_seq)s::integer, cur.pause_seq)
              AND NOT coalesce(cur.resume_seq = cur.pause_seq
                               AND (cur.resume_status = 'pending'
                                    OR cur.resume_id = %(request_id)s), false)
              AND NOT (cur.expired AND NOT %(timed_out)s)
            RETURNING r.run_id
        )
        SELECT EXISTS (SELECT 1 FROM accepted), c.status, c.pause_seq, c.step, c.lease_token,
               c.resume, c.resume_seq, c.resume_status, c.resume_error, c.ended_reason, c.expired
        FROM (SELECT 1) AS one LEFT JOIN cur AS c ON true
    """,
    # -- passes over many runs, in batches that skip rows others hold ---------------
    "recover_expired": f"""
        WITH due AS (
            SELECT run_id FROM {{s}}.runs
            WHERE lease_token IS NOT NULL AND lease_expires_at <= now()
            ORDER BY lease_expires_at LIMIT %s FOR UPDATE SKIP LOCKED
        )
        UPDATE {{s}}.runs r SET {_REARM}
        FROM due WHERE r.run_id = due.run_id
        RETURNING r.run_id, {", ".join(f"r.{c.strip()}" for c in ROW.split(","))}
    """,
    "host_leases": """
        SELECT run_id, lease_token, lease_owner FROM {s}.runs
        WHERE lease_token IS NOT NULL AND lease_host = %s
    """,
    # Re-arm the leases whose owner was proved dead, each only if it still holds
    # the token it was seen with (a lease taken since may belong to a live worker).
    "recover_dead": f"""
        WITH due AS (
            SELECT r.run_id FROM {{s}}.runs r
            JOIN unnest(%s::text[], %s::bigint[]) AS d (run_id, token)
              ON r.run_id = d.run_id AND r.lease_token = d.token
            ORDER BY r.run_id FOR UPDATE OF r SKIP LOCKED
        )
        UPDATE {{s}}.runs r SET {_REARM}
        FROM due WHERE r.run_id = due.run_id
        RETURNING r.run_id, {", ".join(f"r.{c.strip()}" for c in ROW.split(","))}
    """,
    # Marks each due request sent now. %s #2 bounds later batches of one pass
    # below the first batch's time, so a request it marked is not taken again.
    "due_resumes": """
        WITH due AS (
            SELECT run_id FROM {s}.runs
            WHERE resume_status = 'pending' AND status = 'paused' AND lease_token IS NULL
              AND resume_sent_at <= least(now() - %s * interval '1 second',
                                          coalesce(%s::timestamptz, 'infinity'))
            ORDER BY resume_sent_at LIMIT %s FOR UPDATE SKIP LOCKED
        )
        UPDATE {s}.runs r SET resume_sent_at = now() FROM due WHERE r.run_id = due.run_id
        RETURNING r.run_id, now()
    """,
    "prune_ended": """
        WITH old AS (
            SELECT run_id FROM {s}.runs
            WHERE status <> 'paused' AND ended_at <= now() - %s * interval '1 second'
            ORDER BY ended_at LIMIT %s FOR UPDATE SKIP LOCKED
        )
        DELETE FROM {s}.runs r USING old WHERE r.run_id = old.run_id
        RETURNING 1
    """,
    # Move a corrupt run aside, unless it changed since it was read.
    "quarantine": """
        WITH moved AS (
            DELETE FROM {s}.runs WHERE run_id = %s AND record = %s RETURNING *
        )
        INSERT INTO {s}.corrupt_runs (run_id, detail, record, row_data)
        SELECT m.run_id, %s, m.record, to_jsonb(m) FROM moved AS m
        RETURNING id
    """,
}

# -- the extensions: results kept with completions, keys, summaries, migration ------

STATEMENTS.update(
    {
        # Serialises, per business key, a pause naming it and an answer to it:
        # of the two, one sees the other's effect, never neither.
        "lock_key": "SELECT pg_advisory_xact_lock(hashtext('celery_checkpoint.key'), hashtext(%s))",
        "find_key": "SELECT run_id FROM {s}.runs WHERE key = %s AND status = 'paused'",
        "key_holder": """
            SELECT run_id FROM {s}.runs WHERE key = %s AND status = 'paused' AND run_id <> %s
        """,
        # A pause naming a key takes the early answer waiting for it, as if
        # request_resume had been called right after the save.
        "consume_early_answer": """
            WITH answer AS (
                DELETE FROM {s}.early_answers e
                WHERE e.key = %s AND e.expires_at > now() AND EXISTS (
                    SELECT 1 FROM {s}.runs r
                    WHERE r.run_id = %s AND r.status = 'paused' AND r.lease_token IS NULL
                      AND NOT coalesce(r.resume_seq = r.pause_seq
                                       AND r.resume_status = 'pending', false)
                      AND NOT (r.on_timeout = 'expire' AND r.expires_at IS NOT NULL
                               AND now() >= r.expires_at))
                RETURNING e.request, e.request_id
            )
            UPDATE {s}.runs r SET
                resume = answer.request, resume_id = answer.request_id, resume_seq = r.pause_seq,
                resume_status = 'pending', resume_error = NULL, resume_sent_at = now()
            FROM answer WHERE r.run_id = %s
            RETURNING r.resume, r.pause_seq
        """,
        "early_answer": """
            SELECT request FROM {s}.early_answers WHERE key = %s AND expires_at > now()
        """,
        # Replaces only an expired answer: the caller checked there is no live one.
        "put_early_answer": """
            INSERT INTO {s}.early_answers (key, request_id, request, expires_at)
            VALUES (%s, %s, %s, now() + %s * interval '1 second')
            ON CONFLICT (key) DO UPDATE SET
                request_id = EXCLUDED.request_id, request = EXCLUDED.request,
                created_at = now(), expires_at = EXCLUDED.expires_at
        """,
        "prune_early_answers": "DELETE FROM {s}.early_answers WHERE expires_at <= now()",
        "due_deliveries": """
            WITH due AS (
                SELECT run_id FROM {s}.runs
                WHERE undelivered_at IS NOT NULL
                  AND undelivered_at <= least(now() - %s * interval '1 second',
                                              coalesce(%s::timestamptz, 'infinity'))
                ORDER BY undelivered_at LIMIT %s FOR UPDATE SKIP LOCKED
            )
            UPDATE {s}.runs r SET undelivered_at = now() FROM due WHERE r.run_id = due.run_id
            RETURNING r.run_id, now()
        """,
        "mark_delivered": """
            UPDATE {s}.runs SET undelivered_at = NULL
            WHERE run_id = %s AND undelivered_at IS NOT NULL
        """,
        "next_deadline": """
            SELECT min(expires_at) FROM {s}.runs WHERE status = 'paused' AND expires_at IS NOT NULL
        """,
        # Per (task, step) with live runs: the counters, then one grouped pass over
        # each partial index (in flight, pending, overdue), and the oldest paused
        # run found through the step index.
        "summary": """
            WITH live AS (
                SELECT task_name, step, sum(live)::bigint AS n FROM {s}.run_counts
                GROUP BY task_name, step HAVING sum(live) > 0
            ), flying AS (
                SELECT task_name, step, count(*) AS n FROM {s}.runs
                WHERE lease_token IS NOT NULL GROUP BY task_name, step
            ), pending AS (
                SELECT task_name, step, count(*) AS n FROM {s}.runs
                WHERE resume_status = 'pending' AND status = 'paused' AND lease_token IS NULL
                  AND resume_seq = pause_seq
                GROUP BY task_name, step
            ), overdue AS (
                SELECT task_name, step, count(*) AS n FROM {s}.runs
                WHERE status = 'paused' AND expires_at IS NOT NULL AND expires_at < %s
                  AND lease_token IS NULL
                GROUP BY task_name, step
            )
            SELECT live.task_name, live.step, live.n - coalesce(flying.n, 0),
                   coalesce(flying.n, 0), coalesce(pending.n, 0), coalesce(overdue.n, 0),
                   (SELECT r.paused_at FROM {s}.runs r
                    WHERE r.status = 'paused' AND r.step = live.step
                      AND r.task_name = live.task_name AND r.lease_token IS NULL
                    ORDER BY r.paused_at LIMIT 1)
            FROM live
            LEFT JOIN flying USING (task_name, step)
            LEFT JOIN pending USING (task_name, step)
            LEFT JOIN overdue USING (task_name, step)
            ORDER BY live.task_name, live.step
        """,
        # A record written exactly as given, only where the run has no row at all.
        "restore": f"""
            INSERT INTO {{s}}.runs ({_SAVE_COLUMNS}) VALUES ({_SAVE_VALUES})
            ON CONFLICT (run_id) DO NOTHING
            RETURNING 1
        """,
        "iter_ended": f"""
            SELECT run_id, ended_at, {ROW} FROM {{s}}.runs
            WHERE status <> 'paused' AND (ended_at, run_id) > (%s, %s)
            ORDER BY ended_at, run_id LIMIT %s
        """,
    }
)

#: list() orders: the sort column, and the direction.
LIST_ORDERS: dict[str | None, tuple[str, str]] = {
    None: ("paused_at", "ASC"),
    "oldest": ("paused_at", "ASC"),
    "newest": ("paused_at", "DESC"),
    "deadline": ("expires_at", "ASC"),
}


def render(conn: Connection[Any], schema: str) -> dict[str, bytes]:
    """Every statement with the schema quoted in, as the bytes sent to the server."""
    from psycopg import sql

    ident = sql.Identifier(schema)
    return {name: sql.SQL(text).format(s=ident).as_bytes(conn) for name, text in STATEMENTS.items()}


def render_list(
    conn: Connection[Any],
    schema: str,
    order: str | None,
    *,
    task: bool,
    step: bool,
    cutoff: bool,
    after: bool,
) -> bytes:
    """One page of ``list``: the filters given, keyset pagination on (sort, run_id).

    Its parameters, in order: task, step, cutoff (seconds), the position after
    which to start (sort value, run id) and the page size.
    """
    from psycopg import sql

    column, direction = LIST_ORDERS[order]
    where = ["status = 'paused'"]
    if order == "deadline":
        where.append("expires_at IS NOT NULL")
    if task:
        where.append("task_name = %s")
    if step:
        where.append("step = %s")
    if cutoff:
        where.append("paused_at <= now() - %s * interval '1 second'")
    if after:
        where.append(f"({column}, run_id) {'<' if direction == 'DESC' else '>'} (%s, %s)")
    text = f"""
        SELECT run_id, {column}, {ROW} FROM {{s}}.runs
        WHERE {" AND ".join(where)}
        ORDER BY {column} {direction}, run_id {direction}
        LIMIT %s
    """
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_bytes(conn)
