"""A resumed body's wait for the PAUSED state its pausing worker stores.

A pausing worker saves the checkpoint first and stores the Celery state PAUSED
just after, so a resume can claim the run in between; :func:`await_paused_state`
keeps its body from finishing before that late PAUSED lands on its result.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from celery import states

from ._bound import BoundTask
from ._results import readable
from .model import RunRecord, utcnow
from .pause import PAUSED, RESUMING

__all__ = ["await_paused_state"]

logger = logging.getLogger("celery_checkpoint")

#: Longest a resumed body waits for the pausing worker's PAUSED state (seconds).
_PAUSED_STATE_WAIT = 5.0
#: A pause older than this has stored its PAUSED state long ago, or never will.
_PAUSED_STATE_RECENT = timedelta(minutes=1)


def await_paused_state(task: BoundTask, run: RunRecord) -> None:
    """Wait (briefly) until the pausing worker has stored PAUSED for this pause.

    It saves the checkpoint first and stores the Celery state just after; a
    resume fast enough to finish in between would have its SUCCESS
    overwritten by that late PAUSED. Normally the state is there already
    and this is one result-backend read. Nothing waits when the state
    cannot be read back (no result backend, ``rpc://``) or when the pause
    is older than any such late write (PAUSED may have expired from the
    backend since: the store, not the backend, says the run is paused).
    """
    if not readable(task.backend) or utcnow() - run.paused_at > _PAUSED_STATE_RECENT:
        return
    deadline = time.monotonic() + _PAUSED_STATE_WAIT
    while True:
        try:
            meta = task.backend.get_task_meta(run.run_id, cache=False)
        except Exception:  # a backend that stores nothing, or is down: do not wait
            return
        state = meta.get("status")
        result = meta.get("result")
        if state in (RESUMING, states.RETRY) or state in states.READY_STATES:
            return  # past the pause: a retry of the resumed body stored RETRY over it
        if (
            state == PAUSED
            and isinstance(result, dict)
            and result.get("pause_seq", run.pause_seq) >= run.pause_seq
        ):
            return
        if time.monotonic() >= deadline:
            logger.warning(
                "run %s: resuming although the result backend does not show pause %d "
                "(state %s): the pausing worker may have died between its two writes",
                run.run_id,
                run.pause_seq,
                state,
            )
            return
        time.sleep(0.01)
