"""Filesystem primitives of the file store: atomic writes, stripe locks, fsync.

:class:`Tree` knows the directory layout and nothing of runs' rules: it writes
a file atomically (unique temp file, fsync, rename, fsync the directory),
serialises each run's transitions with a striped ``flock`` (which the kernel
drops when a process dies), keeps index entries whose mtime carries a time,
and moves corrupt files aside without ever overwriting earlier evidence.

Everything it creates is private to the store's user, whatever the umask:
directories 0700, files (records, temp files, index entries, lock files) 0600.
Records hold task arguments and answers, and a lock file another user could
open is a lock that user could hold.
"""

from __future__ import annotations

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
from collections.abc import Iterable, Iterator
from pathlib import Path

from ...exceptions import StoreUnavailable
from .._local import fs_type, refuse_network_fs

__all__ = ["KINDS", "STALE_TMP_SECONDS", "Tree", "fs_type", "key_name"]

logger = logging.getLogger("celery_checkpoint.store.file")

#: The store's subdirectories; see the layout in the package docstring.
KINDS = (
    "paused",
    "inflight",
    "pending",
    "deadlines",
    "ended",
    "undelivered",
    "keys",
    "early",
    "tmp",
    "locks",
)
_RECORDS = frozenset({"paused", "inflight", "ended", "early"})  # named <name>.json
_STRIPES = 256
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_READ_SIZE = 1 << 16  # a record is a few KiB: one read takes it whole
#: A temp file is removed by age alone, never because its writer's pid looks
#: gone: a writer in another pid namespace (a container sharing the directory)
#: has a pid that means nothing here. A write holds its temp file for
#: milliseconds; one stalled past this loses the write (its rename fails) and
#: the record it would have replaced stays intact.
STALE_TMP_SECONDS = 3600.0


