"""The contract's operations over many runs: listing and counting them, and the
passes a worker makes over them (recovery, due resumes, timeouts and deliveries,
pruning).

:class:`~celery_checkpoint.store.base.CheckpointStore` inherits these; like its
own methods they check their arguments once and call the backend's primitive of
the same name. Each reads an index (or a counter), never every paused run.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from datetime import datetime

from ..model import RunRecord, utcnow
from ._backend import Backend
from ._shapes import GroupCounts, Order, RunFilter, RunInfo, StoreStats, sort_in_memory

__all__ = ["Passes"]


class Passes(Backend):
    """Listing, counting and the passes over many runs (see the module docstring)."""

    #: whether ``_list`` itself honours ``RunFilter.order`` and ``after`` (from an
    #: index); otherwise the rows are sorted in memory
    ordered_listing: bool = False

    def due_deliveries(self, older_than: float) -> builtins.list[str]:
        """Runs completed with a result that no worker has said was delivered,
        completed (or last returned here) over ``older_than`` seconds ago; each
        returned id is marked returned now, as :meth:`due_resumes` does."""
        return self._due_deliveries(float(older_than))

    def recover_orphaned(self) -> builtins.list[RunRecord]:
        """Re-arm in-flight runs whose lease expired or whose owner is dead.

        Returns the re-armed runs (their ``recoveries`` counter incremented).
        Touches only in-flight runs, never scans paused ones. Also removes temp
        files left by crashed writers and moves corrupt in-flight records aside.
        """
        return self._recover_orphaned()

    def prune_ended(self, older_than: float) -> int:
        """Delete the records of runs that ended (completed, cancelled, expired,
        failed) over ``older_than`` seconds ago; return how many.

        An ended record is what recognises a late message for a finished run: a
        redelivered first execution, a repeated resume, a stale lease holder.
        Prune only past the point where none can still arrive (the broker's
        visibility timeout, the task's retries), or such a message starts the
        run afresh. Paused and in-flight runs and corrupt copies are never touched.
        """
        if not older_than >= 0:
            raise ValueError(f"older_than must be >= 0 seconds, not {older_than!r}")
        return self._prune_ended(float(older_than))

    def list(
        self,
        *,
        task: str | None = None,
        step: str | None = None,
        older_than: float | None = None,
        order: Order | None = None,
        after: tuple[str, str] | None = None,
    ) -> Iterator[RunInfo]:
        """Paused and in-flight runs; ``older_than`` is seconds since paused.

        Without ``order`` the rows stream in the store's own order, starting at
        once. ``order="oldest"``/``"newest"`` sorts by when the run paused,
        ``"deadline"`` lists runs with a deadline, soonest first; ``after`` (a
        row's :meth:`RunInfo.position`) continues past that row, for paging.
        """
        if after is not None and order is None:
            raise ValueError("list(after=...) needs an order")
        where = RunFilter(task=task, step=step, older_than=older_than, order=order, after=after)
        if order is None or self.ordered_listing:
            return self._list(where)
        return iter(sort_in_memory(builtins.list(self._list(where.unordered())), where))

    def count(self) -> int:
        """How many runs are paused or in flight, without reading their records."""
        return self._count()

    def due_resumes(self, older_than: float) -> builtins.list[str]:
        """Run ids with a pending, unclaimed resume request last sent over
        ``older_than`` seconds ago; each returned id is marked sent now."""
        return self._due_resumes(float(older_than))

    def due_timeouts(self, now: datetime | None = None) -> builtins.list[str]:
        """Run ids of paused runs whose ``expires_at`` has passed."""
        return self._due_timeouts(now)

    def next_deadline(self) -> datetime | None:
        """The earliest ``expires_at`` among paused runs with a deadline, or None.

        Read from the deadline index, never by reading records, so a worker may
        ask after every recovery pass and every timeout it fires. A run whose
        timeout already fired, or that was answered but has not ended yet, may
        still be listed: the caller re-checks the run before acting on it.
        """
        return self._next_deadline()

    def stats(self) -> StoreStats:
        """Counts for operators: ``runs`` (paused or in flight), ``paused``,
        ``in_flight``, ``pending_resumes`` (accepted, not claimed yet) and
        ``due_timeouts`` (deadline passed, timeout not run yet)."""
        return self._stats()

    def iter_ended(self) -> Iterator[RunRecord]:
        """Every ended run's record (tombstone), streaming."""
        return self._iter_ended()

    def summary(self, now: datetime | None = None) -> builtins.list[GroupCounts]:
        """The live runs counted by task and step (paused, in flight, pending an
        answer, overdue) with the oldest pause of each: what metrics export."""
        return self._summary(now or utcnow())
