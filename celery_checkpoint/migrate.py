"""Moving runs from one store to another: the path from one machine to a fleet.

``celery -A proj checkpoint migrate SOURCE TARGET`` (or :func:`migrate`) copies
every paused run and every tombstone of ended runs, each written as it is
(tokens, deadlines, pending answers, business keys) with
:meth:`~celery_checkpoint.CheckpointStore.restore`, then read back and compared.

* **In-flight runs are refused**, each named with its holder: a body is running
  and will write to the source store. Let it finish (or its lease expire), then
  run the migration again.
* **Resumable**: a run the target already holds identically counts as already
  there, so a migration killed half-way is finished by running it again. A
  target holding a *different* record for a run is reported, never overwritten.
* Stop the workers first (or point them at the target): a worker still on the
  source could pause or answer a run after it was copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .model import RunRecord
from .store import CheckpointStore

__all__ = ["MigrationReport", "migrate"]


@dataclass
class MigrationReport:
    """What a migration did, run by run."""

    paused: int = 0  #: paused runs written to the target
    ended: int = 0  #: tombstones written to the target
    already_there: int = 0  #: runs the target held identically (a migration run again)
    #: runs not copied, and why (in flight, or the target holds another record)
    refused: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.refused

    def __str__(self) -> str:
        verb = "would copy" if self.dry_run else "copied"
        text = (
            f"{verb} {self.paused} paused run(s) and {self.ended} ended run(s); "
            f"{self.already_there} already in the target; {len(self.refused)} refused"
        )
        return text


def _same(a: RunRecord, b: RunRecord) -> bool:
    def comparable(run: RunRecord) -> Any:
        return json.loads(run.model_dump_json(exclude={"lease"}))

    return bool(comparable(a) == comparable(b))


def migrate(
    source: CheckpointStore,
    target: CheckpointStore,
    *,
    dry_run: bool = False,
    ended: bool = True,
    progress: Callable[[RunRecord], None] | None = None,
) -> MigrationReport:
    """Copy paused runs (and, with ``ended``, tombstones) from ``source`` to ``target``.

    Each written run is read back from the target and compared; see the module
    docstring for what is refused. ``progress`` is called once per run looked at.
    """
    report = MigrationReport(dry_run=dry_run)
    for info in source.list():
        run = info.run
        if progress is not None:
            progress(run)
        if info.lease is not None:
            report.refused.append(
                (
                    run.run_id,
                    f"in flight under token {info.lease.token}, held by {info.lease.owner}: let "
                    "its body finish (or its lease expire), then migrate again",
                )
            )
            continue
        if _copy(target, run, report, dry_run, target.load):
            report.paused += 1
    if ended:
        for tombstone in source.iter_ended():
            if progress is not None:
                progress(tombstone)
            if _copy(target, tombstone, report, dry_run, target.ended):
                report.ended += 1
    return report


def _copy(
    target: CheckpointStore,
    run: RunRecord,
    report: MigrationReport,
    dry_run: bool,
    read_back: Callable[[str], RunRecord | None],
) -> bool:
    """Write one run to the target; True if it was (or, dry, would be) written."""
    run = run.model_copy(update={"lease": None})
    if dry_run:
        there = target.exists(run.run_id)
        if there:
            report.already_there += 1
        return not there
    if not target.restore(run):
        existing = target.load(run.run_id) or target.ended(run.run_id)
        if existing is not None and _same(existing, run):
            report.already_there += 1
        else:
            report.refused.append(
                (
                    run.run_id,
                    "the target already holds another record of this run; left as it is",
                )
            )
        return False
    copied = read_back(run.run_id)
    if copied is None or not _same(copied, run):
        report.refused.append(
            (run.run_id, "written, but the target reads it back differently: check the target")
        )
        return False
    return True
