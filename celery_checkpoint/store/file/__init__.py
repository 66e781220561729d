"""The file store: one directory on a local POSIX filesystem, no server.

Layout under the store directory::

    paused/<run_id>.json     the checkpoint (authoritative while the run exists)
    inflight/<run_id>.json   the lease of a claimed run: token, owner, expiry
    pending/<run_id>         a resume request waiting for a worker (mtime: last sent)
    deadlines/<run_id>       a pause with a timeout (mtime: when it expires, or earlier)
    ended/<run_id>.json      completed, cancelled, expired and failed runs (mtime: when
                             they ended; ``prune_ended`` deletes old ones)
    tmp/                     files being written; renamed into place when whole
    locks/NNN.lock           striped ``flock`` locks serialising each run's transitions

Every write goes to a uniquely named file in ``tmp/``, is fsynced, renamed into
place and the directory fsynced, so a reader sees the old record or the new one
and a returned write survives a power cut. Transitions of one run hold its
stripe's ``flock``, which the kernel releases when a process dies, so a
``SIGKILL`` never leaves a lock behind. The filesystem work lives in
:mod:`._fs`, per-run reads and the repair rules in :mod:`._records`, the passes
over many runs in :mod:`._sweeps`; this module holds the transitions.

**Crash safety.** A transition that touches several files orders its steps so
that a process killed at any system call leaves the run as it was, as the
transition leaves it, or in one of the states below, which the next read or
recovery pass treats as one of those two and repairs:

* *A tombstone wins.* While ``ended/<id>.json`` exists the run has ended; a
  ``paused/<id>.json`` beside it is stale (an ``end`` killed after its
  tombstone, a removal a power cut undid, or a ``save`` of a new run under an
  ended id killed before it dropped the old tombstone) and reads as absent everywhere: claim,
  request_resume, save, load, lease, list, count, recovery and the sweeps. The
  first of them to hold the run's lock deletes it with its marker and index
  entries. ``end`` therefore writes the tombstone durably first; ``save`` writes
  the new record first and drops the tombstone durably after; ``prune_ended``
  deletes a stale record durably before its tombstone.
* *A completion moves the record.* ``complete`` renames the paused record (its
  bytes durable since it was written) into ``ended/`` and fsyncs that directory,
  then rewrites it as the completed tombstone without an fsync. A record in
  ``ended/`` still marked paused is read as completed by the token after its
  ``last_token`` (the only token a claim of it hands out).
* *The record fences the lease.* A marker in ``inflight/`` counts only while its
  token is above the paused record's ``last_token``. Re-pause, release, recovery
  and complete write the record (or tombstone) first; a marker left behind is
  dead, and recovery drops it.
* *Index entries lead.* A pending entry exists whenever the record has a pending
  request (in flight too: a lease is not durable), and a deadline entry
  whenever it has a deadline, never later than it: each is created (durably)
  before the record that needs it, and removed (not synced) after the record
  that no longer does. ``due_resumes`` drops entries whose record has no
  pending request (or is ended or gone), ``due_timeouts`` drops deadline
  entries whose record has no deadline and re-dates early ones, and recovery
  puts a re-armed run's entries back.
* *Temp files are never read.* A writer killed mid-write leaves a file in
  ``tmp/``; recovery removes those older than an hour, or ten lease lengths if
  that is longer (by age, never by pid: a writer in another pid namespace may
  still be writing).

What is fsynced is what must survive a power cut once the call returned: the
record and its directory, a tombstone and its directory, a new index entry's
directory, and the removal of a tombstone a new run replaced. Removals a power
cut may undo are left unsynced when the rules above make the undone state
equivalent. Leases are not fsynced: they only matter while their holder lives.

**Privacy.** Directories are created 0700 and files 0600 whatever the umask:
records hold task arguments and answers, and no other local user may read them
or hold a lock file. Opening a store another user can reach (made by an older
version, or in a directory created with a loose umask) logs a warning saying
how to fix it.

Recovery lists only ``inflight/`` and ``tmp/``: its cost does not grow with the
number of paused runs.

Needs a local filesystem: ``flock``, ``rename`` and ``fsync`` are not
trustworthy on NFS or SMB, and such mounts are refused. For several machines use
the Redis store.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    LeaseLost,
    ResumeRejected,
)
from ...model import (
    DEFAULT_LEASE_SECONDS,
    EndStatus,
    Lease,
    Owner,
    ResumeRequest,
    RunRecord,
    utcnow,
)
from ..base import CheckpointStore
from ._fs import Tree
from ._sweeps import Sweeps

__all__ = ["FileStore"]

logger = logging.getLogger("celery_checkpoint.store.file")


class FileStore(Sweeps, CheckpointStore):
    """Checkpoints as JSON files in a directory. See the module docstring."""

    url = "file://"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        fsync: bool = True,
        allow_network_fs: bool = False,
    ) -> None:
        super().__init__(lease_seconds=lease_seconds)
        if isinstance(fsync, str):
            fsync = fsync.lower() not in ("0", "false", "no", "off")
        self.root = Path(directory).expanduser().absolute()
        #: False skips every fsync: faster, and a power cut may lose or tear
        #: recent writes. Never turn it off where checkpoints matter.
        self.fsync = bool(fsync)
        self._fs = Tree(self.root, fsync=self.fsync, allow_network_fs=allow_network_fs)

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- transitions -----------------------------------------------------------

    def _save(self, run: RunRecord, token: int | None, create: bool) -> None:
        run_id, fs = run.run_id, self._fs
        with self._io("save", run_id), fs.locked(run_id):
            if create:
                if fs.exists("ended", run_id):
                    raise CheckpointExists(run_id, "ended")
                if fs.exists("paused", run_id):
                    raise CheckpointExists(run_id, "paused")
            current = self._read_live(run_id, tolerant=True)
            lease = self._read_lease_tolerant(run_id, current)
            live = self._live_lease(current, lease)
            # A shallow copy: only top-level fields are set below, so the caller's
            # object is untouched without deep-copying the user's state on every save.
            record = run.model_copy()
            record.lease = None
            ended = None
            if token is not None:
                if live is None or live.token != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
                record.last_token = token
                record.lease_ended_by = "repause"
            else:
                if live is not None:
                    raise LeaseLost(
                        run_id, f"the run is in flight under token {live.token}; save with it"
                    )
                if current is not None:
                    record.last_token = max(record.last_token, current.last_token)
                # A new run under the id of an ended one: its tokens go on growing.
                ended = self._read_ended(run_id, tolerant=True)
                if ended is not None:
                    record.last_token = max(record.last_token, ended.last_token)
            self._indexes_before(record)
            fs.write("paused", run_id, record.to_json())
            if ended is not None:
                # Durably: a tombstone a power cut brought back would win over
                # the record this save returned.
                fs.unlink("ended", run_id, sync=True)
            self._indexes_after(record)
            if lease is not None:
                fs.unlink("inflight", run_id, sync=False)  # dead: token <= last_token

    def _exists(self, run_id: str) -> bool:
        with self._io("exists", run_id):
            return self._fs.exists("paused", run_id) or self._fs.exists("ended", run_id)

    def _load(self, run_id: str) -> RunRecord | None:
        with self._io("load", run_id):
            return self._read_visible(run_id)

    def _lease(self, run_id: str) -> Lease | None:
        with self._io("lease", run_id):
            run = self._read_visible(run_id)
            return None if run is None else self._live_lease(run, self._read_lease(run_id))

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        with self._io("claim", run_id), self._fs.locked(run_id):
            run = self._read_live(run_id)
            if run is None or run.ended:
                return None
            if pause_seq is not None and run.pause_seq != pause_seq:
                return None
            if self._live_lease(run, self._read_lease_tolerant(run_id, run)) is not None:
                return None
            now = utcnow()
            lease = Lease(
                token=run.last_token + 1,
                owner=owner or Owner.current(),
                claimed_at=now,
                expires_at=now + timedelta(seconds=lease_seconds),
            )
            # The lease is not fsynced: it only matters while its holder lives,
            # and a power cut kills every holder on this machine. A lease lost
            # that way leaves the run PAUSED with its request pending (it runs
            # again, as a recovered run would); a torn one is moved aside and
            # the run re-armed past its token. Either way nothing is lost.
            self._fs.write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            # The pending entry stays: if this lease is lost to a power cut, the
            # request must still be found and re-sent.
            run.lease = lease
            return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        request_id = request.request_id
        fs = self._fs
        with self._io("request_resume", run_id), fs.locked(run_id):
            run = self._read_live(run_id)
            if run is None:
                ended = self._read_ended(run_id, tolerant=True)
                if ended is None:
                    raise CheckpointNotFound(run_id)
                done = ended.resume if ended.status == "completed" else None
                if done is not None and done.request_id == request_id:
                    return done  # the same resume again, after it ran to completion
                raise ended.ended_error()
            if pause_seq is not None and pause_seq != run.pause_seq:
                raise ResumeRejected(
                    run_id,
                    f"the resume aims at pause {pause_seq} but the run is at pause "
                    f"{run.pause_seq} (step {run.step!r})",
                )
            pending = run.current_resume
            if pending is not None and pending.request_id == request_id:
                return pending
            # In flight with no request of this pause (a timeout or a redelivery
            # claimed it): accepting would be lost when the holder completes.
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if pending is not None and (pending.status == "pending" or live is not None):
                raise AlreadyResumed(run_id, pending.request_id)
            if live is not None:
                raise AlreadyResumed(run_id, f"<none: in flight under token {live.token}>")
            request = request.model_copy(update={"pause_seq": run.pause_seq})
            run.resume = request
            # The entry first: a request on the record with no entry would never
            # be re-sent; an entry with no request is dropped by due_resumes.
            fs.touch("pending", run_id, time.time(), durable=True)
            fs.write("paused", run_id, run.to_json())
            return request

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        with self._io("heartbeat", run_id), self._fs.locked(run_id):
            lease = self._live_lease(self._read_live(run_id), self._read_lease(run_id))
            if lease is None or lease.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            lease = lease.model_copy(
                update={"expires_at": utcnow() + timedelta(seconds=lease_seconds)}
            )
            self._fs.write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            return lease

    def _complete(self, run_id: str, token: int | None) -> None:
        fs = self._fs
        with self._io("complete", run_id), fs.locked(run_id):
            run = self._read_live(run_id, tolerant=True)
            lease = self._read_lease_tolerant(run_id, run)
            live = self._live_lease(run, lease)
            if token is not None:
                if live is None:
                    self._check_ended_lease(run_id, run, token)
                    if lease is not None and run is None:
                        fs.unlink("inflight", run_id, sync=False)
                    return  # completed already, or re-paused by this very holder
                if live.token != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
            if run is None or live is None:
                # Not in flight: a paused record (a fresh re-pause) stays as it is.
                if lease is not None:
                    fs.unlink("inflight", run_id, sync=False)
                return
            # The tombstone first and durably: from here on the run has completed
            # (a tombstone wins over a paused record), even after a power cut, so
            # a redelivered message, a late writer and a repeated resume see it.
            run.status = "completed"
            run.lease_ended_by = "complete"
            if live.token == run.last_token + 1:
                # The paused record's bytes are durable already: moved into ended/
                # they are the tombstone at the cost of one directory fsync, and
                # read as completed by the next token until rewritten just below.
                fs.move("paused", "ended", run_id)
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json(), durable=False)
            else:  # not a lease a claim of this record handed out: spell it all out
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json())
                fs.unlink("paused", run_id, sync=False)
            self._drop_indexes(run_id)
            fs.unlink("inflight", run_id, sync=False)

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        fs = self._fs
        with self._io("release", run_id), fs.locked(run_id):
            run = self._read_live(run_id)
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if run is None or live is None or live.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            run.last_token = token
            run.lease_ended_by = "release"
            if run.resume is not None:
                run.resume.status = "failed"
                run.resume.error = error
            fs.write("paused", run_id, run.to_json())
            fs.unlink("inflight", run_id, sync=False)  # dead: token <= last_token
            fs.unlink("pending", run_id, sync=False)  # a failed request is not re-sent

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        fs = self._fs
        with self._io("end", run_id), fs.locked(run_id):
            run = self._read_live(run_id)
            if run is None:
                return None
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if token is not None and (live is None or live.token != token):
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            if live is not None:
                run.last_token = live.token  # fence the holder
            run.lease_ended_by = "cancel"
            run.status = status
            run.ended_reason = reason
            # The tombstone first and durably; what it supersedes goes after.
            fs.write("ended", run_id, run.to_json())
            fs.unlink("paused", run_id, sync=False)
            self._drop_indexes(run_id)
            fs.unlink("inflight", run_id, sync=False)
            return run

    def _ended(self, run_id: str) -> RunRecord | None:
        with self._io("ended", run_id):
            return self._read_ended(run_id)
