"""SQLite-only parts of the store contract's newer half: listing and reading
tombstones over more rows than one page of the store's statements, the earliest
deadline and the counts by task and step from its indexes. What every backend
shares is in ``test_store_extensions.py`` and ``test_listing.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import PausedWorkflow
from celery_checkpoint.model import utcnow
from celery_checkpoint.store.base import Order
from celery_checkpoint.store.sqlite import SqliteStore
from celery_checkpoint.store.sqlite._sweeps import PAGE
from tests.contract.helpers import make_run

LONG = 3600.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "store.db")
    yield opened
    opened.close()


def claimed_token(store: SqliteStore, run_id: str) -> int:
    run = store.claim(run_id, lease_seconds=LONG)
    assert run is not None and run.lease is not None
    return int(run.lease.token)


# -- the earliest deadline ------------------------------------------------------------------


def test_next_deadline_is_the_earliest_among_paused_runs(store: SqliteStore) -> None:
    assert store.next_deadline() is None
    now = utcnow().replace(microsecond=0)
    store.save(make_run("later", expires_at=now + timedelta(hours=2)))
    store.save(make_run("sooner", expires_at=now + timedelta(hours=1)))
    store.save(make_run("none"))
    assert store.next_deadline() == now + timedelta(hours=1)
    store.cancel("sooner")
    assert store.next_deadline() == now + timedelta(hours=2)


# -- ordered listing with a cursor, over several pages ---------------------------------------


def page_through(store: SqliteStore, order: Order, size: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page = []
        for info in store.list(order=order, after=after, **filters):
            page.append(info)
            if len(page) == size:
                break
        seen += [info.run.run_id for info in page]
        if len(page) < size:
            return seen
        after = page[-1].position(order)


def test_listing_in_order_pages_with_a_cursor(store: SqliteStore) -> None:
    base = utcnow().replace(microsecond=0) - timedelta(days=1)
    runs: list[PausedWorkflow] = []
    count = 2 * PAGE + 50
    for i in range(count):
        # Ties on the time are broken by the run id.
        at = base + timedelta(seconds=i // 3)
        runs.append(
            make_run(
                f"r{(i * 7919) % count:03d}",
                paused_at=at,
                expires_at=None if i % 5 == 0 else at + timedelta(hours=count - i),
                task_name="shop.ship" if i % 2 else "shop.bill",
            )
        )
    for run in runs:
        store.save(run)
    oldest = [r.run_id for r in sorted(runs, key=lambda r: (r.paused_at, r.run_id))]
    assert [i.run.run_id for i in store.list(order="oldest")] == oldest
    assert page_through(store, "oldest", 37) == oldest
    assert page_through(store, "newest", 50) == oldest[::-1]
    with_deadline = [r for r in runs if r.expires_at is not None]
    by_deadline = [r.run_id for r in sorted(with_deadline, key=lambda r: (r.expires_at, r.run_id))]
    assert page_through(store, "deadline", 64) == by_deadline
    shipped = [
        r.run_id
        for r in sorted(runs, key=lambda r: (r.paused_at, r.run_id))
        if r.task_name == "shop.ship"
    ]
    assert page_through(store, "oldest", 40, task="shop.ship") == shipped


# -- counts by task and step --------------------------------------------------------------------


def test_summary_counts_live_runs_by_task_and_step(store: SqliteStore) -> None:
    now = utcnow().replace(microsecond=0)
    old = now - timedelta(hours=3)
    store.save(make_run("a", task_name="t1", step="s1", paused_at=old))
    store.save(make_run("b", task_name="t1", step="s1", expires_at=now - timedelta(minutes=1)))
    store.save(make_run("c", task_name="t1", step="s1"))
    store.save(make_run("d", task_name="t1", step="s2"))
    store.save(make_run("e", task_name="t2", step="s1", paused_at=old))
    store.request_resume("c", "go", "req-c")
    claimed_token(store, "a")
    claimed_token(store, "e")
    store.save(make_run("gone", task_name="t1", step="s1"))
    store.cancel("gone")
    groups = {(g["task"], g["step"]): g for g in store.summary(now)}
    assert set(groups) == {("t1", "s1"), ("t1", "s2"), ("t2", "s1")}
    g = groups[("t1", "s1")]
    assert (g["paused"], g["in_flight"], g["pending"], g["overdue"]) == (2, 1, 1, 1)
    assert g["oldest_paused_at"] is not None and g["oldest_paused_at"] > old
    e = groups[("t2", "s1")]
    assert (e["paused"], e["in_flight"], e["oldest_paused_at"]) == (0, 1, None)


# -- reading tombstones over several pages ----------------------------------------------------


def test_iter_ended_reads_every_tombstone_in_order_of_their_end(store: SqliteStore) -> None:
    count = PAGE + 30
    for i in range(count):
        store.save(make_run(f"r{i:03d}"))
        if i % 2:
            store.cancel(f"r{i:03d}")
        else:
            store.complete(f"r{i:03d}", token=claimed_token(store, f"r{i:03d}"))
    store.save(make_run("still-paused"))
    ended = list(store.iter_ended())
    assert [run.run_id for run in ended] == [f"r{i:03d}" for i in range(count)]
    assert all(isinstance(run.ended_at, datetime) for run in ended)
