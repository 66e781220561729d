"""The store contract every backend implements.

A run is PAUSED while only its checkpoint record exists, and IN-FLIGHT while a
lease (owner, fencing token, expiry) is attached to it. Each transition below is
atomic: of any number of concurrent callers, in any number of processes, each
sees the state before or after it, never in between.

* :meth:`claim` is the only way from PAUSED to IN-FLIGHT, and exactly one of
  any number of concurrent claims wins.
* Writes that carry a ``token`` (save, complete, release, heartbeat) fail with
  :class:`~celery_checkpoint.LeaseLost` and change nothing when the token is not
  the run's current one.
* :meth:`recover_orphaned` re-arms only leases that expired or whose owner is
  proved dead, so it is safe to call at any time from any number of processes.
"""

from __future__ import annotations

import abc
import builtins
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import JsonValue

from ..model import Lease, Owner, PausedWorkflow, ResumeRequest

__all__ = ["DEFAULT_LEASE_SECONDS", "CheckpointStore", "RunInfo"]

DEFAULT_LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class RunInfo:
    """One line of :meth:`CheckpointStore.list`: a run and whether it is in flight."""

    run: PausedWorkflow
    lease: Lease | None

    @property
    def in_flight(self) -> bool:
        return self.lease is not None


class CheckpointStore(abc.ABC):
    """A checkpoint store. ``CheckpointStore.open(target)`` picks the backend."""

    #: the URL scheme(s) this backend serves, for error messages
    url: str = ""

    def __init__(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.lease_seconds = float(lease_seconds)

    @staticmethod
    def open(target: str | os.PathLike[str], **options: Any) -> CheckpointStore:
        """Open the store at ``target``: a directory path, ``file:///abs/dir``,
        ``redis://host:port/db`` or ``rediss://...``.

        Raises ``ImproperlyConfigured`` for an unknown scheme (naming the known
        ones) and ``StoreUnavailable`` when the store cannot be reached.
        """
        from . import open_store

        return open_store(target, **options)

    # -- the contract ------------------------------------------------------

    @abc.abstractmethod
    def save(
        self, paused: PausedWorkflow, *, token: int | None = None, create: bool = False
    ) -> None:
        """Persist ``paused`` atomically and durably.

        Without ``token``: create or overwrite the run's checkpoint (a first
        pause); ``LeaseLost`` if the run is in flight. A new run under the id
        of an ended one replaces the ended record, its tokens still growing.
        ``create=True`` (a run's first pause): only if the run has no checkpoint
        at all, paused, in flight or ended; else ``CheckpointExists``, nothing changed.
        With ``token``: a re-pause by the lease holder; the new record replaces
        the old one and the lease ends in the same step. Raises
        ``LeaseLost`` (nothing changed) if ``token`` is stale, and
        ``StoreUnavailable`` on I/O failure (the previous checkpoint intact).
        """

    def exists(self, run_id: str) -> bool:
        """Whether the run has any record, paused, in flight or ended, without
        reading it. A backend overrides this with one cheap lookup."""
        return self.load(run_id) is not None or self.ended(run_id) is not None

    @abc.abstractmethod
    def load(self, run_id: str) -> PausedWorkflow | None:
        """The run's checkpoint (paused or in flight), or None. Never claims.

        Raises ``CorruptCheckpoint`` if the record cannot be parsed.
        """

    @abc.abstractmethod
    def lease(self, run_id: str) -> Lease | None:
        """The run's current lease if it is in flight, else None."""

    @abc.abstractmethod
    def claim(
        self,
        run_id: str,
        *,
        owner: Owner | None = None,
        lease_seconds: float | None = None,
        pause_seq: int | None = None,
    ) -> PausedWorkflow | None:
        """PAUSED -> IN-FLIGHT; exactly one of concurrent claims wins.

        Returns the checkpoint with ``lease`` set (token = previous + 1), or
        None when the run is unknown, already in flight, ended, or (with
        ``pause_seq``) paused at a different pause than the caller aimed at.
        """

    @abc.abstractmethod
    def request_resume(
        self,
        run_id: str,
        input: JsonValue,
        request_id: str,
        *,
        pause_seq: int | None = None,
        timed_out: bool = False,
    ) -> ResumeRequest:
        """Attach a pending resume request to a paused run (compare-and-set).

        The same ``request_id`` again returns the accepted request unchanged. A
        different one while a request is pending or the run is in flight raises
        ``AlreadyResumed``; a failed request may be replaced. Raises
        ``CheckpointNotFound`` for an unknown run, ``RunCancelled`` or
        ``PauseExpired`` for an ended one, and ``ResumeRejected`` when
        ``pause_seq`` names another pause than the current one.
        """

    @abc.abstractmethod
    def heartbeat(self, run_id: str, token: int, *, lease_seconds: float | None = None) -> Lease:
        """Extend the lease from now; ``LeaseLost`` if ``token`` is stale."""

    @abc.abstractmethod
    def complete(self, run_id: str, *, token: int | None = None) -> None:
        """The body finished: drop the in-flight run. Idempotent.

        A run whose lease already ended by a re-pause ``save`` keeps its fresh
        paused record. With a ``token`` that is not the current lease's,
        ``LeaseLost`` and nothing changes. Without one, an in-flight run is
        dropped whatever its token (an operator's action) and a run that is not
        in flight is left as it is.
        """

    @abc.abstractmethod
    def release(self, run_id: str, token: int, *, error: str | None = None) -> None:
        """The body failed: IN-FLIGHT -> PAUSED with nothing lost.

        The resume input stays (a Celery retry of the same message resumes with
        it) and the request is marked failed so recovery does not re-send it.
        """

    @abc.abstractmethod
    def recover_orphaned(self) -> builtins.list[PausedWorkflow]:
        """Re-arm in-flight runs whose lease expired or whose owner is dead.

        Returns the re-armed runs (their ``recoveries`` counter incremented).
        Touches only in-flight runs, never scans paused ones. Also removes temp
        files left by crashed writers and moves corrupt in-flight records aside.
        """

    @abc.abstractmethod
    def cancel(
        self,
        run_id: str,
        *,
        reason: str | None = None,
        status: Literal["cancelled", "expired", "failed"] = "cancelled",
        token: int | None = None,
    ) -> PausedWorkflow | None:
        """End a run for good: it leaves the paused set and is kept as ended.

        Returns the ended record, or None if there was no such run. Any lease
        is fenced: the holder's later writes raise ``LeaseLost``. With
        ``token``, only that lease holder may end the run.
        """

    @abc.abstractmethod
    def ended(self, run_id: str) -> PausedWorkflow | None:
        """The record of a cancelled, expired or failed run, or None."""

    @abc.abstractmethod
    def prune_ended(self, older_than: float) -> int:
        """Delete the records of runs that ended (completed, cancelled, expired,
        failed) over ``older_than`` seconds ago; return how many.

        An ended record is what recognises a late message for a finished run: a
        redelivered first execution, a repeated resume, a stale lease holder.
        Prune only past the point where none can still arrive (the broker's
        visibility timeout, the task's retries), or such a message starts the
        run afresh. Paused and in-flight runs and corrupt copies are never touched.
        """

    @abc.abstractmethod
    def list(
        self,
        *,
        task: str | None = None,
        step: str | None = None,
        older_than: float | None = None,
    ) -> Iterator[RunInfo]:
        """Paused and in-flight runs, streaming; ``older_than`` is seconds since paused."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many runs are paused or in flight, without reading their records."""

    @abc.abstractmethod
    def due_resumes(self, older_than: float) -> builtins.list[str]:
        """Run ids with a pending, unclaimed resume request last sent over
        ``older_than`` seconds ago; each returned id is marked sent now."""

    @abc.abstractmethod
    def due_timeouts(self, now: datetime | None = None) -> builtins.list[str]:
        """Run ids of paused runs whose ``expires_at`` has passed."""

    def stats(self) -> dict[str, int]:
        """Counts for operators: ``runs`` (paused or in flight), ``paused``,
        ``in_flight``, ``pending_resumes`` (accepted, not claimed yet) and
        ``due_timeouts`` (deadline passed, timeout not run yet).

        This default reads every record; a backend overrides it with cheap counts.
        """
        runs = in_flight = pending = 0
        for info in self.list():
            runs += 1
            request = info.run.resume
            if info.in_flight:
                in_flight += 1
            elif (
                request is not None
                and request.status == "pending"
                and request.pause_seq == info.run.pause_seq
            ):
                pending += 1
        return {
            "runs": runs,
            "paused": runs - in_flight,
            "in_flight": in_flight,
            "pending_resumes": pending,
            "due_timeouts": len(self.due_timeouts()),
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or file handles."""

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lease_seconds(self, lease_seconds: float | None) -> float:
        return self.lease_seconds if lease_seconds is None else float(lease_seconds)