class Tree:
    """The store directory: paths, locks, atomic writes and index entries."""

    def __init__(self, root: Path, *, fsync: bool, allow_network_fs: bool) -> None:
        self.root = root
        self.fsync = fsync
        self._thread_locks = [threading.Lock() for _ in range(_STRIPES)]
        # flock descriptors held right now: a child forked meanwhile inherits
        # them (and the held mutexes), and must drop both or it would keep the
        # stripe locked for every process until it exits.
        self._held_fds: set[int] = set()
        _OPEN_TREES.add(self)
        # Plain strings for the per-call joins: building Paths cost more than the
        # system calls of a claim (see bench/store_bench.py).
        self.dirs = {name: os.fspath(root / name) for name in KINDS}
        self._lock_names = [f"{self.dirs['locks']}/{i:03d}.lock" for i in range(_STRIPES)]
        try:
            _make_private_dir(root, parents=True)
            for name in KINDS:
                _make_private_dir(Path(self.dirs[name]))
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the checkpoint store at {root}", exc) from exc
        self._warn_if_shared()
        if not allow_network_fs:
            refuse_network_fs(
                root, "the file store", "flock, rename and fsync", "the Redis store (redis://...)"
            )
        if not os.access(root, os.W_OK):
            raise StoreUnavailable(
                f"cannot open the checkpoint store at {root}",
                PermissionError(errno.EACCES, "directory is not writable", str(root)),
            )

    def _warn_if_shared(self) -> None:
        """Warn when another user can reach the store: one made by an older version,
        or a directory the user created with a permissive umask."""
        shared = []
        for path in (os.fspath(self.root), *(self.dirs[name] for name in KINDS)):
            with contextlib.suppress(OSError):
                if os.stat(path).st_mode & 0o077:
                    shared.append(path)
        if shared:
            logger.warning(
                "checkpoint store %s can be read or written by other users (%s): records hold "
                "task arguments and answers, and a lock file another user opens can block "
                "claims. Make it private with: chmod -R go-rwx %s",
                self.root,
                ", ".join(shared),
                self.root,
            )

    def path(self, kind: str, run_id: str) -> str:
        suffix = ".json" if kind in _RECORDS else ""
        return f"{self.dirs[kind]}/{run_id}{suffix}"

    @contextlib.contextmanager
    def locked(self, run_id: str) -> Iterator[None]:
        """Hold the run's stripe lock: threads via a mutex, processes via flock."""
        with self._stripe(zlib.crc32(run_id.encode()) % _STRIPES):
            yield

    @contextlib.contextmanager
    def locked_all(self, run_ids: Iterable[str] = (), keys: Iterable[str] = ()) -> Iterator[None]:
        """Hold the stripe locks of runs and business keys at once.

        Stripes are taken in ascending order, each once (a run and a key may
        share one): two callers locking overlapping sets never deadlock. A
        caller holding a stripe must not ask for another one outside this call.
        """
        stripes = {zlib.crc32(run_id.encode()) % _STRIPES for run_id in run_ids}
        stripes |= {_key_stripe(key) for key in keys}
        with contextlib.ExitStack() as stack:
            for stripe in sorted(stripes):
                stack.enter_context(self._stripe(stripe))
            yield

    @contextlib.contextmanager
    def _stripe(self, stripe: int) -> Iterator[None]:
        with self._thread_locks[stripe]:
            fd = os.open(
                self._lock_names[stripe], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE
            )
            self._held_fds.add(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                self._held_fds.discard(fd)
                os.close(fd)  # closing drops the flock

    def after_fork_in_child(self) -> None:
        for fd in list(self._held_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held_fds = set()
        self._thread_locks = [threading.Lock() for _ in range(_STRIPES)]

    def sync_dir(self, kind: str) -> None:
        if not self.fsync:
            return
        fd = os.open(self.dirs[kind], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(
        self,
        kind: str,
        run_id: str,
        data: bytes,
        *,
        durable: bool = True,
        mtime: float | None = None,
    ) -> None:
        """Atomically replace the file: unique temp name, fsync, rename, fsync the directory.

        On failure the temp file is removed and the old file is untouched.
        ``durable=False`` skips both fsyncs: still atomic for every reader,
        but a power cut may lose the write or leave an empty file. ``mtime``
        dates the file (a restored tombstone keeps when its run ended).
        """
        tmp = self._temp(data, durable=durable, mtime=mtime)
        try:
            os.rename(tmp, self.path(kind, run_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            self.sync_dir(kind)

    def _temp(self, data: bytes, *, durable: bool, mtime: float | None = None) -> str:
        """A new temp file holding ``data`` (fsynced if ``durable``); its path."""
        tmp = f"{self.dirs['tmp']}/{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if mtime is not None:
                    os.utime(fd, (mtime, mtime))
                if self.fsync and durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def write_through(self, via: tuple[str, str], to: tuple[str, str], data: bytes) -> None:
        """Replace the file ``via`` by ``data``, then move it to ``to``: two renames.

        Whatever consumed ``via`` is gone in the same rename that makes ``to``
        appear; a process killed between the two leaves ``data`` at ``via``,
        for the reader of ``via`` to recognise and undo. Both directories are
        fsynced: a power cut must not bring ``via`` back beside ``to``.
        """
        tmp = self._temp(data, durable=True)
        try:
            os.rename(tmp, self.path(*via))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.rename(self.path(*via), self.path(*to))
        self.sync_dir(to[0])
        self.sync_dir(via[0])

    def unlink(self, kind: str, run_id: str, *, sync: bool) -> bool:
        """Remove the file; ``sync`` makes the removal durable (fsync the directory)
        when there was one to remove."""
        try:
            os.unlink(self.path(kind, run_id))
        except FileNotFoundError:
            return False
        if sync:
            self.sync_dir(kind)
        return True

    def move(self, kind: str, to: str, run_id: str) -> None:
        """Rename a record into another directory, durably there (its directory
        fsynced). Its bytes must be durable already."""
        os.rename(self.path(kind, run_id), self.path(to, run_id))
        self.sync_dir(to)

    def touch(self, kind: str, run_id: str, when: float, *, durable: bool) -> None:
        """Create or re-date an index entry (a pending resume, a deadline) at ``when``.

        ``durable``: a created entry survives a power cut (its directory is
        fsynced). A re-dating is never synced here: see :meth:`backdate`.
        """
        path = self.path(kind, run_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileExistsError:
            os.utime(path, (when, when))
            return
        try:
            os.utime(fd, (when, when))
        finally:
            os.close(fd)
        if durable:
            self.sync_dir(kind)

    def backdate(self, kind: str, run_id: str, when: float) -> None:
        """Durably move an existing entry's time back to ``when`` (create it if gone)."""
        path = self.path(kind, run_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.touch(kind, run_id, when, durable=True)
            return
        try:
            os.utime(fd, (when, when))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def mtime(self, kind: str, run_id: str) -> float | None:
        """The entry's mtime, or None if there is no entry."""
        try:
            return os.stat(self.path(kind, run_id)).st_mtime
        except FileNotFoundError:
            return None

    def exists(self, kind: str, run_id: str) -> bool:
        return os.path.lexists(self.path(kind, run_id))

    def read(self, kind: str, run_id: str) -> bytes | None:
        # os.read straight from the descriptor: a Python file object would add
        # an fstat, an lseek and a second read to every lookup.
        try:
            fd = os.open(self.path(kind, run_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            data = os.read(fd, _READ_SIZE)
            if len(data) < _READ_SIZE:  # a short read of a regular file is its end
                return data
            chunks = [data]
            while chunk := os.read(fd, _READ_SIZE):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def move_aside(self, kind: str, run_id: str, why: object) -> None:
        """Rename a corrupt file to ``<name>.corrupt`` (``.corrupt.1``... if taken)."""
        src = self.path(kind, run_id)
        dst = f"{self.dirs[kind]}/{run_id}.corrupt"
        n = 0
        while os.path.lexists(dst):  # never overwrite evidence of an earlier corruption
            n += 1
            dst = f"{self.dirs[kind]}/{run_id}.corrupt.{n}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(src, dst)
            os.chmod(dst, _FILE_MODE)  # evidence, and still someone's data
            self.sync_dir(kind)
            logger.warning("moved corrupt checkpoint aside to %s: %s", dst, why)

    def names(self, kind: str) -> Iterator[str]:
        """Run ids with an entry of ``kind`` (records without their ``.json``)."""
        suffix = ".json" if kind in _RECORDS else None
        with os.scandir(self.dirs[kind]) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                if suffix is None:
                    yield name
                elif name.endswith(suffix):
                    yield name[: -len(suffix)]

    def entries(self, kind: str) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.dirs[kind]) as it:
            yield from it

    def sweep_tmp(self, older_than: float) -> int:
        """Remove temp files older than ``older_than`` seconds; return how many.

        By age alone: see :data:`STALE_TMP_SECONDS`.
        """
        cutoff = time.time() - older_than
        removed = 0
        for entry in self.entries("tmp"):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def key_name(key: str) -> str:
    """A business key as a file name: ``/`` (which keys may hold) becomes ``%``,
    which no key holds, so the mapping is one to one and keeps the length.

    Hex or base32 would double the length: a 200-character key would pass
    the 255 bytes a file name may have.
    """
    return key.replace("/", "%")


def _key_stripe(key: str) -> int:
    # "key/" cannot start a run id ('/' is not allowed in one): a key's stripe
    # is not systematically a run's of the same text.
    return zlib.crc32(b"key/" + key.encode()) % _STRIPES


_OPEN_TREES: weakref.WeakSet[Tree] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tree in list(_OPEN_TREES):
        tree.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _make_private_dir(path: Path, *, parents: bool = False) -> None:
    """Create ``path`` 0700 whatever the umask; an existing directory is left as it is
    (a store made by an older version is warned about, not changed behind its owner's back)."""
    if parents:
        for ancestor in (path.parent, *path.parent.parents):
            if ancestor.exists() and not ancestor.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(ancestor))
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, _DIR_MODE)  # the umask may have removed bits the owner needs
