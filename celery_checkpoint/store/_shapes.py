"""The shapes the store contract speaks in: listing rows and filters, counts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, TypedDict

from ..model import Lease, RunRecord, utcnow

__all__ = [
    "GroupCounts",
    "Order",
    "RunFilter",
    "RunInfo",
    "StoreStats",
    "make_stats",
    "sort_in_memory",
]

#: How ``list`` orders runs: by when they paused (oldest or newest first), or by
#: deadline (soonest first; runs without one are left out). None: any order.
Order = Literal["oldest", "newest", "deadline"]


@dataclass(frozen=True)
class RunInfo:
    """One row of :meth:`CheckpointStore.list`: a run's record and its live lease."""

    run: RunRecord
    lease: Lease | None

    @property
    def in_flight(self) -> bool:
        return self.lease is not None

    def position(self, order: Order) -> tuple[str, str]:
        """Where this row sits in ``order``: give it as ``after=`` to continue past it."""
        when = self.run.expires_at if order == "deadline" else self.run.paused_at
        if when is None:
            raise ValueError(f"run {self.run.run_id!r} has no deadline to order by")
        return when.isoformat(), self.run.run_id


class StoreStats(TypedDict):
    """What :meth:`CheckpointStore.stats` counts."""

    runs: int  #: paused or in flight
    paused: int
    in_flight: int
    pending_resumes: int  #: accepted, not claimed yet
    due_timeouts: int  #: deadline passed, timeout not run yet


class GroupCounts(TypedDict):
    """The live runs of one task at one step (:meth:`CheckpointStore.summary`)."""

    task: str
    step: str
    paused: int  #: paused, not in flight
    in_flight: int
    pending: int  #: paused with an accepted answer not claimed yet
    overdue: int  #: paused past their deadline
    oldest_paused_at: datetime | None


def make_stats(runs: int, in_flight: int, pending: int, due_timeouts: int) -> StoreStats:
    """The one shape of :meth:`CheckpointStore.stats`."""
    return StoreStats(
        runs=runs,
        paused=runs - in_flight,
        in_flight=in_flight,
        pending_resumes=pending,
        due_timeouts=due_timeouts,
    )


@dataclass(frozen=True)
class RunFilter:
    """The filters and order of :meth:`CheckpointStore.list`; one place decides what matches."""

    task: str | None = None
    step: str | None = None
    older_than: float | None = None  #: seconds since the run paused
    order: Order | None = None
    #: start strictly after this row of ``order`` (see :meth:`RunInfo.position`)
    after: tuple[str, str] | None = None

    @property
    def cutoff(self) -> datetime | None:
        """Runs paused after this instant are too young to list."""
        if self.older_than is None:
            return None
        return utcnow() - timedelta(seconds=self.older_than)

    def matches(self, run: RunRecord, cutoff: datetime | None) -> bool:
        if self.task is not None and run.task_name != self.task:
            return False
        if self.step is not None and run.step != self.step:
            return False
        if self.order == "deadline" and run.expires_at is None:
            return False
        return cutoff is None or run.paused_at <= cutoff

    def unordered(self) -> RunFilter:
        return replace(self, order=None, after=None)


def sort_in_memory(rows: list[RunInfo], where: RunFilter) -> list[RunInfo]:
    """``rows`` in ``where.order`` from ``where.after`` on: for a backend without an index."""
    order = where.order
    if order is None:
        return rows

    def key(info: RunInfo) -> tuple[datetime, str]:
        when, run_id = info.position(order)
        return datetime.fromisoformat(when), run_id

    newest = order == "newest"
    rows = sorted(
        (r for r in rows if order != "deadline" or r.run.expires_at), key=key, reverse=newest
    )
    if where.after is not None:
        start = (datetime.fromisoformat(where.after[0]), where.after[1])
        rows = [r for r in rows if (key(r) < start if newest else key(r) > start)]
    return rows
