"""Filesystem primitives of the file store: atomic writes, stripe locks, fsync.

:class:`Tree` knows the directory layout and nothing of runs' rules: it writes
a file atomically (unique temp file, fsync, rename, fsync the directory),
serialises each run's transitions with a striped ``flock`` (which the kernel
drops when a process dies), keeps index entries whose mtime carries a time,
and moves corrupt files aside without ever overwriting earlier evidence.
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
from collections.abc import Iterator
from pathlib import Path

from ...exceptions import StoreUnavailable
from .._local import fs_type, refuse_network_fs

__all__ = ["KINDS", "Tree", "fs_type"]

logger = logging.getLogger("celery_checkpoint.store.file")

#: The store's subdirectories; see the layout in the package docstring.
KINDS = ("paused", "inflight", "pending", "deadlines", "ended", "tmp", "locks")
_RECORDS = frozenset({"paused", "inflight", "ended"})  # named <run_id>.json
_STRIPES = 256
# A temp file whose writer we cannot prove dead is removed only after this long.
_STALE_TMP_SECONDS = 3600.0


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
            for name in KINDS:
                Path(self.dirs[name]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the checkpoint store at {root}", exc) from exc
        if not allow_network_fs:
            refuse_network_fs(
                root, "the file store", "flock, rename and fsync", "the Redis store (redis://...)"
            )
        if not os.access(root, os.W_OK):
            raise StoreUnavailable(
                f"cannot open the checkpoint store at {root}",
                PermissionError(errno.EACCES, "directory is not writable", str(root)),
            )

    def path(self, kind: str, run_id: str) -> str:
        suffix = ".json" if kind in _RECORDS else ""
        return f"{self.dirs[kind]}/{run_id}{suffix}"

    @contextlib.contextmanager
    def locked(self, run_id: str) -> Iterator[None]:
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

    def after_fork_in_child(self) -> None:
        for fd in list(self._held_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held_fds = set()
        self._thread_locks = [threading.Lock() for _ in range(_STRIPES)]

    def sync_dir(self, kind: str) -> None:
        if not self.fsync:
            return
        fd = os.open(self.dirs[kind], os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, kind: str, run_id: str, data: bytes, *, durable: bool = True) -> None:
        """Atomically replace the file: unique temp name, fsync, rename, fsync the directory.

        On failure the temp file is removed and the old file is untouched.
        ``durable=False`` skips both fsyncs: still atomic for every reader,
        but a power cut may lose the write or leave an empty file.
        """
        tmp = f"{self.dirs['tmp']}/{os.getpid()}.{uuid.uuid4().hex}.tmp"
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
            os.rename(tmp, self.path(kind, run_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            self.sync_dir(kind)

    def unlink(self, kind: str, run_id: str, *, sync: bool = True) -> bool:
        try:
            os.unlink(self.path(kind, run_id))
        except FileNotFoundError:
            return False
        if sync:
            self.sync_dir(kind)
        return True

    def touch(self, kind: str, run_id: str, when: float) -> None:
        """Create (durably) or re-date an index entry: a pending resume or a deadline."""
        path = self.path(kind, run_id)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            created = False
        else:
            created = True
        os.utime(path, (when, when))
        if created:  # an entry lost to a power cut would be a resume or timeout never sent
            self.sync_dir(kind)

    def exists(self, kind: str, run_id: str) -> bool:
        return os.path.lexists(self.path(kind, run_id))

    def read(self, kind: str, run_id: str) -> bytes | None:
        try:
            with open(self.path(kind, run_id), "rb", buffering=0) as fh:
                return fh.readall()
        except FileNotFoundError:
            return None

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

    def sweep_tmp(self) -> None:
        """Remove temp files left by writers that died."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for entry in self.entries("tmp"):
            pid_text = entry.name.split(".", 1)[0]
            writer_dead = pid_text.isdigit() and not _pid_alive(int(pid_text))
            try:
                if writer_dead or entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue


_OPEN_TREES: weakref.WeakSet[Tree] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tree in list(_OPEN_TREES):
        tree.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
