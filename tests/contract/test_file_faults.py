"""The file backend under faults: SIGKILL mid-write, a full or read-only disk,
corrupt files, writers' leftovers, and a store with many paused runs.

Not parametrized: these reach into the store directory to cause or observe the
fault. Real processes, real ``SIGKILL``, real ``RLIMIT_FSIZE``; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from celery_checkpoint import (
    AlreadyResumed,
    CorruptCheckpoint,
    LeaseLost,
    PausedWorkflow,
    RunCancelled,
    StoreUnavailable,
)
from celery_checkpoint.store.file import FileStore
from celery_checkpoint.store.file._fs import STALE_TMP_SECONDS
from tests.contract.helpers import make_run, mp_context

KILLS = 220
CHILD_TIMEOUT = 120.0
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[FileStore]:
    store = FileStore(root)
    yield store
    store.close()


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def contents(root: Path) -> dict[str, bytes]:
    """Every file of the store and its bytes; ``locks/`` holds only empty lock files."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.parent.name != "locks":
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


# -- SIGKILL while saving ---------------------------------------------------------


def version(run_id: str, v: int) -> PausedWorkflow:
    """Version ``v`` of one run: every field derived from ``v``, so a mix is visible."""
    pad = random.Random(v).randrange(0, 48 * 1024)
    return PausedWorkflow(
        run_id=run_id,
        task_name="crash.test",
        step=f"step-{v}",
        pause_seq=v + 1,
        state={"v": v, "pad": "x" * pad, "pad_len": pad},
        metadata={"v": v},
        created_at=EPOCH,
        paused_at=EPOCH + timedelta(seconds=v),
    )


def _save_versions_forever(root: str, run_id: str, first: int, report: int) -> None:
    """Child: save versions first, first+1, ... and report each one once it returned."""
    store = FileStore(root)
    os.write(report, b"ready\n")
    v = first
    while True:
        store.save(version(run_id, v))
        os.write(report, f"{v}\n".encode())  # one short write to a pipe: atomic
        v += 1


@pytest.mark.slow
def test_sigkill_at_random_moments_never_tears_or_loses_a_saved_checkpoint(
    store: FileStore, root: Path
) -> None:
    rng = random.Random(1234)
    ctx = mp_context()
    run_id = "crashy"
    store.save(version(run_id, 0))
    current = 0
    for kill in range(KILLS):
        read_end, write_end = os.pipe()
        child = ctx.Process(
            target=_save_versions_forever, args=(str(root), run_id, current + 1, write_end)
        )
        child.start()
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reports:
            assert reports.readline() == b"ready\n"
            # Half the kills come after one save returned, so the run moves on
            # whatever the machine's speed; the others may land in the first.
            early = reports.readline() if kill % 2 else b""
            time.sleep(rng.uniform(0, 0.02))
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(CHILD_TIMEOUT)
            done = [int(line) for line in (early + reports.read()).split()]
        assert child.exitcode == -signal.SIGKILL

        # Saves are sequential: the last reported one returned, the next may have
        # been renamed into place before the kill. Nothing older, nothing torn.
        allowed = {done[-1], done[-1] + 1} if done else {current, current + 1}
        record = store.load(run_id)  # raises CorruptCheckpoint if torn
        assert record is not None
        v = record.state["v"]  # type: ignore[index,call-overload]
        assert v in allowed, f"found version {v}, expected one of {sorted(allowed)}"
        assert record == version(run_id, v), "the record mixes two versions"
        assert [info.run.run_id for info in store.list()] == [run_id]
        assert files(root / "paused") == [f"{run_id}.json"]
        current = v

    store.save(version(run_id, current + 1))  # no lock was left held by a killed child
    # Killed writers' temp files stay until they are old (their pids prove nothing).
    left = files(root / "tmp")
    store.recover_orphaned()
    assert files(root / "tmp") == left
    backdate(root / "tmp", STALE_TMP_SECONDS + 1)
    store.recover_orphaned()
    assert files(root / "tmp") == []


# -- a full disk, a read-only directory ---------------------------------------------


