"""What a store backend fills in: the primitives behind the public contract.

:class:`~celery_checkpoint.store.base.CheckpointStore` checks arguments once
(valid run ids and keys, a lease length in seconds) and calls these. Each is
one atomic transition or one read; the contract of each is the docstring of
the public method of the same name without its underscore. The defaults at the
bottom derive an operation from the others; a backend replaces them with a
cheaper one where it has an index.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterator
from datetime import datetime

from ..model import EndStatus, Lease, Owner, ResumeRequest, RunRecord
from ._shapes import GroupCounts, RunFilter, RunInfo, StoreStats, make_stats

__all__ = ["Backend"]


class Backend(abc.ABC):
    """The primitives a checkpoint store backend implements."""

    lease_seconds: float

    @abc.abstractmethod
    def _save(self, run: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        """Returns the early answer the save consumed for ``run.key``, if any."""

    @abc.abstractmethod
    def _load(self, run_id: str) -> RunRecord | None: ...

    @abc.abstractmethod
    def _lease(self, run_id: str) -> Lease | None: ...

    @abc.abstractmethod
    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None: ...

    @abc.abstractmethod
    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        """``request`` is the one to record, its ``pause_seq`` set to the run's."""

    @abc.abstractmethod
    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease: ...

    @abc.abstractmethod
    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None: ...

    @abc.abstractmethod
    def _due_deliveries(self, older_than: float) -> builtins.list[str]: ...

    @abc.abstractmethod
    def _mark_delivered(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def _find_key(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]: ...

    @abc.abstractmethod
    def _restore(self, run: RunRecord) -> bool: ...

    @abc.abstractmethod
    def _iter_ended(self) -> Iterator[RunRecord]: ...

    @abc.abstractmethod
    def _release(self, run_id: str, token: int, error: str | None) -> None: ...

    @abc.abstractmethod
    def _recover_orphaned(self) -> builtins.list[RunRecord]: ...

    @abc.abstractmethod
    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None: ...

    @abc.abstractmethod
    def _ended(self, run_id: str) -> RunRecord | None: ...

    @abc.abstractmethod
    def _prune_ended(self, older_than: float) -> int: ...

    @abc.abstractmethod
    def _list(self, where: RunFilter) -> Iterator[RunInfo]: ...

    @abc.abstractmethod
    def _count(self) -> int: ...

    @abc.abstractmethod
    def _due_resumes(self, older_than: float) -> builtins.list[str]: ...

    @abc.abstractmethod
    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]: ...

    @abc.abstractmethod
    def _next_deadline(self) -> datetime | None: ...

    def _exists(self, run_id: str) -> bool:
        """Default: two reads; a backend overrides it with one cheap lookup."""
        return self._load(run_id) is not None or self._ended(run_id) is not None

    def _stats(self) -> StoreStats:
        """Default: reads every record; a backend overrides it with cheap counts."""
        runs = in_flight = pending = 0
        for info in self._list(RunFilter()):
            runs += 1
            request = info.run.current_resume
            if info.in_flight:
                in_flight += 1
            elif request is not None and request.status == "pending":
                pending += 1
        return make_stats(runs, in_flight, pending, len(self._due_timeouts(None)))

    def _summary(self, now: datetime) -> builtins.list[GroupCounts]:
        """Default: reads every record; a backend overrides it with aggregate counts."""
        groups: dict[tuple[str, str], GroupCounts] = {}
        for info in self._list(RunFilter()):
            run = info.run
            group = groups.setdefault(
                (run.task_name, run.step),
                GroupCounts(
                    task=run.task_name,
                    step=run.step,
                    paused=0,
                    in_flight=0,
                    pending=0,
                    overdue=0,
                    oldest_paused_at=None,
                ),
            )
            if info.in_flight:
                group["in_flight"] += 1
                continue
            group["paused"] += 1
            request = run.current_resume
            group["pending"] += request is not None and request.status == "pending"
            group["overdue"] += run.expires_at is not None and run.expires_at <= now
            oldest = group["oldest_paused_at"]
            if oldest is None or run.paused_at < oldest:
                group["oldest_paused_at"] = run.paused_at
        return sorted(groups.values(), key=lambda g: (g["task"], g["step"]))

    def _lease_seconds(self, lease_seconds: float | None) -> float:
        return self.lease_seconds if lease_seconds is None else float(lease_seconds)
