"""How a claimed run's lease ends, once its body has run or cannot run.

The run completes (its value kept until Celery stored it, the completion sent
again while the store is unreachable), is released back to PAUSED with nothing
lost, or expires (its pause timed out with ``on_timeout="expire"``). A lease
lost meanwhile (cancelled, or recovered elsewhere) turns each into ``Ignore``:
the run belongs to someone else now, and storing this outcome would overwrite
their state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery.exceptions import Ignore

from . import signals
from ._bound import Bound, BoundTask
from ._delivery import encode_result, track
from ._events import announce
from .exceptions import LeaseLost, PauseExpired, StoreUnavailable
from .model import ResumeRequest, RunRecord

__all__ = ["Claim", "Outcomes"]

logger = logging.getLogger("celery_checkpoint")

#: Waits between attempts to complete a run while the store is unreachable (seconds).
_COMPLETE_RETRIES = (0.05, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Claim:
    """A resume message's won claim, and what it must do (read from the record)."""

    run: RunRecord
    token: int
    request: ResumeRequest | None
    timed_out: bool

    @property
    def expires(self) -> bool:
        return self.timed_out and self.run.on_timeout == "expire"


class Outcomes:
    """The ends of a claimed run's lease, for the executor of one bound app."""

    bound: Bound

    def _expire(self, sender: BoundTask, claim: Claim) -> None:
        """End a claimed run whose pause timed out with ``on_timeout="expire"``; always raises.

        ``PauseExpired`` reaches Celery, which stores FAILURE and runs the
        error callbacks; ``Ignore`` if the run was cancelled meanwhile.
        """
        run = claim.run
        try:
            ended = self.bound.store.end(
                run.run_id, "expired", reason="pause timed out", token=claim.token
            )
        except LeaseLost as lost:
            logger.error("run %s: expiry dropped, the run moved on: %s", run.run_id, lost)
            raise Ignore() from lost
        announce(
            "expired",
            signals.checkpoint_expired,
            sender,
            ended if ended is not None else run,
            level=logging.WARNING,
            log={"expires_at": run.expires_at},
        )
        raise PauseExpired(
            f"run {run.run_id!r} expired: nobody resumed it at step {run.step!r} before "
            f"{run.expires_at.isoformat() if run.expires_at else 'its deadline'}"
        )

    def _ended_by_ignore(self, claim: Claim) -> bool:
        """Complete a run whose body raised ``Ignore``; False if the lease was lost."""
        try:
            self._finish(claim)
        except LeaseLost as lost:
            logger.error("run %s: ignored after its lease was lost: %s", claim.run.run_id, lost)
            return False
        logger.info(
            "run %s: the resumed body raised Ignore (or replaced itself): the run is complete "
            "and its task id belongs to whatever the body sent on",
            claim.run.run_id,
        )
        return True

    def _finish(self, claim: Claim, result: str | None = None) -> None:
        """``store.complete`` for the claim, re-sent while the store is unreachable.

        A lost reply leaves the completion applied or not; ``complete`` with the
        same token recognises its own earlier completion, so sending it again
        is safe and tells which.
        """
        run_id = claim.run.run_id
        for delay in (*_COMPLETE_RETRIES, None):
            try:
                self.bound.store.complete(run_id, token=claim.token, result=result)
                return
            except StoreUnavailable as exc:
                if delay is None:
                    raise
                logger.warning(
                    "run %s: completing failed (%s); trying again in %ss", run_id, exc, delay
                )
                time.sleep(delay)

    def _release(self, run_id: str, token: int, exc: BaseException) -> bool:
        """Give the run back after the body raised; False if the lease was lost."""
        try:
            self.bound.store.release(run_id, token, error=f"{type(exc).__name__}: {exc}")
        except LeaseLost as lost:
            logger.error(
                "run %s: body raised %r after its lease was lost (cancelled or recovered "
                "elsewhere), failure dropped: %s",
                run_id,
                exc,
                lost,
            )
            return False
        logger.info("run %s: body raised %r; run released back to PAUSED", run_id, exc)
        return True

    def _complete(self, task: BoundTask, claim: Claim, result: Any) -> None:
        run = claim.run
        kept = encode_result(result)
        try:
            self._finish(claim, kept)
        except LeaseLost as lost:
            # Cancelled, or another worker owns the run now: storing this result
            # would overwrite REVOKED or race the new owner.
            logger.error(
                "run %s: finished after its lease was lost, result dropped: %s", run.run_id, lost
            )
            raise Ignore() from lost
        if kept is not None:
            track(self.bound, run.run_id)
        announce(
            "completed",
            signals.checkpoint_completed,
            task,
            run,
            log={"token": claim.token},
            result=result,
        )