def _save_under_file_size_limit(root: str, limit: int, pad: int, out: Any) -> None:
    """Child: save a record bigger than RLIMIT_FSIZE allows (Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        FileStore(root).save(make_run("r1", state={"pad": "y" * pad}))
    except StoreUnavailable as exc:
        cause = exc.cause
        out.put(
            ("StoreUnavailable", str(exc), getattr(cause, "errno", None), exc.__cause__ is cause)
        )
    except BaseException as exc:
        out.put(("unexpected", repr(exc), None, False))
    else:
        out.put(("saved", "", None, False))


def test_a_full_disk_raises_store_unavailable_and_keeps_the_previous_checkpoint(
    store: FileStore, root: Path
) -> None:
    previous = make_run("r1", state={"pad": "small"})
    store.save(previous)
    before = contents(root)
    ctx = mp_context()
    out = ctx.Queue()
    child = ctx.Process(target=_save_under_file_size_limit, args=(str(root), 4096, 64 * 1024, out))
    child.start()
    outcome, message, cause_errno, chained = out.get(timeout=CHILD_TIMEOUT)
    child.join(CHILD_TIMEOUT)
    assert child.exitcode == 0
    assert outcome == "StoreUnavailable", message
    assert cause_errno == errno.EFBIG, message
    assert chained, "the OSError is the exception's cause"
    assert "r1" in message
    assert store.load("r1") == previous
    assert contents(root) == before, "the failed write left nothing behind"


def _make_immutable(path: Path) -> bool:
    """``chattr +i``: refuses writes even to root. False where it is not supported."""
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    return done.returncode == 0


def test_a_read_only_directory_raises_store_unavailable_and_keeps_the_previous_checkpoint(
    store: FileStore, root: Path
) -> None:
    previous = make_run("r1")
    store.save(previous)
    before = contents(root)
    paused = root / "paused"
    if os.geteuid() == 0:
        # Root ignores permission bits; an immutable directory refuses even root.
        if not _make_immutable(paused):
            pytest.skip(
                "running as root and chattr +i is unavailable: cannot make a directory read-only"
            )
        undo = ["chattr", "-i", str(paused)]
    else:
        paused.chmod(0o555)
        undo = []
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.save(make_run("r1", step="newer"))
        assert isinstance(caught.value.cause, PermissionError)
        assert caught.value.__cause__ is caught.value.cause
        with pytest.raises(StoreUnavailable):
            store.save(make_run("brand-new"))
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            paused.chmod(0o755)
    assert store.load("r1") == previous
    assert store.load("brand-new") is None
    assert contents(root) == before


# -- corrupt records -------------------------------------------------------------------

GARBAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "binary": lambda good: bytes(range(256)),
    "not-a-record": lambda good: b"[1, 2, 3]",
    "missing-fields": lambda good: json.dumps({"run_id": "b"}).encode(),
    "names-another-run": lambda good: good.replace(b'"b"', b'"a"', 1),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_corrupt_record_fails_only_its_run_and_listing_moves_it_aside(
    store: FileStore, root: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    saved = {run_id: make_run(run_id) for run_id in ("a", "b", "c")}
    for run in saved.values():
        store.save(run)
    bad = GARBAGE[kind]((root / "paused" / "b.json").read_bytes())
    (root / "paused" / "b.json").write_bytes(bad)

    with pytest.raises(CorruptCheckpoint) as caught:
        store.load("b")
    assert caught.value.run_id == "b"
    with pytest.raises(CorruptCheckpoint):
        store.claim("b")
    assert store.load("a") == saved["a"]
    assert store.claim("c") is not None

    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        assert sorted(info.run.run_id for info in store.list()) == ["a", "c"]
    assert (root / "paused" / "b.corrupt").read_bytes() == bad, "moved aside, not deleted"
    assert not (root / "paused" / "b.json").exists()
    assert any("b" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert store.load("b") is None
    assert store.count() == 2
    assert sorted(info.run.run_id for info in store.list()) == ["a", "c"]


def test_a_corrupt_in_flight_marker_is_moved_aside_and_the_run_rearmed_past_its_holder(
    store: FileStore, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(make_run("r1"))
    run = store.claim("r1", lease_seconds=3600)
    assert run is not None
    assert run.lease is not None
    lost = run.lease.token
    (root / "inflight" / "r1.json").write_bytes(b'{"token": 1, "owner": ')
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        assert [r.run_id for r in store.recover_orphaned()] == ["r1"]
    assert (root / "inflight" / "r1.corrupt").read_bytes() == b'{"token": 1, "owner": '
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    again = store.claim("r1")
    assert again is not None
    assert again.lease is not None
    assert again.lease.token > lost
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", lost)
    with pytest.raises(LeaseLost):
        store.complete("r1", token=lost)


# Operations that stumble on a corrupt in-flight marker outside recovery.
STUMBLES: dict[str, Any] = {
    "claim": lambda store: store.claim("r1"),
    "save": lambda store: store.save(make_run("r1", step="overwritten")),
    "request_resume": lambda store: store.request_resume("r1", "x", "req-9"),
    "release": lambda store: store.release("r1", 99),
    "complete": lambda store: store.complete("r1"),
    "list": lambda store: list(store.list()),
    "due_resumes": lambda store: (store.root / "pending" / "r1").touch() or store.due_resumes(0),
}


@pytest.mark.parametrize("stumble", sorted(STUMBLES))
def test_a_corrupt_in_flight_marker_found_outside_recovery_still_fences_its_holder(
    store: FileStore, root: Path, stumble: str
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", "x", "req-1")
    run = store.claim("r1", lease_seconds=3600)
    assert run is not None
    assert run.lease is not None
    lost = run.lease.token
    (root / "inflight" / "r1.json").write_bytes(b"\xff\xfe not a lease")
    outcome = None
    with contextlib.suppress(LeaseLost, AlreadyResumed):
        outcome = STUMBLES[stumble](store)
    assert (root / "inflight" / "r1.corrupt").exists(), "moved aside, not deleted"
    again = outcome if stumble == "claim" else store.claim("r1")
    assert again is not None
    assert again.lease is not None
    assert again.lease.token > lost, "the lost holder's token was handed out again"
    with pytest.raises(LeaseLost):
        store.heartbeat("r1", lost)
    with pytest.raises(LeaseLost):
        store.complete("r1", token=lost)
    assert store.lease("r1") == again.lease


def test_recovery_moves_a_corrupt_record_aside_and_goes_on(
    store: FileStore, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for run_id in ("bad", "good"):
        store.save(make_run(run_id))
        assert store.claim(run_id, lease_seconds=0) is not None  # expired at once
    (root / "paused" / "bad.json").write_bytes(b"\x00\x01garbage")
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        assert [r.run_id for r in store.recover_orphaned()] == ["good"]
    assert (root / "paused" / "bad.corrupt").read_bytes() == b"\x00\x01garbage"
    assert any(r.levelno == logging.WARNING and "bad" in r.getMessage() for r in caplog.records)
    assert files(root / "inflight") == []


# -- crash states between two steps of a transition ------------------------------------


def test_recovery_keeps_a_repaused_record_over_a_leftover_in_flight_marker(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    run = store.claim("r1", lease_seconds=0)  # expired: recovery would re-arm a real orphan
    assert run is not None
    assert run.lease is not None
    marker = (root / "inflight" / "r1.json").read_bytes()
    repaused = run.model_copy(update={"lease": None, "step": "second", "pause_seq": 2})
    store.save(repaused, token=run.lease.token)
    # A crash after the re-pause wrote its record but before it dropped the marker.
    (root / "inflight" / "r1.json").write_bytes(marker)
    stored = store.load("r1")
    assert store.lease("r1") is None, "the paused record is newer than the marker"

    assert store.recover_orphaned() == [], "not counted as recovered"
    assert store.load("r1") == stored
    assert stored is not None
    assert (stored.step, stored.pause_seq, stored.recoveries) == ("second", 2, 0)
    assert files(root / "inflight") == []
    again = store.claim("r1", pause_seq=2)
    assert again is not None
    assert again.lease is not None
    assert again.lease.token == run.lease.token + 1


def test_recovery_drops_a_marker_whose_run_completed(store: FileStore, root: Path) -> None:
    store.save(make_run("r1"))
    assert store.claim("r1", lease_seconds=0) is not None
    # A crash in complete after it removed the record but before the marker.
    (root / "paused" / "r1.json").unlink()
    assert store.recover_orphaned() == []
    assert files(root / "inflight") == []
    assert store.load("r1") is None


def interrupt_cancel(store: FileStore, root: Path, run_id: str) -> bytes:
    """Cancel ``run_id`` and put its paused record back: a cancel killed after its
    tombstone, before it removed the record. Returns the stale record's bytes."""
    stale = (root / "paused" / f"{run_id}.json").read_bytes()
    assert store.cancel(run_id, reason="crash mid-cancel") is not None
    (root / "paused" / f"{run_id}.json").write_bytes(stale)
    return stale


