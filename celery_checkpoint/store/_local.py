"""What the stores on a local disk share: telling a network mount from a local one.

The file and SQLite stores rely on ``fsync``, ``rename`` and POSIX locks
behaving as on a local disk; on NFS, SMB and their kind they may not, so those
mounts are refused unless the caller insists.
"""

from __future__ import annotations

from pathlib import Path

from ..exceptions import ImproperlyConfigured

__all__ = ["NETWORK_FS", "fs_type", "refuse_network_fs"]

#: Filesystem types whose locks, renames or fsyncs are not those of a local disk.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "fuse.sshfs", "afs", "9p", "ceph"}
)


def fs_type(path: Path) -> str | None:
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


def refuse_network_fs(path: Path, what: str, needs: str, instead: str) -> None:
    """Raise ``ImproperlyConfigured`` if ``path`` lies on a network mount."""
    fstype = fs_type(path)
    if fstype in NETWORK_FS:
        raise ImproperlyConfigured(
            f"checkpoint store {path} is on a {fstype} mount: {what} needs a local POSIX "
            f"filesystem ({needs}). Use a local directory or {instead}"
        )
