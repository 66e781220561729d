"""Passes over many runs of the file store: recovery, listing, counts and the
index sweeps. Each reads one directory index, never every record (``list`` aside),
and takes each run's lock only for the run it acts on."""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from ...exceptions import CorruptCheckpoint
from ...model import RunRecord, utcnow, validate_run_id
from ..base import RunFilter, RunInfo, StoreStats, make_stats
from ._records import Records

__all__ = ["Sweeps"]

logger = logging.getLogger("celery_checkpoint.store.file")


class Sweeps(Records):
    """The store's passes over its indexes; see the module docstring."""

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        recovered: builtins.list[RunRecord] = []
        with self._io("recover_orphaned", "*"):
            self._fs.sweep_tmp()
            for run_id in self._fs.names("inflight"):
                try:
                    validate_run_id(run_id)
                    run = self._recover_one(run_id)
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
                    continue
                except ValueError:
                    continue  # not one of ours
                if run is not None:
                    recovered.append(run)
        return recovered

    def _recover_one(self, run_id: str) -> RunRecord | None:
        fs = self._fs
        with fs.locked(run_id):
            try:
                run = self._read_run("paused", run_id)
            except CorruptCheckpoint as exc:
                fs.move_aside("paused", run_id, exc)
                fs.unlink("inflight", run_id)
                raise
            try:
                lease = self._read_lease(run_id)
            except CorruptCheckpoint as exc:
                # The holder, if alive, has token last_token + 1: bump past it.
                fs.move_aside("inflight", run_id, exc)
                if run is not None:
                    return self._rearm(run, run.last_token + 1)
                return None
            if lease is None:
                return None
            if run is None or lease.token <= run.last_token:
                # Completed, or re-paused/released before a crash: the paused
                # record (or its absence) is authoritative.
                fs.unlink("inflight", run_id)
                return None
            if not lease.expired(utcnow()) and not lease.owner.is_dead_here():
                return None
            return self._rearm(run, lease.token)

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        cutoff = where.cutoff
        with self._io("list", "*"):
            for run_id in self._fs.names("paused"):
                try:
                    run = self._read_run("paused", run_id)
                    lease = None if run is None else self._read_lease(run_id)
                except CorruptCheckpoint:
                    # Under the lock, re-read: a writer may have replaced the file
                    # meanwhile; only what is still corrupt is moved aside.
                    with self._fs.locked(run_id):
                        run = self._read_run_tolerant(run_id)
                        lease = None if run is None else self._read_lease_tolerant(run_id, run)
                if run is None:
                    continue  # completed while we listed, or corrupt and moved aside
                if where.matches(run, cutoff):
                    yield RunInfo(run=run, lease=self._live_lease(run, lease))

    def _count(self) -> int:
        with self._io("count", "*"):
            return sum(1 for _ in self._fs.names("paused"))

    def _stats(self) -> StoreStats:
        """Counted from the directory indexes: cheap with any number of paused runs."""
        with self._io("stats", "*"):
            runs = self._count()
            in_flight = 0
            for run_id in self._fs.names("inflight"):
                try:
                    run = self._read_run("paused", validate_run_id(run_id))
                    in_flight += self._live_lease(run, self._read_lease(run_id)) is not None
                except (CorruptCheckpoint, ValueError):
                    continue
            pending = sum(1 for _ in self._fs.names("pending"))
            return make_stats(runs, in_flight, pending, len(self._due_timeouts(None)))

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        now = time.time()
        fs = self._fs
        with self._io("due_resumes", "*"):
            for entry in fs.entries("pending"):
                try:
                    if entry.stat().st_mtime > now - older_than:
                        continue
                    run_id = validate_run_id(entry.name)
                except (FileNotFoundError, ValueError):
                    continue
                with fs.locked(run_id):
                    run = self._read_run_tolerant(run_id)
                    if (
                        run is None
                        or run.resume is None
                        or run.resume.status != "pending"
                        or self._live_lease(run, self._read_lease_tolerant(run_id, run)) is not None
                    ):
                        fs.unlink("pending", run_id, sync=False)
                        continue
                    fs.touch("pending", run_id, now)
                    due.append(run_id)
        return due

    def _prune_ended(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        pruned = 0
        fs = self._fs
        with self._io("prune_ended", "*"):
            for entry in fs.entries("ended"):
                if not entry.name.endswith(".json"):
                    continue  # corrupt copies are evidence: never pruned
                try:
                    run_id = validate_run_id(entry.name[: -len(".json")])
                    if entry.stat().st_mtime > cutoff:
                        continue
                except (FileNotFoundError, ValueError):
                    continue
                with fs.locked(run_id):
                    try:  # ended again since the scan?
                        if os.stat(fs.path("ended", run_id)).st_mtime > cutoff:
                            continue
                    except FileNotFoundError:
                        continue
                    pruned += fs.unlink("ended", run_id, sync=False)
            if pruned:
                fs.sync_dir("ended")
        return pruned

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        at = (now or utcnow()).timestamp()
        due: builtins.list[str] = []
        with self._io("due_timeouts", "*"):
            for entry in self._fs.entries("deadlines"):
                try:
                    if entry.stat().st_mtime <= at:
                        due.append(validate_run_id(entry.name))
                except (FileNotFoundError, ValueError):
                    continue
        return due

    def _next_deadline(self) -> datetime | None:
        """The smallest mtime in ``deadlines/``: one directory read, no record read."""
        earliest: float | None = None
        with self._io("next_deadline", "*"):
            for entry in self._fs.entries("deadlines"):
                try:
                    validate_run_id(entry.name)
                    when = entry.stat().st_mtime
                except (FileNotFoundError, ValueError):
                    continue
                if earliest is None or when < earliest:
                    earliest = when
        return None if earliest is None else datetime.fromtimestamp(earliest, timezone.utc)