def test_a_paused_record_beside_its_tombstone_reads_as_ended_everywhere(
    store: FileStore, root: Path
) -> None:
    # A passed deadline that resumes (an expiring one would refuse the answer).
    store.save(make_run("r1", expires_at=EPOCH, on_timeout="resume"))
    store.request_resume("r1", "in", "req-1")
    store.save(make_run("other"))
    interrupt_cancel(store, root, "r1")
    (root / "pending" / "r1").touch()
    (root / "deadlines" / "r1").touch()

    assert store.load("r1") is None
    assert store.lease("r1") is None
    assert store.count() == 1
    assert [info.run.run_id for info in store.list()] == ["other"]
    assert store.stats()["runs"] == 1
    assert store.due_timeouts() == []
    assert store.due_resumes(0) == []
    with pytest.raises(RunCancelled):
        store.request_resume("r1", "late", "req-2")
    assert store.claim("r1") is None
    ended = store.ended("r1")
    assert ended is not None
    assert ended.status == "cancelled"
    assert files(root / "paused") == ["other.json"], "the stale record was removed"
    assert files(root / "pending") == []
    assert files(root / "deadlines") == []


def test_recovery_removes_a_record_left_beside_the_tombstone_of_an_in_flight_run(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    run = store.claim("r1", lease_seconds=0)
    assert run is not None
    assert run.lease is not None
    stale = (root / "paused" / "r1.json").read_bytes()
    store.complete("r1", token=run.lease.token)
    (root / "paused" / "r1.json").write_bytes(stale)  # killed after the tombstone
    (root / "inflight" / "r1.json").write_bytes(run.lease.model_dump_json().encode())

    assert store.recover_orphaned() == [], "an ended run is never re-armed"
    assert files(root / "paused") == []
    assert files(root / "inflight") == []
    ended = store.ended("r1")
    assert ended is not None
    assert ended.status == "completed"
    store.complete("r1", token=run.lease.token)  # idempotent still


def test_a_completion_cut_short_after_moving_the_record_reads_as_completed(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", "in", "req-1")
    run = store.claim("r1")
    assert run is not None
    assert run.lease is not None
    # complete killed after it moved the record into ended/, before the rewrite
    os.rename(root / "paused" / "r1.json", root / "ended" / "r1.json")

    ended = store.ended("r1")
    assert ended is not None
    assert (ended.status, ended.last_token) == ("completed", run.lease.token)
    assert store.load("r1") is None
    assert store.recover_orphaned() == []
    assert store.request_resume("r1", "in", "req-1").request_id == "req-1"
    with pytest.raises(AlreadyResumed):
        store.request_resume("r1", "other", "req-2")
    store.complete("r1", token=run.lease.token)  # its holder's retry is a no-op
    with pytest.raises(LeaseLost):
        store.complete("r1", token=run.lease.token - 1)
    store.save(make_run("r1", step="next run"))
    again = store.claim("r1")
    assert again is not None
    assert again.lease is not None
    assert again.lease.token == run.lease.token + 1, "tokens go on growing"


def test_pruning_a_tombstone_never_brings_back_the_record_beside_it(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    interrupt_cancel(store, root, "r1")
    assert store.prune_ended(0) == 1
    assert store.load("r1") is None
    assert not store.exists("r1")
    assert files(root / "paused") == []


def test_a_save_over_an_ended_run_killed_before_it_dropped_the_tombstone_left_it_ended(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    store.cancel("r1")
    tombstone = (root / "ended" / "r1.json").read_bytes()
    store.save(make_run("r1", step="again"))
    (root / "ended" / "r1.json").write_bytes(tombstone)  # killed between the two steps
    assert store.load("r1") is None
    assert store.claim("r1") is None
    store.save(make_run("r1", step="again"))  # the caller's retry succeeds
    loaded = store.load("r1")
    assert loaded is not None
    assert loaded.step == "again"
    assert store.ended("r1") is None


def test_a_request_whose_lease_a_power_cut_took_is_still_re_sent(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", "in", "req-1")
    assert store.claim("r1", lease_seconds=3600) is not None
    assert store.due_resumes(0) == [], "in flight: not re-sent"
    (root / "inflight" / "r1.json").unlink()  # the lease is not fsynced: a power cut
    assert store.due_resumes(0) == ["r1"]


def test_refused_stale_writes_leave_every_file_byte_for_byte(store: FileStore, root: Path) -> None:
    store.save(make_run("r1"))
    store.request_resume("r1", "in", "req-1")
    first = store.claim("r1", lease_seconds=0)
    assert first is not None
    assert first.lease is not None
    assert len(store.recover_orphaned()) == 1
    assert store.claim("r1", lease_seconds=3600) is not None
    before = contents(root)
    stale = first.lease.token
    for write in (
        lambda: store.complete("r1", token=stale),
        lambda: store.save(make_run("r1", step="late"), token=stale),
        lambda: store.heartbeat("r1", stale),
        lambda: store.release("r1", stale, error="late"),
        lambda: store.cancel("r1", token=stale),
    ):
        with pytest.raises(LeaseLost):
            write()
        assert contents(root) == before


# -- writers' leftovers -----------------------------------------------------------------


def backdate(directory: Path, seconds: float) -> None:
    """Make every file in ``directory`` look ``seconds`` old."""
    when = time.time() - seconds
    for name in os.listdir(directory):
        os.utime(directory / name, (when, when))


def test_temp_files_are_never_listed_and_recovery_removes_them_by_age_alone(
    store: FileStore, root: Path
) -> None:
    store.save(make_run("r1"))
    half = make_run("r2").to_json()[:50]
    old = [root / "tmp" / f"{pid}.{c * 32}.tmp" for pid, c in ((os.getpid(), "a"), (1, "b"))]
    for path in old:
        path.write_bytes(half)
    backdate(root / "tmp", STALE_TMP_SECONDS + 60)
    # Young files of writers this pid namespace cannot see (pids that are not
    # alive here, or not numbers) may belong to a live writer in a container.
    young = [root / "tmp" / f"{pid}.{c * 32}.tmp" for pid, c in ((4_000_000, "c"), (9, "d"))]
    young.append(root / "tmp" / f"x.{'e' * 32}.tmp")
    for path in young:
        path.write_bytes(half)

    assert [info.run.run_id for info in store.list()] == ["r1"]
    assert store.count() == 1
    assert store.load("r2") is None
    store.recover_orphaned()
    assert files(root / "tmp") == sorted(p.name for p in young), "young temp files stay"
    assert store.load("r1") is not None


def test_a_slow_writer_in_another_pid_namespace_keeps_its_temp_file(
    store: FileStore, root: Path
) -> None:
    """A writer's temp file whose pid is not alive here survives recovery, and the
    write it belongs to completes (a pid in another namespace proves nothing)."""
    store.save(make_run("r1", step="old"))
    tree = store._fs
    tmp = root / "tmp" / f"{_dead_pid()}.{'f' * 32}.tmp"
    tmp.write_bytes(make_run("r1", step="new").to_json())  # a writer half way
    store.recover_orphaned()  # another worker's recovery pass meanwhile
    os.rename(tmp, tree.path("paused", "r1"))  # the writer goes on: its rename
    loaded = store.load("r1")
    assert loaded is not None
    assert loaded.step == "new"


def _exit_at_once() -> None:
    return None


def _dead_pid() -> int:
    ctx = mp_context()
    child = ctx.Process(target=_exit_at_once)
    child.start()
    child.join(CHILD_TIMEOUT)
    assert child.pid is not None
    return child.pid


# -- many paused runs --------------------------------------------------------------------


@pytest.mark.slow
def test_recovery_and_count_read_no_paused_record_they_do_not_need(
    store: FileStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused_runs = 20_000
    template = make_run("RUNID-PLACEHOLDER").to_json()
    for i in range(paused_runs):
        run_id = f"idle-{i:05d}"
        (root / "paused" / f"{run_id}.json").write_bytes(
            template.replace(b"RUNID-PLACEHOLDER", run_id.encode())
        )
    orphans = [f"orphan-{i}" for i in range(5)]
    for run_id in orphans:
        store.save(make_run(run_id))
        assert store.claim(run_id, lease_seconds=0) is not None
    live = "still-running"
    store.save(make_run(live))
    assert store.claim(live, lease_seconds=3600) is not None

    reads: list[tuple[str, str]] = []
    original = FileStore._read_run

    def counting(self: FileStore, kind: str, run_id: str) -> PausedWorkflow | None:
        reads.append((kind, run_id))
        return original(self, kind, run_id)

    monkeypatch.setattr(FileStore, "_read_run", counting)
    assert store.count() == paused_runs + len(orphans) + 1
    assert reads == [], "count reads no record"
    assert sorted(r.run_id for r in store.recover_orphaned()) == orphans
    assert {run_id for _, run_id in reads} <= {*orphans, live}
    assert len(reads) <= 2 * (len(orphans) + 1)


def test_a_second_corruption_keeps_the_first_corrupt_copy(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    paused = tmp_path / "store" / "paused"
    for garbage in (b"first garbage", b"second garbage"):
        (paused / "twice.json").write_bytes(garbage)
        assert list(store.list()) == []
    kept = sorted(p.read_bytes() for p in paused.iterdir() if ".corrupt" in p.name)
    assert kept == [b"first garbage", b"second garbage"]
