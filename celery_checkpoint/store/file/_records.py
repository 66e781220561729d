"""How one run lives on disk: reading its record and lease, tolerating corruption,
applying the repair rules of the package docstring, keeping its index entries,
re-arming it past a lost holder's token; and the business key entry that names
it, released when the run no longer holds the key (early answers: :mod:`._keys`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from ...exceptions import CorruptCheckpoint, LeaseLost, StoreUnavailable
from ...model import Lease, RunRecord, corrupt_detail, validate_run_id
from ._fs import Tree, key_name

__all__ = ["Records"]

logger = logging.getLogger("celery_checkpoint.store.file")


class Records:
    """Per-run reads and writes shared by the file store's transitions, keys and sweeps."""

    root: Path
    _fs: Tree

    @contextlib.contextmanager
    def _io(self, action: str, run_id: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(
                f"checkpoint store {self.root}: {action} of run {run_id!r} failed", exc
            ) from exc

    def _read_run(self, kind: str, run_id: str) -> RunRecord | None:
        data = self._fs.read(kind, run_id)
        if data is None:
            return None
        try:
            run = RunRecord.from_json(data)
        except (ValidationError, ValueError) as exc:
            raise CorruptCheckpoint(run_id, corrupt_detail(exc, data)) from exc
        if run.run_id != run_id:
            raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
        return run

    def _read_lease(self, run_id: str) -> Lease | None:
        data = self._fs.read("inflight", run_id)
        if data is None:
            return None
        try:
            return Lease.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            raise CorruptCheckpoint(
                run_id, "in-flight marker: " + corrupt_detail(exc, data)
            ) from exc

    @staticmethod
    def _live_lease(run: RunRecord | None, lease: Lease | None) -> Lease | None:
        """The lease if it belongs to the current claim of a live paused record:
        not superseded by a later write, and not outliving its run."""
        if lease is None or run is None or lease.token <= run.last_token:
            return None
        return lease

    # -- the paused record, under the rule that a tombstone wins -------------------

    def _read_live(self, run_id: str, *, tolerant: bool = False) -> RunRecord | None:
        """The run's paused record; the caller holds the run's lock.

        None when there is none, or when a tombstone supersedes it: the stale
        record and its leftovers are removed then (the repair rule). A corrupt
        record raises ``CorruptCheckpoint``, or with ``tolerant`` is moved aside.
        """
        try:
            run = self._read_run("paused", run_id)
        except CorruptCheckpoint as exc:
            if self._superseded(run_id):
                return None
            if not tolerant:
                raise
            self._fs.move_aside("paused", run_id, exc)
            return None
        if run is not None and self._superseded(run_id):
            return None
        return run

    def _read_visible(self, run_id: str) -> RunRecord | None:
        """The run's paused record, read without the lock (load, lease, list).

        A record superseded by a tombstone reads as None; the repair itself is
        left to a pass under the lock (taken here only in that rare case).
        """
        fs = self._fs
        try:
            run = self._read_run("paused", run_id)
        except CorruptCheckpoint:
            if not fs.exists("ended", run_id):
                raise
            run = None
        else:
            if run is None or not fs.exists("ended", run_id):
                return run
        with fs.locked(run_id):
            self._read_live(run_id, tolerant=True)
        return None

    def _superseded(self, run_id: str) -> bool:
        """Whether a tombstone supersedes the paused record; the caller holds the
        lock. If so, the stale record, its marker and its index entries go.

        Not fsynced: a removal a power cut undoes leaves the same state, which
        the same rule repairs again.
        """
        fs = self._fs
        if not fs.exists("ended", run_id):
            return False
        if fs.unlink("paused", run_id, sync=False):
            logger.info("run %s: removed a paused record left beside its tombstone", run_id)
        fs.unlink("inflight", run_id, sync=False)
        self._drop_indexes(run_id)
        return True

    def _read_ended(self, run_id: str, *, tolerant: bool = False) -> RunRecord | None:
        """The run's tombstone. A record in ``ended/`` still marked paused is a
        completion cut short after it moved the record there: it completed, by
        the token after the record's last."""
        if tolerant:
            run = self._read_run_tolerant(run_id, kind="ended")
        else:
            run = self._read_run("ended", run_id)
        if run is not None and not run.ended:
            run.status = "completed"
            run.lease_ended_by = "complete"
            run.last_token += 1
        if run is not None and run.ended_at is None:
            # A tombstone of an older version, or a completion cut short: it
            # ended when its file was last written.
            when = self._fs.mtime("ended", run_id)
            if when is not None:
                run.ended_at = datetime.fromtimestamp(when, timezone.utc)
        return run

    # -- tolerant reads: a corrupt record must not block a transition of its own run

    def _read_run_tolerant(self, run_id: str, kind: str = "paused") -> RunRecord | None:
        try:
            return self._read_run(kind, run_id)
        except CorruptCheckpoint as exc:
            self._fs.move_aside(kind, run_id, exc)
            return None

    def _read_lease_tolerant(self, run_id: str, run: RunRecord | None) -> Lease | None:
        """The in-flight marker; a corrupt one is moved aside and the run re-armed.

        The lost holder's token is ``run.last_token + 1`` (a claim takes the next
        one): ``run``, the caller's copy read under the run's lock, is re-armed past
        it as recovery does, so the next claim cannot hand that token out again.
        """
        try:
            return self._read_lease(run_id)
        except CorruptCheckpoint as exc:
            self._fs.move_aside("inflight", run_id, exc)
            if run is not None:
                self._rearm(run, run.last_token + 1)
            return None

    # -- index entries: written before the record that needs them ---------------------

    def _indexes_before(self, run: RunRecord) -> None:
        """The entries ``run`` will need, made durable before ``run`` is written.

        A deadline entry is never later than the record's deadline: an early one
        is re-dated by ``due_timeouts``, a late one would fire late unnoticed.
        """
        self._deadline_before(run)
        if run.resume is not None and run.resume.status == "pending":
            self._fs.touch("pending", run.run_id, time.time(), durable=True)

    def _deadline_before(self, run: RunRecord) -> None:
        if run.expires_at is None:
            return
        fs, at = self._fs, run.expires_at.timestamp()
        current = fs.mtime("deadlines", run.run_id)
        if current is None:
            fs.touch("deadlines", run.run_id, at, durable=True)
        elif current > at:
            fs.backdate("deadlines", run.run_id, at)

    def _indexes_after(self, run: RunRecord) -> None:
        """Once ``run`` is written: entries it does not need go, the deadline takes
        its exact time. Not fsynced: a leftover is dropped by the sweeps, an early
        deadline re-dated."""
        fs, run_id = self._fs, run.run_id
        if run.expires_at is None:
            fs.unlink("deadlines", run_id, sync=False)
        else:
            at = run.expires_at.timestamp()
            if fs.mtime("deadlines", run_id) != at:
                fs.touch("deadlines", run_id, at, durable=False)
        if run.resume is None or run.resume.status != "pending":
            fs.unlink("pending", run_id, sync=False)

    def _drop_indexes(self, run_id: str) -> None:
        self._fs.unlink("pending", run_id, sync=False)
        self._fs.unlink("deadlines", run_id, sync=False)

    @staticmethod
    def _deadline_of(run: RunRecord | None) -> datetime | None:
        return None if run is None or run.ended else run.expires_at

    # -- recovery of one run -------------------------------------------------------------

    def _rearm(self, run: RunRecord, token: int) -> RunRecord:
        """IN-FLIGHT -> PAUSED past ``token``. The pending entry comes first (due at
        once), then the record; the marker it supersedes goes last, unsynced."""
        run.last_token = token
        run.lease_ended_by = "recovery"
        run.recoveries += 1
        fs = self._fs
        if run.resume is not None and run.resume.status == "pending":
            fs.touch("pending", run.run_id, 0.0, durable=True)  # due for re-sending at once
        self._deadline_before(run)
        fs.write("paused", run.run_id, run.to_json())
        fs.unlink("inflight", run.run_id, sync=False)
        logger.info("re-armed orphaned run %s (recovery %d)", run.run_id, run.recoveries)
        return run

    def _check_ended_lease(self, run_id: str, run: RunRecord | None, token: int) -> None:
        """Raise LeaseLost unless ``token``'s lease ended by completing or re-pausing."""
        if run is None:
            ended = self._read_ended(run_id, tolerant=True)
            if ended is not None and ended.status == "completed" and ended.last_token == token:
                return  # this holder completed it: complete() is idempotent
            if ended is not None and ended.last_token >= token:
                raise LeaseLost(run_id, f"the run was {ended.status}")
            return
        if run.last_token == token and run.lease_ended_by == "repause":
            return
        if run.last_token >= token:
            raise LeaseLost(
                run_id, f"token {token} ended by {run.lease_ended_by or 'a later claim'}"
            )
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    # -- business keys: keys/<key> names the run holding it --------------------------------

    def _key_holder(self, key: str) -> str | None:
        """The run the key's index entry names (it holds the key only if its
        record says so: see :meth:`_holds`)."""
        data = self._fs.read("keys", key_name(key))
        if not data:
            return None
        try:
            return validate_run_id(data.decode())
        except (UnicodeDecodeError, ValueError):
            return None  # not one of ours: a save of the key overwrites it

    def _holds(self, run_id: str, key: str) -> bool:
        """Whether the run's live record names ``key``. Reads without the run's
        lock and repairs nothing: a run gains a key only under the key's lock,
        which the caller holds (or, for a read, does not need)."""
        try:
            run = self._read_run("paused", run_id)
        except CorruptCheckpoint:
            return False
        return run is not None and run.key == key and not self._fs.exists("ended", run_id)

    def _release_key(self, key: str, run_id: str | None) -> None:
        """Drop the key's index entry if it names ``run_id`` (None: names no run)
        and that run no longer holds the key. Called with no lock held; a
        leftover entry is harmless (it names a run that does not hold the key)
        and is overwritten by the next pause naming the key, or pruned."""
        fs = self._fs
        with fs.locked_all(keys=[key]):
            if self._key_holder(key) == run_id and (run_id is None or not self._holds(run_id, key)):
                fs.unlink("keys", key_name(key), sync=False)
