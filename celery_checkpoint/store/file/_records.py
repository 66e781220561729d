"""How one run lives on disk: reading its record and lease, tolerating corruption,
keeping its index entries, and re-arming it past a lost holder's token."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from ...exceptions import CorruptCheckpoint, LeaseLost, StoreUnavailable
from ...model import Lease, RunRecord, corrupt_detail
from ._fs import Tree

__all__ = ["Records"]

logger = logging.getLogger("celery_checkpoint.store.file")


class Records:
    """Per-run reads and writes shared by the file store's transitions and sweeps."""

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
        """The lease if it belongs to the current claim (not superseded by a later write)."""
        if lease is None or (run is not None and lease.token <= run.last_token):
            return None
        return lease

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

    def _set_indexes(self, run: RunRecord) -> None:
        """The deadline and pending-request entries of a freshly written paused record."""
        fs = self._fs
        if run.expires_at is None:
            fs.unlink("deadlines", run.run_id, sync=False)
        else:
            fs.touch("deadlines", run.run_id, run.expires_at.timestamp())
        if run.resume is not None and run.resume.status == "pending":
            fs.touch("pending", run.run_id, time.time())
        else:
            fs.unlink("pending", run.run_id, sync=False)

    def _drop_indexes(self, run_id: str) -> None:
        self._fs.unlink("pending", run_id, sync=False)
        self._fs.unlink("deadlines", run_id, sync=False)

    def _rearm(self, run: RunRecord, token: int) -> RunRecord:
        run.last_token = token
        run.lease_ended_by = "recovery"
        run.recoveries += 1
        self._fs.write("paused", run.run_id, run.to_json())
        if run.resume is not None and run.resume.status == "pending":
            self._fs.touch("pending", run.run_id, 0.0)  # due for re-sending at once
        self._fs.unlink("inflight", run.run_id)
        logger.info("re-armed orphaned run %s (recovery %d)", run.run_id, run.recoveries)
        return run

    def _check_ended_lease(self, run_id: str, run: RunRecord | None, token: int) -> None:
        """Raise LeaseLost unless ``token``'s lease ended by completing or re-pausing."""
        if run is None:
            ended = self._read_run_tolerant(run_id, kind="ended")
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
