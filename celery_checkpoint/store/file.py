"""The file store: one directory on a local POSIX filesystem, no server.

Layout under the store directory::

    paused/<run_id>.json     the checkpoint (authoritative while the run exists)
    inflight/<run_id>.json   the lease of a claimed run: token, owner, expiry
    pending/<run_id>         a resume request waiting for a worker (mtime: last sent)
    deadlines/<run_id>       a pause with a timeout (mtime: when it expires)
    ended/<run_id>.json      completed, cancelled, expired and failed runs (mtime: when
                             they ended; ``prune_ended`` deletes old ones)
    tmp/                     files being written; renamed into place when whole
    locks/NN.lock            striped ``flock`` locks serialising each run's transitions

Every write goes to a uniquely named file in ``tmp/``, is fsynced, renamed into
place and the directory fsynced, so a reader sees the old record or the new one
and a returned ``save`` survives a power cut. Transitions of one run hold its
stripe's ``flock``, which the kernel releases when a process dies, so a
``SIGKILL`` never leaves a lock behind.

Recovery lists only ``inflight/`` and ``tmp/``: its cost does not grow with the
number of paused runs.

Needs a local filesystem: ``flock``, ``rename`` and ``fsync`` are not
trustworthy on NFS or SMB, and such mounts are refused. For several machines use
the Redis store.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import JsonValue, ValidationError

from ..exceptions import (
    AlreadyResumed,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImproperlyConfigured,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
    StoreUnavailable,
)
from ..model import Lease, Owner, PausedWorkflow, ResumeRequest, utcnow, validate_run_id
from .base import DEFAULT_LEASE_SECONDS, CheckpointStore, RunInfo

__all__ = ["FileStore"]

logger = logging.getLogger("celery_checkpoint.store.file")

_STRIPES = 256
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "fuse.sshfs", "afs", "9p", "ceph"}
)
# A temp file whose writer we cannot prove dead is removed only after this long.
_STALE_TMP_SECONDS = 3600.0


def _ended_error(run: PausedWorkflow) -> Exception:
    if run.status == "completed":
        done = run.resume.request_id if run.resume is not None else "<none>"
        return AlreadyResumed(run.run_id, done, completed=True)
    why = f": {run.ended_reason}" if run.ended_reason else ""
    if run.status == "expired":
        return PauseExpired(f"run {run.run_id!r} expired at step {run.step!r}{why}")
    return RunCancelled(f"run {run.run_id!r} was {run.status}{why}")


class FileStore(CheckpointStore):
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
        self._thread_locks = [threading.Lock() for _ in range(_STRIPES)]
        # flock descriptors held right now: a child forked meanwhile inherits
        # them (and the held mutexes), and must drop both or it would keep the
        # stripe locked for every process until it exits.
        self._held_fds: set[int] = set()
        _OPEN_STORES.add(self)
        self._dirs = {
            name: self.root / name
            for name in ("paused", "inflight", "pending", "deadlines", "ended", "tmp", "locks")
        }
        # Plain strings for the per-call joins: building Paths cost more than the
        # system calls of a claim (see bench/store_bench.py).
        self._dir_names = {name: os.fspath(path) for name, path in self._dirs.items()}
        self._lock_names = [f"{self._dir_names['locks']}/{i:03d}.lock" for i in range(_STRIPES)]
        try:
            for path in self._dirs.values():
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the checkpoint store at {self.root}", exc) from exc
        if not allow_network_fs:
            fstype = _fs_type(self.root)
            if fstype in _NETWORK_FS:
                raise ImproperlyConfigured(
                    f"checkpoint store {self.root} is on a {fstype} mount: the file store needs "
                    "a local POSIX filesystem (flock, rename and fsync). Use a local directory "
                    "or the Redis store (redis://...)"
                )
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(
                f"cannot open the checkpoint store at {self.root}",
                PermissionError(errno.EACCES, "directory is not writable", str(self.root)),
            )

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # -- paths, locks and atomic writes --------------------------------------

    def _path(self, kind: str, run_id: str) -> str:
        suffix = ".json" if kind in ("paused", "inflight", "ended") else ""
        return f"{self._dir_names[kind]}/{run_id}{suffix}"

    @contextlib.contextmanager
    def _locked(self, run_id: str) -> Iterator[None]:
        """Hold the run's stripe lock: threads via a mutex, processes via flock."""
        stripe = zlib.crc32(run_id.encode()) % _STRIPES
        with self._thread_locks[stripe]:
            fd = os.open(self._lock_names[stripe], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._held_fds.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                self._held_fds.discard(fd)
                os.close(fd)  # closing drops the flock

    def _after_fork_in_child(self) -> None:
        for fd in list(self._held_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held_fds = set()
        self._thread_locks = [threading.Lock() for _ in range(_STRIPES)]

    @contextlib.contextmanager
    def _io(self, action: str, run_id: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(
                f"checkpoint store {self.root}: {action} of run {run_id!r} failed", exc
            ) from exc

    def _sync_dir(self, kind: str) -> None:
        if not self.fsync:
            return
        fd = os.open(self._dir_names[kind], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, kind: str, run_id: str, data: bytes, *, durable: bool = True) -> None:
        """Atomically replace the file: unique temp name, fsync, rename, fsync the directory.

        On failure the temp file is removed and the old file is untouched.
        ``durable=False`` skips both fsyncs: still atomic for every reader,
        but a power cut may lose the write or leave an empty file.
        """
        tmp = f"{self._dir_names['tmp']}/{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync and durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._path(kind, run_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            self._sync_dir(kind)

    def _unlink(self, kind: str, run_id: str, *, sync: bool = True) -> bool:
        try:
            os.unlink(self._path(kind, run_id))
        except FileNotFoundError:
            return False
        if sync:
            self._sync_dir(kind)
        return True

    def _touch(self, kind: str, run_id: str, when: float) -> None:
        """Create (durably) or re-date an index entry: a pending resume or a deadline."""
        path = self._path(kind, run_id)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            created = False
        else:
            created = True
        os.utime(path, (when, when))
        if created:  # an entry lost to a power cut would be a resume or timeout never sent
            self._sync_dir(kind)

    def _read_bytes(self, kind: str, run_id: str) -> bytes | None:
        try:
            with open(self._path(kind, run_id), "rb", buffering=0) as fh:
                return fh.readall()
        except FileNotFoundError:
            return None

    def _read_run(self, kind: str, run_id: str) -> PausedWorkflow | None:
        data = self._read_bytes(kind, run_id)
        if data is None:
            return None
        try:
            run = PausedWorkflow.from_json(data)
        except (ValidationError, ValueError) as exc:
            raise CorruptCheckpoint(run_id, _short(exc, data)) from exc
        if run.run_id != run_id:
            raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
        return run

    def _read_lease(self, run_id: str) -> Lease | None:
        data = self._read_bytes("inflight", run_id)
        if data is None:
            return None
        try:
            return Lease.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            raise CorruptCheckpoint(run_id, "in-flight marker: " + _short(exc, data)) from exc

    def _live_lease(self, run: PausedWorkflow | None, lease: Lease | None) -> Lease | None:
        """The lease if it belongs to the current claim (not superseded by a later write)."""
        if lease is None or (run is not None and lease.token <= run.last_token):
            return None
        return lease

    def _move_aside(self, kind: str, run_id: str, exc: CorruptCheckpoint) -> None:
        src = self._path(kind, run_id)
        dst = f"{self._dir_names[kind]}/{run_id}.corrupt"
        n = 0
        while os.path.lexists(dst):  # never overwrite evidence of an earlier corruption
            n += 1
            dst = f"{self._dir_names[kind]}/{run_id}.corrupt.{n}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(src, dst)
            self._sync_dir(kind)
            logger.warning("moved corrupt checkpoint aside to %s: %s", dst, exc)

    def _set_deadline(self, run: PausedWorkflow) -> None:
        if run.expires_at is None:
            self._unlink("deadlines", run.run_id, sync=False)
        else:
            self._touch("deadlines", run.run_id, run.expires_at.timestamp())

    def _drop_indexes(self, run_id: str) -> None:
        self._unlink("pending", run_id, sync=False)
        self._unlink("deadlines", run_id, sync=False)

    # -- the contract --------------------------------------------------------

    def save(
        self, paused: PausedWorkflow, *, token: int | None = None, create: bool = False
    ) -> None:
        run_id = validate_run_id(paused.run_id)
        if create and token is not None:
            raise ValueError("save(create=True) is a first pause: it takes no token")
        with self._io("save", run_id), self._locked(run_id):
            if create:
                if os.path.lexists(self._path("paused", run_id)):
                    raise CheckpointExists(run_id, "paused")
                if os.path.lexists(self._path("ended", run_id)):
                    raise CheckpointExists(run_id, "ended")
            current = self._read_run_tolerant(run_id)
            lease = self._read_lease_tolerant(run_id, current)
            live = self._live_lease(current, lease)
            # A shallow copy: only top-level fields are set below, so the caller's
            # object is untouched without deep-copying the user's state on every save.
            record = paused.model_copy()
            record.lease = None
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
                ended = self._read_run_tolerant(run_id, kind="ended")
                if ended is not None:
                    record.last_token = max(record.last_token, ended.last_token)
            self._write("paused", run_id, record.to_json())
            if token is None:
                self._unlink("ended", run_id)
            self._set_deadline(record)
            if record.resume is not None and record.resume.status == "pending":
                self._touch("pending", run_id, time.time())
            else:
                self._unlink("pending", run_id, sync=False)
            if lease is not None:
                self._unlink("inflight", run_id)

    def exists(self, run_id: str) -> bool:
        validate_run_id(run_id)
        with self._io("exists", run_id):
            return os.path.lexists(self._path("paused", run_id)) or os.path.lexists(
                self._path("ended", run_id)
            )

    def load(self, run_id: str) -> PausedWorkflow | None:
        validate_run_id(run_id)
        with self._io("load", run_id):
            return self._read_run("paused", run_id)

    def lease(self, run_id: str) -> Lease | None:
        validate_run_id(run_id)
        with self._io("lease", run_id):
            return self._live_lease(self._read_run("paused", run_id), self._read_lease(run_id))

    def claim(
        self,
        run_id: str,
        *,
        owner: Owner | None = None,
        lease_seconds: float | None = None,
        pause_seq: int | None = None,
    ) -> PausedWorkflow | None:
        validate_run_id(run_id)
        with self._io("claim", run_id), self._locked(run_id):
            run = self._read_run("paused", run_id)
            if run is None or run.status != "paused":
                return None
            if pause_seq is not None and run.pause_seq != pause_seq:
                return None
            if self._live_lease(run, self._read_lease_tolerant(run_id, run)) is not None:
                return None
            if os.path.exists(self._path("ended", run_id)):
                return None  # a cancel was interrupted before it dropped the record
            now = utcnow()
            lease = Lease(
                token=run.last_token + 1,
                owner=owner or Owner.current(),
                claimed_at=now,
                expires_at=now + timedelta(seconds=self._lease_seconds(lease_seconds)),
            )
            # The lease is not fsynced: it only matters while its holder lives,
            # and a power cut kills every holder on this machine. A lease lost
            # that way leaves the run PAUSED with its request pending (it runs
            # again, as a recovered run would); a torn one is moved aside and
            # the run re-armed past its token. Either way nothing is lost.
            self._write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            # The pending entry stays: if this lease is lost to a power cut, the
            # request must still be found and re-sent (due_resumes skips and
            # drops entries of runs in flight).
            run.lease = lease
            return run

    def request_resume(
        self,
        run_id: str,
        input: JsonValue,
        request_id: str,
        *,
        pause_seq: int | None = None,
        timed_out: bool = False,
    ) -> ResumeRequest:
        validate_run_id(run_id)
        with self._io("request_resume", run_id), self._locked(run_id):
            run = self._read_run("paused", run_id)
            if run is None:
                ended = self._read_run_tolerant(run_id, kind="ended")
                if ended is None:
                    raise CheckpointNotFound(run_id)
                done = ended.resume if ended.status == "completed" else None
                if done is not None and done.request_id == request_id:
                    return done  # the same resume again, after it ran to completion
                raise _ended_error(ended)
            if pause_seq is not None and pause_seq != run.pause_seq:
                raise ResumeRejected(
                    run_id,
                    f"the resume aims at pause {pause_seq} but the run is at pause "
                    f"{run.pause_seq} (step {run.step!r})",
                )
            pending = run.resume
            if pending is not None and pending.pause_seq != run.pause_seq:
                pending = None  # left over from an earlier pause
            if pending is not None and pending.request_id == request_id:
                return pending
            # In flight with no request of this pause (a timeout or a redelivery
            # claimed it): accepting would be lost when the holder completes.
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if pending is not None and (pending.status == "pending" or live is not None):
                raise AlreadyResumed(run_id, pending.request_id)
            if live is not None:
                raise AlreadyResumed(run_id, f"<none: in flight under token {live.token}>")
            request = ResumeRequest(
                request_id=request_id, input=input, pause_seq=run.pause_seq, timed_out=timed_out
            )
            run.resume = request
            self._write("paused", run_id, run.to_json())
            self._touch("pending", run_id, time.time())
            return request

    def heartbeat(self, run_id: str, token: int, *, lease_seconds: float | None = None) -> Lease:
        validate_run_id(run_id)
        with self._io("heartbeat", run_id), self._locked(run_id):
            lease = self._live_lease(self._read_run("paused", run_id), self._read_lease(run_id))
            if lease is None or lease.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            lease = lease.model_copy(
                update={
                    "expires_at": utcnow() + timedelta(seconds=self._lease_seconds(lease_seconds))
                }
            )
            self._write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            return lease

    def complete(self, run_id: str, *, token: int | None = None) -> None:
        validate_run_id(run_id)
        with self._io("complete", run_id), self._locked(run_id):
            run = self._read_run_tolerant(run_id)
            lease = self._read_lease_tolerant(run_id, run)
            live = self._live_lease(run, lease)
            if token is not None:
                if live is None:
                    self._check_ended_lease(run_id, run, token)
                    return  # completed already, or re-paused by this very holder
                if live.token != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
            elif live is None:
                # Not in flight: a paused record (a fresh re-pause) stays as it is.
                if lease is not None:
                    self._unlink("inflight", run_id)
                return
            # Record first and durably, then the marker: a crash in between, or a
            # power cut that loses the marker's unlink, leaves a marker with no
            # record, which recovery drops; never a record that looks paused again.
            if self._unlink("paused", run_id):
                self._drop_indexes(run_id)
                if run is not None and live is not None:
                    # A tombstone: a late writer with an older token, a redelivered
                    # first execution and a repeated resume must see that the run
                    # completed. Not fsynced: after a power cut nobody is late.
                    run.status = "completed"
                    run.lease_ended_by = "complete"
                    run.last_token = live.token
                    self._write("ended", run_id, run.to_json(), durable=False)
            self._unlink("inflight", run_id, sync=False)

    def _check_ended_lease(self, run_id: str, run: PausedWorkflow | None, token: int) -> None:
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

    def release(self, run_id: str, token: int, *, error: str | None = None) -> None:
        validate_run_id(run_id)
        with self._io("release", run_id), self._locked(run_id):
            run = self._read_run("paused", run_id)
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if run is None or live is None or live.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            run.last_token = token
            run.lease_ended_by = "release"
            if run.resume is not None:
                run.resume.status = "failed"
                run.resume.error = error
            self._write("paused", run_id, run.to_json())
            self._unlink("inflight", run_id)

    def recover_orphaned(self) -> builtins.list[PausedWorkflow]:
        recovered: builtins.list[PausedWorkflow] = []
        with self._io("recover_orphaned", "*"):
            self._sweep_tmp()
            for name in _listdir(self._dirs["inflight"]):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                run_id = name[: -len(".json")]
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

    def _recover_one(self, run_id: str) -> PausedWorkflow | None:
        with self._locked(run_id):
            try:
                run = self._read_run("paused", run_id)
            except CorruptCheckpoint as exc:
                self._move_aside("paused", run_id, exc)
                self._unlink("inflight", run_id)
                raise
            try:
                lease = self._read_lease(run_id)
            except CorruptCheckpoint as exc:
                # The holder, if alive, has token last_token + 1: bump past it.
                self._move_aside("inflight", run_id, exc)
                lease = None
                if run is not None:
                    return self._rearm(run, run.last_token + 1)
                return None
            if lease is None:
                return None
            if run is None or lease.token <= run.last_token:
                # Completed, or re-paused/released before a crash: the paused
                # record (or its absence) is authoritative.
                self._unlink("inflight", run_id)
                return None
            if not lease.expired(utcnow()) and not lease.owner.is_dead_here():
                return None
            return self._rearm(run, lease.token)

    def _rearm(self, run: PausedWorkflow, token: int) -> PausedWorkflow:
        run.last_token = token
        run.lease_ended_by = "recovery"
        run.recoveries += 1
        self._write("paused", run.run_id, run.to_json())
        if run.resume is not None and run.resume.status == "pending":
            self._touch("pending", run.run_id, 0.0)  # due for re-sending at once
        self._unlink("inflight", run.run_id)
        logger.info("re-armed orphaned run %s (recovery %d)", run.run_id, run.recoveries)
        return run

    def _sweep_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in os.scandir(self._dirs["tmp"]):
            pid_text = entry.name.split(".", 1)[0]
            writer_dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
            try:
                if writer_dead or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    def cancel(
        self,
        run_id: str,
        *,
        reason: str | None = None,
        status: Literal["cancelled", "expired", "failed"] = "cancelled",
        token: int | None = None,
    ) -> PausedWorkflow | None:
        validate_run_id(run_id)
        with self._io("cancel", run_id), self._locked(run_id):
            run = self._read_run("paused", run_id)
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
            self._write("ended", run_id, run.to_json())
            self._unlink("paused", run_id)
            self._unlink("inflight", run_id)
            self._drop_indexes(run_id)
            return run

    def ended(self, run_id: str) -> PausedWorkflow | None:
        validate_run_id(run_id)
        with self._io("ended", run_id):
            return self._read_run("ended", run_id)

    def list(
        self,
        *,
        task: str | None = None,
        step: str | None = None,
        older_than: float | None = None,
    ) -> Iterator[RunInfo]:
        cutoff = None if older_than is None else utcnow() - timedelta(seconds=older_than)
        with self._io("list", "*"):
            for name in _listdir(self._dirs["paused"]):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                run_id = name[: -len(".json")]
                try:
                    run = self._read_run("paused", run_id)
                    lease = None if run is None else self._read_lease(run_id)
                except CorruptCheckpoint:
                    # Under the lock, re-read: a writer may have replaced the file
                    # meanwhile; only what is still corrupt is moved aside.
                    with self._locked(run_id):
                        run = self._read_run_tolerant(run_id)
                        lease = None if run is None else self._read_lease_tolerant(run_id, run)
                if run is None:
                    continue  # completed while we listed, or corrupt and moved aside
                lease = self._live_lease(run, lease)
                if task is not None and run.task_name != task:
                    continue
                if step is not None and run.step != step:
                    continue
                if cutoff is not None and run.paused_at > cutoff:
                    continue
                yield RunInfo(run=run, lease=lease)

    def count(self) -> int:
        with self._io("count", "*"):
            return sum(
                1
                for name in _listdir(self._dirs["paused"])
                if name.endswith(".json") and not name.startswith(".")
            )

    def stats(self) -> dict[str, int]:
        """Counted from the directory indexes: cheap with any number of paused runs."""
        with self._io("stats", "*"):
            runs = self.count()
            in_flight = 0
            for name in _listdir(self._dirs["inflight"]):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                try:
                    in_flight += self.lease(name[: -len(".json")]) is not None
                except (CorruptCheckpoint, ValueError):
                    continue
            pending = sum(1 for name in _listdir(self._dirs["pending"]) if not name.startswith("."))
            return {
                "runs": runs,
                "paused": runs - in_flight,
                "in_flight": in_flight,
                "pending_resumes": pending,
                "due_timeouts": len(self.due_timeouts()),
            }

    def due_resumes(self, older_than: float) -> builtins.list[str]:
        due: builtins.list[str] = []
        now = time.time()
        with self._io("due_resumes", "*"):
            for entry in os.scandir(self._dirs["pending"]):
                try:
                    if entry.stat().st_mtime > now - older_than:
                        continue
                    run_id = validate_run_id(entry.name)
                except (FileNotFoundError, ValueError):
                    continue
                with self._locked(run_id):
                    run = self._read_run_tolerant(run_id)
                    if (
                        run is None
                        or run.resume is None
                        or run.resume.status != "pending"
                        or self._live_lease(run, self._read_lease_tolerant(run_id, run)) is not None
                    ):
                        self._unlink("pending", run_id, sync=False)
                        continue
                    self._touch("pending", run_id, now)
                    due.append(run_id)
        return due

    def prune_ended(self, older_than: float) -> int:
        if older_than < 0:
            raise ValueError(f"older_than must be >= 0 seconds, not {older_than!r}")
        cutoff = time.time() - older_than
        pruned = 0
        with self._io("prune_ended", "*"):
            for entry in os.scandir(self._dirs["ended"]):
                if not entry.name.endswith(".json"):
                    continue  # corrupt copies are evidence: never pruned
                try:
                    run_id = validate_run_id(entry.name[: -len(".json")])
                    if entry.stat().st_mtime > cutoff:
                        continue
                except (FileNotFoundError, ValueError):
                    continue
                with self._locked(run_id):
                    try:  # ended again since the scan?
                        if os.stat(self._path("ended", run_id)).st_mtime > cutoff:
                            continue
                    except FileNotFoundError:
                        continue
                    pruned += self._unlink("ended", run_id, sync=False)
            if pruned:
                self._sync_dir("ended")
        return pruned

    def due_timeouts(self, now: datetime | None = None) -> builtins.list[str]:
        at = (now or utcnow()).timestamp()
        due: builtins.list[str] = []
        with self._io("due_timeouts", "*"):
            for entry in os.scandir(self._dirs["deadlines"]):
                try:
                    if entry.stat().st_mtime <= at:
                        due.append(validate_run_id(entry.name))
                except (FileNotFoundError, ValueError):
                    continue
        return due

    # -- tolerant reads: a corrupt record must not block a transition of its own run

    def _read_run_tolerant(self, run_id: str, kind: str = "paused") -> PausedWorkflow | None:
        try:
            return self._read_run(kind, run_id)
        except CorruptCheckpoint as exc:
            self._move_aside(kind, run_id, exc)
            return None

    def _read_lease_tolerant(self, run_id: str, run: PausedWorkflow | None) -> Lease | None:
        """The in-flight marker; a corrupt one is moved aside and the run re-armed.

        The lost holder's token is ``run.last_token + 1`` (a claim takes the next
        one): ``run``, the caller's copy read under the run's lock, is re-armed past
        it as recovery does, so the next claim cannot hand that token out again.
        """
        try:
            return self._read_lease(run_id)
        except CorruptCheckpoint as exc:
            self._move_aside("inflight", run_id, exc)
            if run is not None:
                self._rearm(run, run.last_token + 1)
            return None


_OPEN_STORES: weakref.WeakSet[FileStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_OPEN_STORES):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _listdir(path: Path) -> Iterator[str]:
    with os.scandir(path) as it:
        for entry in it:
            yield entry.name


def _short(exc: Exception, data: bytes) -> str:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{first} ({len(data)} bytes)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux), else None."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            mounts = [line.split() for line in fh]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    target = str(path.resolve())
    for fields in mounts:
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fields[2])
    return None if best is None else best[1]
