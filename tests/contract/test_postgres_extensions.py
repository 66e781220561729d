"""PostgreSQL-only parts of the store contract's newer half: listing and reading
tombstones over more rows than one page of the store's statements, the earliest
deadline and the counts by task and step from its indexes. What every backend
shares is in ``test_store_extensions.py`` and ``test_listing.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import pytest

from celery_checkpoint.model import RunRecord, utcnow
from celery_checkpoint.store.base import Order
from celery_checkpoint.store.postgres import PostgresStore
from tests.contract.helpers import StoreFactory, make_run

pytestmark = pytest.mark.postgres

LONG = 3600.0
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def store_factory(postgres_database: str) -> Iterator[StoreFactory]:
    factory = StoreFactory("postgres", f"{postgres_database}?schema=t_{uuid4().hex}")
    yield factory
    factory.close_all()
    factory.drop_schema()


@pytest.fixture
def store(store_factory: StoreFactory) -> PostgresStore:
    opened = store_factory()
    assert isinstance(opened, PostgresStore)
    return opened


def claimed(store: PostgresStore, run_id: str, **kwargs: Any) -> int:
    run = store.claim(run_id, **kwargs)
    assert run is not None and run.lease is not None
    return run.lease.token


# -- the earliest deadline -----------------------------------------------------------------


def test_the_next_deadline_is_the_earliest_of_the_live_runs(store: PostgresStore) -> None:
    assert store.next_deadline() is None
    store.save(make_run("none"))
    assert store.next_deadline() is None
    soon, later = EPOCH + timedelta(hours=1), EPOCH + timedelta(hours=2)
    store.save(make_run("later", expires_at=later))
    store.save(make_run("soon", expires_at=soon))
    assert store.next_deadline() == soon
    store.cancel("soon")
    assert store.next_deadline() == later


# -- ordered listing with a cursor --------------------------------------------------------


def test_list_streams_in_order_and_resumes_after_a_position(store: PostgresStore) -> None:
    runs = []
    for i in range(450):  # more than one internal page
        paused_at = EPOCH + timedelta(minutes=i // 3)  # ties, broken by run id
        deadline = None if i % 4 == 0 else EPOCH + timedelta(days=1, minutes=(i * 7) % 50)
        task = "shop.ship" if i % 2 else "shop.bill"
        run = make_run(f"r{i:03d}", paused_at=paused_at, expires_at=deadline, task_name=task)
        runs.append(run)
        store.save(run)
    oldest = sorted(runs, key=lambda r: (r.paused_at, r.run_id))
    expected: dict[Order, list[RunRecord]] = {
        "oldest": oldest,
        "newest": oldest[::-1],
        "deadline": sorted(
            (r for r in runs if r.expires_at is not None),
            key=lambda r: (r.expires_at or EPOCH, r.run_id),
        ),
    }
    for order, want in expected.items():
        got = [info.run.run_id for info in store.list(order=order)]
        assert got == [r.run_id for r in want], order
        # Page by page from a cursor, as an API does.
        pages: list[str] = []
        after: tuple[str, str] | None = None
        while True:
            listing = store.list(order=order, after=after)
            page = [info for _, info in zip(range(37), listing, strict=False)]
            if not page:
                break
            pages += [info.run.run_id for info in page]
            after = page[-1].position(order)
        assert pages == [r.run_id for r in want], f"{order}, paged"
    bills = [info.run.run_id for info in store.list(task="shop.bill", order="newest")]
    assert bills == [r.run_id for r in expected["newest"] if r.task_name == "shop.bill"]


# -- counts by task and step ---------------------------------------------------------------


def test_the_summary_counts_each_task_and_step_from_the_indexes(store: PostgresStore) -> None:
    now = utcnow()
    old = now - timedelta(hours=3)
    store.save(make_run("a1", task_name="t.a", step="s1", paused_at=old))
    store.save(make_run("a2", task_name="t.a", step="s1", expires_at=now - timedelta(seconds=5)))
    store.save(make_run("a3", task_name="t.a", step="s1"))
    store.save(make_run("a4", task_name="t.a", step="s2"))
    store.save(make_run("b1", task_name="t.b", step="s1", expires_at=now - timedelta(hours=1)))
    store.save(make_run("gone", task_name="t.c", step="s1"))
    store.cancel("gone")
    store.request_resume("a3", None, "req-1")
    claimed(store, "a1", lease_seconds=LONG)
    claimed(store, "b1", lease_seconds=LONG)
    rows = {(g["task"], g["step"]): g for g in store.summary(now)}
    assert set(rows) == {("t.a", "s1"), ("t.a", "s2"), ("t.b", "s1")}
    a1 = rows["t.a", "s1"]
    assert (a1["paused"], a1["in_flight"], a1["pending"], a1["overdue"]) == (2, 1, 1, 1)
    a2 = store.load("a2")
    assert a2 is not None and a1["oldest_paused_at"] == a2.paused_at, "in-flight a1 not counted"
    b1 = rows["t.b", "s1"]
    assert (b1["paused"], b1["in_flight"], b1["overdue"], b1["oldest_paused_at"]) == (0, 1, 0, None)
    assert rows["t.a", "s2"]["paused"] == 1


# -- reading tombstones over several pages ----------------------------------------------------


def test_iter_ended_reads_every_tombstone_in_order_of_their_end(store: PostgresStore) -> None:
    for i in range(230):  # more than one page
        store.save(make_run(f"e{i:03d}"))
        store.cancel(f"e{i:03d}")
    store.save(make_run("alive"))
    ended = list(store.iter_ended())
    assert [r.run_id for r in ended] == [f"e{i:03d}" for i in range(230)]
