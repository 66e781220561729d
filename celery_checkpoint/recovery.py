"""One recovery pass, and its policy.

Every worker runs :func:`recover` before it takes its first task and then every
``checkpoint_recovery_interval`` seconds (:mod:`celery_checkpoint.bootstep`);
``celery checkpoint recover`` runs one by hand. A pass:

1. re-arms in-flight runs whose lease expired or whose owner process is proved
   dead, and re-sends those that had a pending resume request;
2. marks FAILURE any run recovered more than ``checkpoint_max_recoveries``
   times, instead of letting it crash workers forever;
3. re-sends pending resume requests whose message looks lost
   (``checkpoint_resend_after``);
4. fires pauses whose deadline has passed, from the store's deadline index;
5. in a worker, arms the worker's timer for the store's earliest deadline
   (:mod:`._timeouts`), so it fires at that deadline rather than at the next
   pass: a pass is what tells a worker of deadlines paused elsewhere, or
   before a restart;
6. delivers again the kept value of runs completed by a worker that stopped
   before Celery stored their result (:mod:`._delivery`).

Every step goes through the store's compare-and-set and claim, so any number
of workers may run passes at once. One run's trouble (a corrupt record, the
broker) is logged and never stops the pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import states

from . import signals
from ._bound import Bound
from ._client import send
from ._delivery import deliver_due
from ._events import announce, log_event
from ._results import try_store_state
from ._timeouts import Timeouts
from .exceptions import CheckpointError
from .model import RunRecord

__all__ = ["RecoveryReport", "recover"]

logger = logging.getLogger("celery_checkpoint.recovery")


@dataclass(frozen=True)
class RecoveryReport:
    """What one pass did."""

    rearmed: int = 0
    resent: int = 0
    failed: int = 0
    timeouts: int = 0
    delivered: int = 0

    def __bool__(self) -> bool:
        return bool(self.rearmed or self.resent or self.failed or self.timeouts or self.delivered)

    def __str__(self) -> str:
        return (
            f"{self.rearmed} re-armed, {self.resent} resume(s) re-sent, "
            f"{self.failed} failed after too many recoveries, {self.timeouts} timeout(s) fired, "
            f"{self.delivered} result(s) delivered again"
        )


def recover(bound: Bound, timeouts: Timeouts) -> RecoveryReport:
    """One recovery pass over the bound app's store; safe on any number of workers at once."""
    rearmed = bound.store.recover_orphaned()
    failed = sum(_give_up_or_announce(bound, run) for run in rearmed)
    report = RecoveryReport(
        rearmed=len(rearmed),
        resent=_resend_pending(bound),
        failed=failed,
        timeouts=timeouts.fire_due(),
        delivered=deliver_due(bound),
    )
    timeouts.refresh()
    return report


def _give_up_or_announce(bound: Bound, run: RunRecord) -> bool:
    """A re-armed run: fail it past ``max_recoveries`` (True), else announce it."""
    limit = bound.config.max_recoveries
    if run.recoveries > limit:
        reason = (
            f"recovered {run.recoveries} times (checkpoint_max_recoveries={limit}): "
            "its body keeps killing workers or never finishes"
        )
        if bound.store.end(run.run_id, "failed", reason=reason) is not None:
            # With the run's request (rpc:// routes by it); a failure to store
            # it must not stop the pass.
            try_store_state(
                bound.app, run, CheckpointError(f"run {run.run_id!r} {reason}"), states.FAILURE
            )
            log_event(
                "failed",
                logging.ERROR,
                run_id=run.run_id,
                task=run.task_name,
                step=run.step,
                pause_seq=run.pause_seq,
                recoveries=run.recoveries,
                reason=reason,
            )
            return True
    announce(
        "recovered",
        signals.checkpoint_recovered,
        bound.app,
        run,
        log={"recoveries": run.recoveries},
    )
    return False


def _resend_pending(bound: Bound) -> int:
    """Re-send resume requests left pending for ``resend_after`` seconds."""
    resent = 0
    store = bound.store
    for run_id in store.due_resumes(bound.config.resend_after):
        try:
            waiting = store.load(run_id)
            if waiting is not None and waiting.resume is not None:
                kind = "timeout" if waiting.resume.timed_out else "resume"
                send(bound, waiting, waiting.resume, kind=kind)
                resent += 1
        except Exception as exc:
            logger.warning("run %s: could not re-send its resume: %s", run_id, exc)
    return resent
