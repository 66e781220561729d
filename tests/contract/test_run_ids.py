"""Run-id validation at the store boundary: bad ids never reach a path or a key.

DESIGN: a run id is 1-200 characters of ``[A-Za-z0-9_.:-]``, not starting with
``.``; the stores also refuse ids ending in a suffix they use for their own
files. Anything else raises ``InvalidRunId`` before any key or path is touched,
so these tests check both the exception and that nothing appeared anywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_checkpoint import CheckpointStore, InvalidRunId
from celery_checkpoint.store.sqlite import sqlite_path
from tests.contract.helpers import StoreFactory, make_run, snapshot_tree

# The rule of DESIGN.md, written out independently of the model's own regex.
ALLOWED = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,199}")
# Suffixes of the stores' own files (model._RESERVED_SUFFIXES): refused too.
RESERVED = (".json", ".inflight", ".corrupt", ".tmp", ".lock", ".pending", ".ended")

HOSTILE: list[object] = [
    "../x",
    "../../x",
    "../../../x",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "",
    ".",
    "..",
    "x\x00",
    "x\x00/../../y",
    "x" * 10_000,
    "x" * 201,
    "é",
    "日本語",
    "run\u200b",
    "a b",
    "a\nb",
    "x.inflight",
    "x.json",
    "x.corrupt",
    "x.tmp",
    ".hidden",
    "*",
    "a?b",
    42,
    None,
    b"x",
    3.5,
    ["x"],
]

# Each store method that takes a run id, called with harmless other arguments.
METHODS: dict[str, Callable[[CheckpointStore, Any], object]] = {
    "save": lambda s, rid: s.save(make_run("ok").model_copy(update={"run_id": rid})),
    "save-token": lambda s, rid: s.save(make_run("ok").model_copy(update={"run_id": rid}), token=1),
    "load": lambda s, rid: s.load(rid),
    "lease": lambda s, rid: s.lease(rid),
    "claim": lambda s, rid: s.claim(rid),
    "request_resume": lambda s, rid: s.request_resume(rid, {"a": 1}, "req-1"),
    "heartbeat": lambda s, rid: s.heartbeat(rid, 1),
    "complete": lambda s, rid: s.complete(rid),
    "complete-token": lambda s, rid: s.complete(rid, token=1),
    "release": lambda s, rid: s.release(rid, 1, error="e"),
    "cancel": lambda s, rid: s.cancel(rid),
    "ended": lambda s, rid: s.ended(rid),
}


def is_allowed(run_id: str) -> bool:
    return ALLOWED.fullmatch(run_id) is not None and not run_id.endswith(RESERVED)


class Witness:
    """Everything a stray write could change: the files around the store, or the Redis keys."""

    def __init__(self, factory: StoreFactory, around: Path) -> None:
        self.factory = factory
        self.around = around

    def snapshot(self) -> object:
        if self.factory.backend == "file":
            return snapshot_tree(self.around)  # the store's own tree included
        if self.factory.backend == "sqlite":
            # The database's content, and every file around it but its own three
            # (a read may touch the -shm file's read marks).
            db = sqlite_path(self.factory.target)[0]
            files = {
                path: stat
                for path, stat in snapshot_tree(self.around).items()
                if not path.startswith(str(db))
            }
            with contextlib.closing(sqlite3.connect(db)) as conn:
                return files, list(conn.iterdump())
        return sorted(self._scan(self.factory.prefix + "*"))

    def stray_redis_keys(self, marker: str) -> list[bytes]:
        return self._scan(f"*{marker}*")

    def _scan(self, pattern: str) -> list[bytes]:
        return self.factory.scan_keys(pattern)


def _escape_paths(root: Path, run_id: str) -> list[str]:
    """Where a run id used unchecked as a file name would land outside the store."""
    outside = []
    for sub in ("paused", "inflight", "pending", "deadlines", "ended", "tmp", "locks"):
        for suffix in ("", ".json", ".corrupt"):
            path = os.path.normpath(os.path.join(root, sub, run_id + suffix))
            if not path.startswith(str(root) + os.sep):
                outside.append(path)
    return outside


def _lexists(path: str) -> bool:
    try:
        return os.path.lexists(path)
    except ValueError:  # an embedded NUL: no such path can exist
        return False


@pytest.mark.parametrize("method", sorted(METHODS))
def test_hostile_run_id_is_refused_by_every_method_and_touches_nothing(
    store: CheckpointStore, store_factory: StoreFactory, tmp_path: Path, method: str
) -> None:
    store.save(make_run("x"))  # a real run next to the hostile ids that resemble it
    kept = store.load("x")
    marker = f"escape-{uuid4().hex}"
    hostile = [
        *HOSTILE,
        f"../{marker}",
        f"../../{marker}",
        str(tmp_path.parent / marker),
        f"{marker}/../x",
        f"{marker}\x00",
    ]
    witness = Witness(store_factory, tmp_path.parent)
    before = witness.snapshot()
    call = METHODS[method]
    wrong: list[str] = []
    for run_id in hostile:
        try:
            call(store, run_id)
        except InvalidRunId as exc:
            assert isinstance(exc, ValueError)
        except Exception as exc:
            wrong.append(f"{run_id!r:.60}: {type(exc).__name__}: {exc}")
        else:
            wrong.append(f"{run_id!r:.60}: accepted")
    assert wrong == [], "hostile run ids not refused with InvalidRunId"
    assert witness.snapshot() == before, "a refused call changed something"
    if store_factory.backend == "redis":
        assert witness.stray_redis_keys(marker) == []
    assert not Path("/etc/passwd.json").exists()
    assert store.load("x") == kept


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    run_id=st.one_of(
        st.text(),
        st.text(alphabet="abc./\\:-_\x00é", max_size=12),
        st.from_regex(r"\.?[A-Za-z0-9_.:-]{1,205}", fullmatch=True),
        st.sampled_from(RESERVED).map(lambda suffix: "run" + suffix),
    )
)
def test_any_text_run_id_is_either_stored_inside_the_store_or_refused(
    store: CheckpointStore, store_factory: StoreFactory, tmp_path: Path, run_id: str
) -> None:
    on_disk = store_factory.backend == "file"
    witness = Witness(store_factory, tmp_path)
    escapes = _escape_paths(store_factory.root, run_id) if on_disk else []
    existed = {path for path in escapes if _lexists(path)}
    outside = snapshot_tree(tmp_path, exclude=store_factory.root) if on_disk else None
    before = witness.snapshot()
    run = make_run("ok").model_copy(update={"run_id": run_id})
    try:
        store.save(run)
    except InvalidRunId:
        assert not is_allowed(run_id), f"a valid run id was refused: {run_id!r}"
        for call in (METHODS["load"], METHODS["claim"], METHODS["cancel"]):
            with pytest.raises(InvalidRunId):
                call(store, run_id)
        assert witness.snapshot() == before
    else:
        assert is_allowed(run_id), f"an invalid run id was accepted: {run_id!r}"
        assert store.load(run_id) == run
        if on_disk:
            stored = store_factory.root / "paused" / f"{run_id}.json"
            assert stored.is_file()
            assert stored.resolve().parent == (store_factory.root / "paused").resolve()
        ended = store.cancel(run_id)
        assert ended is not None
        assert ended.run_id == run_id
        assert store.load(run_id) is None
    assert {path for path in escapes if _lexists(path)} == existed
    if on_disk:
        assert snapshot_tree(tmp_path, exclude=store_factory.root) == outside
