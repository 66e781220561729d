"""Passes over many runs of the file store: recovery, listing, counts and the
index sweeps. Each reads one directory index, never every record (``list`` aside),
and takes each run's lock only for the run it acts on."""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from ...exceptions import CorruptCheckpoint
from ...model import RunRecord, utcnow, validate_key, validate_run_id
from ..base import RunFilter, RunInfo, StoreStats, make_stats
from ._fs import STALE_TMP_SECONDS, key_name
from ._keys import Keys

__all__ = ["Sweeps"]

logger = logging.getLogger("celery_checkpoint.store.file")


class Sweeps(Keys):
    """The store's passes over its indexes; see the module docstring."""

    lease_seconds: float

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        recovered: builtins.list[RunRecord] = []
        with self._io("recover_orphaned", "*"):
            # By age only: a writer's pid proves nothing across pid namespaces.
            self._fs.sweep_tmp(max(STALE_TMP_SECONDS, 10 * self.lease_seconds))
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
                run = self._read_live(run_id)
            except CorruptCheckpoint as exc:
                fs.move_aside("paused", run_id, exc)
                fs.unlink("inflight", run_id, sync=False)
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
                # Completed or ended, or re-paused/released before a crash: the
                # paused record (or its absence) is authoritative.
                fs.unlink("inflight", run_id, sync=False)
                return None
            if not lease.expired(utcnow()) and not lease.owner.is_dead_here():
                return None
            return self._rearm(run, lease.token)

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        cutoff = where.cutoff
        with self._io("list", "*"):
            for run_id in self._fs.names("paused"):
                try:
                    run = self._read_visible(run_id)
                    lease = None if run is None else self._read_lease(run_id)
                except CorruptCheckpoint:
                    # Under the lock, re-read: a writer may have replaced the file
                    # meanwhile; only what is still corrupt is moved aside.
                    with self._fs.locked(run_id):
                        run = self._read_live(run_id, tolerant=True)
                        lease = None if run is None else self._read_lease_tolerant(run_id, run)
                if run is None:
                    continue  # ended or completed while we listed, or corrupt and moved aside
                if where.matches(run, cutoff):
                    yield RunInfo(run=run, lease=self._live_lease(run, lease))

    def _count(self) -> int:
        """Names in ``paused/`` without a tombstone beside them: no record is read."""
        with self._io("count", "*"):
            paused = sum(1 for _ in self._fs.names("paused"))
            if not paused:
                return 0
            stale = sum(
                1 for run_id in self._fs.names("ended") if self._fs.exists("paused", run_id)
            )
            return paused - stale

    def _stats(self) -> StoreStats:
        """Counted from the directory indexes: cheap with any number of paused runs."""
        with self._io("stats", "*"):
            runs = self._count()
            in_flight = 0
            for run_id in self._fs.names("inflight"):
                try:
                    run = self._read_visible(validate_run_id(run_id))
                    in_flight += self._live_lease(run, self._read_lease(run_id)) is not None
                except (CorruptCheckpoint, ValueError):
                    continue
            pending = sum(1 for _ in self._fs.names("pending"))
            return make_stats(runs, in_flight, pending, len(self._due_timeouts(None)))

    def _entries_before(self, kind: str, cutoff: float) -> Iterator[str]:
        """The run ids of ``kind`` entries last touched at or before ``cutoff``."""
        for entry in self._fs.entries(kind):
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
                run_id = validate_run_id(entry.name)
            except (FileNotFoundError, ValueError):
                continue
            yield run_id

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        now = time.time()
        fs = self._fs
        with self._io("due_resumes", "*"):
            for run_id in self._entries_before("pending", now - older_than):
                with fs.locked(run_id):
                    run = self._read_live(run_id, tolerant=True)
                    if run is None or run.resume is None or run.resume.status != "pending":
                        fs.unlink("pending", run_id, sync=False)
                        continue
                    # Not synced: an entry whose new time a power cut loses is
                    # re-sent once more, and a claim runs it once.
                    fs.touch("pending", run_id, now, durable=False)
                    if self._live_lease(run, self._read_lease_tolerant(run_id, run)) is None:
                        due.append(run_id)
                    # In flight, the entry stays (looked at again a period later):
                    # the lease is not durable, and if a power cut takes it the
                    # request must still be found.
        return due

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        now = time.time()
        fs = self._fs
        with self._io("due_deliveries", "*"):
            for run_id in self._entries_before("undelivered", now - older_than):
                with fs.locked(run_id):
                    try:
                        ended = self._read_ended(run_id)
                    except CorruptCheckpoint:
                        ended = None
                    if ended is None or ended.status != "completed" or ended.result is None:
                        fs.unlink("undelivered", run_id, sync=False)  # nothing to deliver
                        continue
                    # Not synced: a new time a power cut loses means one more delivery.
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(fs.path("undelivered", run_id), (now, now))
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
                    # A stale paused record beside the tombstone must be gone for
                    # good first, or pruning the tombstone would bring it back.
                    if fs.unlink("paused", run_id, sync=True):
                        fs.unlink("inflight", run_id, sync=False)
                        self._drop_indexes(run_id)
                    pruned += fs.unlink("ended", run_id, sync=False)
                    # After the tombstone: an entry without one is dropped anyway.
                    fs.unlink("undelivered", run_id, sync=False)
            if pruned:
                fs.sync_dir("ended")
            self._prune_keys()
        return pruned

    def _prune_keys(self) -> None:
        """Delete expired early answers (their file's mtime is their expiry) and key
        entries whose run has no live record (left by a process killed between
        ending a run and releasing its key)."""
        fs, now = self._fs, time.time()
        for entry in fs.entries("early"):
            name = entry.name
            if not name.endswith(".json"):
                continue  # corrupt copies are evidence: never pruned
            try:
                if entry.stat().st_mtime > now:
                    continue
            except FileNotFoundError:
                continue
            key = name[: -len(".json")].replace("%", "/")
            if not _is_key(key):
                continue
            with fs.locked_all(keys=(key,)):
                early = self._read_early(key)  # under the lock: a save cut short is undone
                if early is not None and early.expires <= now:
                    fs.unlink("early", key_name(key), sync=False)
        for name in fs.names("keys"):
            key = name.replace("%", "/")
            if not _is_key(key):
                continue
            holder = self._key_holder(key)
            if holder is not None and fs.exists("paused", holder):
                continue  # cheap: a live holder is not read
            self._release_key(key, holder)

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        """Deadline entries that are due, checked against their records: an entry
        the record no longer needs is dropped, one earlier than the record's
        deadline re-dated. Reads only the records of due entries."""
        at = (now or utcnow()).timestamp()
        due: builtins.list[str] = []
        fs = self._fs
        with self._io("due_timeouts", "*"):
            for entry in fs.entries("deadlines"):
                try:
                    if entry.stat().st_mtime > at:
                        continue
                    run_id = validate_run_id(entry.name)
                except (FileNotFoundError, ValueError):
                    continue
                try:
                    deadline = self._deadline_of(self._read_visible(run_id))
                except CorruptCheckpoint:
                    due.append(run_id)  # its timeout will meet the corruption and say so
                    continue
                if deadline is not None and deadline.timestamp() <= at:
                    due.append(run_id)
                    continue
                with fs.locked(run_id):  # repair, re-checked under the lock
                    deadline = self._deadline_of(self._read_live(run_id, tolerant=True))
                    if deadline is None:
                        fs.unlink("deadlines", run_id, sync=False)
                    elif deadline.timestamp() > at:
                        fs.touch("deadlines", run_id, deadline.timestamp(), durable=False)
                    else:
                        due.append(run_id)
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


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True
