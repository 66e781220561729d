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
:mod:`._fs`, per-run reads and the repair rules in :mod:`._records`, the
transitions of one run in :mod:`._transitions`, business keys and early answers
in :mod:`._keys`, ``restore`` and ``iter_ended`` in :mod:`._moving`, the passes
over many runs in :mod:`._sweeps`; this module opens the store and saves.

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

import os
from pathlib import Path

from ...exceptions import CheckpointExists, LeaseLost
from ...model import DEFAULT_LEASE_SECONDS, ResumeRequest, RunRecord
from ..base import CheckpointStore
from ._fs import Tree, key_name
from ._keys import EARLY_FIELD
from ._moving import Moving
from ._sweeps import Sweeps

__all__ = ["FileStore"]


class FileStore(Moving, Sweeps, CheckpointStore):
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

    # -- the contract (its other primitives: the mixins, see the module docstring) ---

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
