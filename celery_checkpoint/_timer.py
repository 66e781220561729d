"""One thread per process, asleep until the earliest pause deadline the process knows of.

Nothing here is held in a broker: a deadline lives in the store's deadline
index, and this timer only decides *when* to look. It knows deadlines two ways:

* **armed** by a pause saved in this process (a pool child under prefork, the
  worker itself under the threads and solo pools): the run and its pause are
  known, so at the deadline that one run's timeout is fired directly. Only the
  earliest :data:`ARMED_LIMIT` are kept, so memory stays flat however many runs
  a process pauses; the store reports the others.
* **followed** in the store (a worker's main process): each recovery pass
  hands over the store's earliest deadline (:meth:`DeadlineTimer.follow`). At
  that time the timer *sweeps*: it fires every deadline then due in the
  store's index and reads the next one, and so on.

The store's earliest deadline may be one a sweep has just examined and left:
a run answered but not ended yet, in flight, or whose timed-out body failed.
The index cannot tell what comes after it, so the timer *peeks* (reads the
earliest deadline again, nothing else) with growing delays until it changes,
and the recovery pass fires whatever falls due meanwhile.

Firing is the caller's: whatever fires a timeout goes through the store's
compare-and-set, so any number of timers and passes, in any number of
processes, may fire the same deadline and exactly one succeeds. A firing that
fails (the store is down) is tried again with growing delays; the thread logs
and survives every exception. After a ``fork`` the child starts with an empty
timer and no thread: it arms the pauses it saves itself.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import NamedTuple

from .exceptions import CheckpointError, StoreUnavailable

__all__ = ["ARMED_LIMIT", "DeadlineTimer"]

logger = logging.getLogger("celery_checkpoint")

#: Deadlines armed by this process's own pauses that the timer remembers.
ARMED_LIMIT = 1000
#: Woken this long after a deadline, so the firing's own clock reads past it.
_MARGIN = 0.005
#: The longest single sleep: the wall clock is read again at least this often.
_LONGEST_SLEEP = 60.0
#: Delays between tries (a firing that failed, a peek): 1, 2, 4... s, up to this.
_LONGEST_DELAY = 30.0


class _Armed(NamedTuple):
    at: float  # when to wake: the deadline (epoch seconds) plus the margin
    run_id: str
    pause_seq: int
    tries: int = 0


def _delay(tries: int) -> float:
    return float(min(_LONGEST_DELAY, 2 ** min(tries, 10)))


class DeadlineTimer:
    """Fires pause timeouts of one bound app at their deadlines; see the module docstring.

    ``fire(run_id, pause_seq)`` fires one run's timeout if it is due;
    ``sweep(now)`` fires every deadline due by ``now`` in the store's index;
    ``earliest()`` reads the store's earliest deadline. Each may raise: the
    timer tries again later.
    """

    def __init__(
        self,
        fire: Callable[[str, int], bool],
        sweep: Callable[[datetime], object],
        earliest: Callable[[], datetime | None],
    ) -> None:
        self._fire = fire
        self._sweep = sweep
        self._earliest = earliest
        self._reset()
        _TIMERS.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._generation = 0  # a thread runs while its generation is current
        self._armed: list[_Armed] = []  # sorted by ``at``
        #: whether this process follows the store's deadlines (a worker's main process)
        self._following = False
        self._store_at: float | None = None  # when to look at the store's index next
        self._sweeping = False  # at _store_at: sweep (True) or only peek (False)
        self._store_tries = 0
        self._swept_through = float("-inf")  # every deadline up to here was examined

    # -- what the rest of the package calls ---------------------------------------

    @property
    def following(self) -> bool:
        return self._following

    def arm(self, run_id: str, pause_seq: int, deadline: datetime) -> None:
        """Fire ``run_id``'s timeout at ``deadline`` (a pause saved in this process)."""
        with self._cond:
            self._add(_Armed(deadline.timestamp() + _MARGIN, run_id, pause_seq))
            self._wake()

    def follow(self, earliest: datetime | None) -> None:
        """Look at the store's index at ``earliest``, the store's earliest deadline as
        just read; from now on, read the next one after each look."""
        with self._cond:
            self._following = True
            self._follow(earliest, time.time())
            self._wake()

    def stop(self) -> None:
        """Stop the thread and forget every deadline (the worker is shutting down)."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._armed.clear()
            self._following = False
            self._store_at = None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    # -- state, under the lock ---------------------------------------------------------

    def _add(self, armed: _Armed) -> None:
        if len(self._armed) >= ARMED_LIMIT and armed.at >= self._armed[-1].at:
            return  # the store reports it: to the worker's recovery pass, or a later sweep
        bisect.insort(self._armed, armed)
        del self._armed[ARMED_LIMIT:]

    def _follow(self, earliest: datetime | None, now: float) -> None:
        if earliest is None:
            self._store_at = None
        elif earliest.timestamp() > self._swept_through:
            self._store_at, self._sweeping = earliest.timestamp() + _MARGIN, True
            self._store_tries = 0
        else:  # examined by the last sweep and left: look again later
            self._store_at, self._sweeping = now + _delay(self._store_tries), False
            self._store_tries += 1

    def _wake(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, args=(self._generation,), name="checkpoint-timer", daemon=True
            )
            self._thread.start()
        self._cond.notify_all()

    def _next_work(self, generation: int) -> tuple[list[_Armed], bool | None] | None:
        """Sleep until something is due: the armed deadlines due, and whether to
        sweep (True) or peek (False) at the store, or not (None); None once stopped."""
        with self._cond:
            while generation == self._generation:
                now = time.time()
                wake = min(
                    self._store_at if self._store_at is not None else now + _LONGEST_SLEEP,
                    self._armed[0].at if self._armed else now + _LONGEST_SLEEP,
                )
                if wake > now:
                    self._cond.wait(min(wake - now, _LONGEST_SLEEP))
                    continue
                due = [armed for armed in self._armed if armed.at <= now]
                del self._armed[: len(due)]
                look = None
                if self._store_at is not None and self._store_at <= now:
                    self._store_at, look = None, self._sweeping
                return due, look
            return None

    # -- the thread ------------------------------------------------------------------

    def _run(self, generation: int) -> None:
        while True:
            try:
                work = self._next_work(generation)
                if work is None:
                    return
                due, look = work
                for armed in due:
                    self._fire_armed(armed)
                if look is not None:
                    self._look(sweep=look)
            except Exception:  # a timer thread never dies of an exception
                logger.exception("checkpoint timer: unexpected error; going on")
                with self._cond:
                    self._cond.wait(1.0)

    def _fire_armed(self, armed: _Armed) -> None:
        try:
            fired = self._fire(armed.run_id, armed.pause_seq)
        except StoreUnavailable as exc:
            self._retry(armed, exc)
        except CheckpointError as exc:
            # A corrupt record, say: trying again cannot help; the recovery pass reports it.
            logger.warning("run %s: could not fire its timeout: %s", armed.run_id, exc)
        except Exception as exc:  # the broker: the resend pass covers a recorded request
            self._retry(armed, exc)
        else:
            if not fired:
                logger.debug(
                    "run %s: nothing to fire at the deadline of pause %d (answered, ended, "
                    "paused again, or fired elsewhere)",
                    armed.run_id,
                    armed.pause_seq,
                )

    def _retry(self, armed: _Armed, exc: Exception) -> None:
        delay = _delay(armed.tries)
        logger.warning(
            "run %s: could not fire its timeout (%s); trying again in %.0fs",
            armed.run_id,
            exc,
            delay,
        )
        with self._cond:
            self._add(armed._replace(at=time.time() + delay, tries=armed.tries + 1))

    def _look(self, *, sweep: bool) -> None:
        """Sweep (fire what is due, then read the earliest deadline) or only peek."""
        now = time.time()
        try:
            if sweep:
                self._sweep(datetime.fromtimestamp(now, timezone.utc))
            earliest = self._earliest()
        except Exception as exc:
            with self._cond:
                delay = _delay(self._store_tries)
                self._store_tries += 1
                if self._following and self._store_at is None:
                    self._store_at, self._sweeping = time.time() + delay, sweep
            logger.warning(
                "could not fire due pause timeouts from the store (%s); trying again in %.0fs",
                exc,
                delay,
            )
            return
        with self._cond:
            if sweep:
                self._swept_through = max(self._swept_through, now)
            if self._following and self._store_at is None:  # else a pass just followed
                self._follow(earliest, time.time())


_TIMERS: weakref.WeakSet[DeadlineTimer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here and its lock may have been held
    # at the fork: start empty. The child arms the pauses it saves itself.
    for timer in list(_TIMERS):
        timer._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
