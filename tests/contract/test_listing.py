"""Listing in order with a cursor, and the counts by task and step: every backend."""

from __future__ import annotations

from datetime import timedelta

import pytest

from celery_checkpoint import CheckpointStore
from celery_checkpoint.model import utcnow
from tests.contract.helpers import make_run


def _fill(store: CheckpointStore) -> list[str]:
    """Seven runs paused a minute apart (r0 oldest); odd ones have a deadline, soonest last."""
    now = utcnow()
    ids = []
    for i in range(7):
        run_id = f"r{i}"
        store.save(
            make_run(
                run_id,
                task_name="shop.ship" if i % 3 else "shop.bill",
                step="approve",
                paused_at=now - timedelta(minutes=10 - i),
                expires_at=(now + timedelta(hours=10 - i)) if i % 2 else None,
            )
        )
        ids.append(run_id)
    return ids


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("oldest", ["r0", "r1", "r2", "r3", "r4", "r5", "r6"]),
        ("newest", ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]),
        ("deadline", ["r5", "r3", "r1"]),
    ],
)
def test_list_orders_rows_and_pages_with_the_position_of_the_last_row(
    store: CheckpointStore, order: str, expected: list[str]
) -> None:
    _fill(store)
    assert [i.run.run_id for i in store.list(order=order)] == expected  # type: ignore[arg-type]
    pages: list[list[str]] = []
    after = None
    while True:
        rows = []
        for info in store.list(order=order, after=after):  # type: ignore[arg-type]
            rows.append(info)
            if len(rows) == 3:
                break
        if not rows:
            break
        pages.append([r.run.run_id for r in rows])
        after = rows[-1].position(order)  # type: ignore[arg-type]
    assert [run_id for page in pages for run_id in page] == expected
    assert all(len(page) <= 3 for page in pages)


def test_ordered_listing_keeps_the_filters(store: CheckpointStore) -> None:
    _fill(store)
    rows = store.list(task="shop.bill", order="oldest")
    assert [i.run.run_id for i in rows] == ["r0", "r3", "r6"]
    assert [i.run.run_id for i in store.list(order="newest", older_than=7 * 60 + 30)] == [
        "r2",
        "r1",
        "r0",
    ]


def test_after_without_an_order_is_refused(store: CheckpointStore) -> None:
    with pytest.raises(ValueError, match="needs an order"):
        store.list(after=("2026-01-01T00:00:00+00:00", "r1"))


def test_summary_counts_live_runs_by_task_and_step(store: CheckpointStore) -> None:
    now = utcnow()
    store.save(make_run("a", task_name="t1", step="s", paused_at=now - timedelta(hours=2)))
    store.save(make_run("b", task_name="t1", step="s", expires_at=now - timedelta(seconds=1)))
    store.save(make_run("c", task_name="t1", step="other"))
    store.save(make_run("d", task_name="t2", step="s"))
    store.request_resume("d", {"ok": True}, "req-d")
    store.save(make_run("e", task_name="t2", step="s"))
    assert store.claim("e") is not None
    store.save(make_run("f", task_name="t2", step="s"))
    store.end("f", "cancelled")

    groups = {(g["task"], g["step"]): g for g in store.summary()}
    assert set(groups) == {("t1", "s"), ("t1", "other"), ("t2", "s")}
    t1 = groups[("t1", "s")]
    assert (t1["paused"], t1["in_flight"], t1["pending"], t1["overdue"]) == (2, 0, 0, 1)
    assert t1["oldest_paused_at"] is not None
    assert abs((t1["oldest_paused_at"] - (now - timedelta(hours=2))).total_seconds()) < 1
    t2 = groups[("t2", "s")]
    assert (t2["paused"], t2["in_flight"], t2["pending"], t2["overdue"]) == (1, 1, 1, 0)
