"""The file store keeps records private: directories 0700, files 0600 whatever
the umask, no other local user can read a record or hold a lock file, and a
store another user can reach is reported when it is opened."""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from celery_checkpoint.model import utcnow
from celery_checkpoint.store.file import FileStore
from tests.contract.helpers import make_run


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def exercise(store: FileStore) -> None:
    """Every kind of file the store makes: records, leases, index entries, lock
    files, tombstones, key entries, early answers and corrupt copies."""
    store.save(make_run("paused", expires_at=utcnow() + timedelta(hours=1), key="order/1"))
    store.request_resume("paused", "in", "req-1")
    store.answer_key("stripe:pi_1", {"paid": True}, "evt-1", ttl=3600)
    store.save(make_run("done"))
    run = store.claim("done")
    assert run is not None
    assert run.lease is not None
    store.heartbeat("done", run.lease.token)
    store.complete("done", token=run.lease.token, result='{"ok": true}')
    store.save(make_run("cancelled"))
    store.cancel("cancelled")
    store.save(make_run("flying"))
    assert store.claim("flying", lease_seconds=3600) is not None
    (store.root / "paused" / "broken.json").write_bytes(b"garbage")
    list(store.list())  # moves it aside


def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], indirect=True, ids=oct)
def test_every_file_and_directory_the_store_creates_is_private(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "deep" / "store"
    exercise(FileStore(root))
    found = modes(root)
    assert {
        "paused/paused.json",
        "ended/done.json",
        "pending/paused",
        "deadlines/paused",
        "undelivered/done",
        "keys/order%1",
        "early/stripe:pi_1.json",
    } <= set(found)
    assert any(name.startswith("locks/") for name in found)
    assert any(".corrupt" in name for name in found)
    shared = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert shared == {}, "readable or writable by others"
    for name, mode in found.items():
        path = root / name
        assert mode == (0o700 if path.is_dir() else 0o600), (name, oct(mode))


def test_a_private_store_opens_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    FileStore(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint.store.file"):
        FileStore(tmp_path / "store")
    assert caplog.records == []


def test_opening_a_store_other_users_can_reach_warns_how_to_fix_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    FileStore(root).save(make_run("r1"))
    # A store made by an older version: world-readable directories.
    root.chmod(0o755)
    (root / "paused").chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint.store.file"):
        store = FileStore(root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"chmod -R go-rwx {root}" in warnings[0]
    assert str(root / "paused") in warnings[0]
    assert store.load("r1") is not None, "still usable"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755, "the owner's directory is left as it is"

    subprocess.run(["chmod", "-R", "go-rwx", str(root)], check=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint.store.file"):
        FileStore(root)
    assert caplog.records == [], "the advice fixes it"


def probe_as(uid: int, gid: int, root: Path, lock: str) -> int:
    """In a child running as ``uid``: how many of six reads and locks are refused."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        refused = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            for path in (root / "paused" / "r1.json", root / "ended" / "done.json"):
                try:
                    os.close(os.open(path, os.O_RDONLY))
                except PermissionError:
                    refused += 1
            try:
                fd = os.open(root / "locks" / lock, os.O_RDONLY)
            except PermissionError:
                refused += 1
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until exit
            for directory in ("paused", "tmp", "locks"):
                try:
                    os.listdir(root / directory)
                except PermissionError:
                    refused += 1
        finally:
            os._exit(refused)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every user can reach (pytest's own temp root is private)."""
    path = Path(tempfile.mkdtemp(prefix="checkpoint-privacy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def filled_store(root: Path) -> tuple[FileStore, str]:
    store = FileStore(root)
    store.save(make_run("r1"))
    store.save(make_run("done"))
    run = store.claim("done")
    assert run is not None
    assert run.lease is not None
    store.complete("done", token=run.lease.token)
    return store, sorted(os.listdir(root / "locks"))[0]


def test_another_local_user_can_neither_read_a_record_nor_hold_a_lock(open_parent: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run the probe as")
    # The probe works: on a store opened up by hand it reads and locks everything.
    shared, lock = filled_store(open_parent / "opened-up")
    subprocess.run(["chmod", "-R", "go+rwX", str(shared.root)], check=True)
    assert probe_as(nobody.pw_uid, nobody.pw_gid, shared.root, lock) == 0

    store, lock = filled_store(open_parent / "store")
    assert probe_as(nobody.pw_uid, nobody.pw_gid, store.root, lock) == 6, "all refused"
    assert store.claim("r1") is not None
