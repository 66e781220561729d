"""The file store: one directory on a local POSIX filesystem, no server.

Layout under the store directory::

    paused/<run_id>.json     the checkpoint (authoritative while the run exists)
    inflight/<run_id>.json   the lease of a claimed run: token, owner, expiry
    pending/<run_id>         a resume request waiting for a worker (mtime: last sent)
    deadlines/<run_id>       a pause with a timeout (mtime: when it expires, or earlier)
    ended/<run_id>.json      completed, cancelled, expired and failed runs (mtime: when
                             they ended; ``prune_ended`` deletes old ones)
    undelivered/<run_id>     a completed run whose result no worker said was delivered
                             (mtime: when completed, or last returned by due_deliveries)
    keys/<key>               the run a business key names (its content); the key holds
                             only while that run's live record names the key too
    early/<key>.json         an answer that came for a key before its pause (mtime:
                             when it expires)
    tmp/                     files being written; renamed into place when whole
    locks/NNN.lock           striped ``flock`` locks serialising each run's transitions,
                             and each business key's

A business key becomes a file name with its ``/`` written ``%`` (no key holds a
``%``): one to one, and no longer than the key (hex or base32 would pass the
255 bytes a file name may have).

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
* *A key entry is a pointer, the record the truth.* ``keys/<key>`` counts only
  while the run it names has a live record naming the key. A save naming a key
  writes the entry (durably) before the record; ending a run, or a pause that
  drops or changes its key, removes the entry after the record, unsynced. A
  leftover entry names a run that does not hold the key: it is overwritten by
  the next pause naming the key, and removed by ``prune_ended`` once that run
  has no live record. A transition on
  a key holds the key's stripe lock and, for a save or an answer, the run's:
  always through one call that takes the stripes in ascending order, so two of
  them never wait for each other.
* *An early answer leaves in the rename that brings its pause in.* A save that
  takes ``early/<key>.json`` first replaces it by its new record (with the
  answer attached, and the answer itself under an extra field), then renames
  that file to ``paused/<run_id>.json``: there is no instant where the answer
  is in both places or in neither. A process killed between the two renames
  leaves a record in ``early/``; whoever reads the key's early answer next (under
  the key's lock) puts the answer back as it was: the save did not happen.
* *A result is durable before its completion returns.* ``complete`` with a result
  creates ``undelivered/<run_id>`` (durably), then writes the tombstone holding
  the result in full and durably (not the cheaper move of the paused record).
  An entry without a completed tombstone is dropped by ``due_deliveries``.
* *Temp files are never read.* A writer killed mid-write leaves a file in
  ``tmp/``; recovery removes those older than an hour, or ten lease lengths if
  that is longer (by age, never by pid: a writer in another pid namespace may
  still be writing).

What is fsynced is what must survive a power cut once the call returned: the
record and its directory, a tombstone and its directory, a new index entry's
directory, a key entry and an early answer with theirs, both directories of an
early answer a pause took, and the removal of a tombstone a new run replaced. Removals a power
cut may undo are left unsynced when the rules above make the undone state
equivalent. Leases are not fsynced: they only matter while their holder lives.

**Privacy.** Directories are created 0700 and files 0600 whatever the umask:
records hold task arguments and answers, and no other local user may read them
or hold a lock file. Opening a store another user can reach (made by an older
version, or in a directory created with a loose umask) logs a warning saying
how to fix it.

Recovery lists only ``inflight/`` and ``tmp/``: its cost does not grow with the
number of paused runs. ``due_deliveries`` lists ``undelivered/``; ``prune_ended``
lists ``ended/``, ``early/`` and ``keys/``.

Times are the local clock's: the deadline in ``request_resume`` (an answer to an
expiring pause at or after its ``expires_at`` raises ``PauseExpired``), the
expiry of early answers, the time a result waits for delivery.

Needs a local filesystem: ``flock``, ``rename`` and ``fsync`` are not
trustworthy on NFS or SMB, and such mounts are refused. For several machines use
the Redis store.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from ...exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
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
    validate_run_id,
)
from ..base import CheckpointStore
from ._fs import Tree, key_name
from ._records import EARLY_FIELD, Early
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

    def _save(self, run: RunRecord, token: int | None, create: bool) -> ResumeRequest | None:
        run_id, fs, key = run.run_id, self._fs, run.key
        lock = fs.locked(run_id) if key is None else fs.locked_all((run_id,), (key,))
        with self._io("save", run_id), lock:
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
            early = None if key is None else self._take_key(record, key)
            self._indexes_before(record)
            if early is None:
                fs.write("paused", run_id, record.to_json())
            else:
                # The answer leaves early/ in the rename that brings the record in.
                data = record.to_json()
                data = data[:-1] + f',"{EARLY_FIELD}":'.encode() + early.raw + b"}"
                fs.write_through(("early", key_name(key or "")), ("paused", run_id), data)
            if ended is not None:
                # Durably: a tombstone a power cut brought back would win over
                # the record this save returned.
                fs.unlink("ended", run_id, sync=True)
            self._indexes_after(record)
            if lease is not None:
                fs.unlink("inflight", run_id, sync=False)  # dead: token <= last_token
        if current is not None and current.key is not None and current.key != key:
            self._release_key(current.key, run_id)
        return None if early is None else record.resume

    def _take_key(self, record: RunRecord, key: str) -> Early | None:
        """The key's part of a save, under the run's and the key's locks: refuse a
        key another live run holds, point the key's entry at this run (before the
        record, durably), and pick the early answer this pause consumes, attached
        to ``record`` as its pending request."""
        fs, run_id = self._fs, record.run_id
        holder = self._key_holder(key)
        if holder is not None and holder != run_id and self._holds(holder, key):
            raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
        early = self._read_early(key)
        if early is not None and not self._consumes(record, early):
            early = None
        if holder != run_id:
            fs.write("keys", key_name(key), run_id.encode())
        if early is not None:
            record.resume = early.request.model_copy(
                update={"pause_seq": record.pause_seq, "status": "pending", "error": None}
            )
        return early

    @staticmethod
    def _consumes(record: RunRecord, early: Early) -> bool:
        """Whether the pause takes the early answer: as ``request_resume`` right
        after the save would accept it (no pending request of this pause, the
        deadline of an expiring pause not passed), and the answer is unexpired."""
        now = utcnow()
        if early.expires <= now.timestamp():
            return False
        current = record.current_resume
        if current is not None and current.status == "pending":
            return False
        deadline = record.expires_at
        return not (record.on_timeout == "expire" and deadline is not None and now >= deadline)

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
        with self._io("request_resume", run_id), self._fs.locked(run_id):
            return self._resume_locked(run_id, request, pause_seq)

    def _resume_locked(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        """request_resume with the run's lock held (answer_key shares it)."""
        request_id = request.request_id
        fs = self._fs
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
        # Past the deadline of an expiring pause only the timer's own request
        # gets in: any other answer is too late, whatever else it would meet.
        deadline = run.expires_at
        if (
            not request.timed_out
            and run.on_timeout == "expire"
            and deadline is not None
            and utcnow() >= deadline
        ):
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {run.step!r} at "
                f"{deadline.isoformat()}: the answer came too late"
            )
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

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
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
            run.ended_at = utcnow()
            run.result = result
            if result is not None:
                # A result to deliver: its entry leads (an entry without a
                # completed tombstone is dropped by due_deliveries), and the
                # tombstone holding it is written out whole, durably.
                fs.touch("undelivered", run_id, time.time(), durable=True)
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json())
                fs.unlink("paused", run_id, sync=False)
            elif live.token == run.last_token + 1:
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
        if run.key is not None:
            self._release_key(run.key, run_id)

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        now = time.time()
        fs = self._fs
        with self._io("due_deliveries", "*"):
            for entry in fs.entries("undelivered"):
                try:
                    if entry.stat().st_mtime > now - older_than:
                        continue
                    run_id = validate_run_id(entry.name)
                except (FileNotFoundError, ValueError):
                    continue
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

    def _mark_delivered(self, run_id: str) -> None:
        # Under the lock: due_deliveries re-dates entries it found.
        with self._io("mark_delivered", run_id), self._fs.locked(run_id):
            self._fs.unlink("undelivered", run_id, sync=False)

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
            run.ended_at = utcnow()
            # The tombstone first and durably; what it supersedes goes after.
            fs.write("ended", run_id, run.to_json())
            fs.unlink("paused", run_id, sync=False)
            self._drop_indexes(run_id)
            fs.unlink("inflight", run_id, sync=False)
        if run.key is not None:
            self._release_key(run.key, run_id)
        return run

    def _ended(self, run_id: str) -> RunRecord | None:
        with self._io("ended", run_id):
            return self._read_ended(run_id)

    # -- business keys -------------------------------------------------------------

    def _find_key(self, key: str) -> str | None:
        with self._io("find_key", key):
            holder = self._key_holder(key)
            return holder if holder is not None and self._holds(holder, key) else None

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        fs = self._fs
        with self._io("answer_key", key):
            while True:
                holder = self._key_holder(key)
                runs = () if holder is None else (holder,)
                # The key's lock and its holder's, in the one order every caller
                # takes them: a save naming the key waits, or has finished.
                with fs.locked_all(runs, (key,)):
                    if self._key_holder(key) != holder:
                        continue  # another run took the key meanwhile: lock that one
                    if holder is not None and self._holds(holder, key):
                        return holder, self._resume_locked(holder, request, None)
                    early = self._read_early(key)
                    now = time.time()
                    if early is not None and early.expires > now:
                        if early.request.request_id == request.request_id:
                            return None, early.request
                        raise AlreadyResumed(key, early.request.request_id)
                    self._write_early(key, request, now + ttl)
                    return None, request

    # -- moving runs between stores ------------------------------------------------

    def _restore(self, run: RunRecord) -> bool:
        if run.lease is not None:
            raise ValueError(f"run {run.run_id!r} is in flight: only paused and ended runs move")
        run_id, fs = run.run_id, self._fs
        key = None if run.ended else run.key
        with self._io("restore", run_id), fs.locked_all((run_id,), () if key is None else (key,)):
            if fs.exists("paused", run_id) or fs.exists("ended", run_id):
                return False
            record = run.model_copy()
            fs.unlink("inflight", run_id, sync=False)  # a marker with no record is dead
            if record.ended:
                ended_at = record.ended_at or utcnow()
                record.ended_at = ended_at
                # Dated when it ended: prune_ended goes by the file's time.
                fs.write("ended", run_id, record.to_json(), mtime=ended_at.timestamp())
                return True
            if key is not None:
                holder = self._key_holder(key)
                if holder is not None and holder != run_id and self._holds(holder, key):
                    raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
                if holder != run_id:
                    fs.write("keys", key_name(key), run_id.encode())
            self._indexes_before(record)
            fs.write("paused", run_id, record.to_json())
            self._indexes_after(record)
            return True

    def _iter_ended(self) -> Iterator[RunRecord]:
        with self._io("iter_ended", "*"):
            for run_id in self._fs.names("ended"):
                try:
                    run = self._read_ended(validate_run_id(run_id))
                except ValueError:
                    continue  # not one of ours
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt tombstone: %s", exc)
                    continue
                if run is not None:
                    yield run
