"""One heartbeat thread per process renews the leases of every running body.

A thread per resumed body would cost a thread start and join on every resume;
this one is started once per process (again after a fork, whose child has no
threads) and sleeps until the next lease is due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time

from .exceptions import LeaseLost
from .store import CheckpointStore

__all__ = ["Beat", "heartbeats"]

logger = logging.getLogger("celery_checkpoint")


class Beat:
    """One lease being renewed; ``stop()`` when the body ends."""

    def __init__(
        self,
        store: CheckpointStore,
        run_id: str,
        token: int,
        lease_seconds: float,
        interval: float,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.token = token
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.lost: LeaseLost | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def renew(self) -> bool:
        """Renew once; False when the lease is gone for good."""
        try:
            self.store.heartbeat(self.run_id, self.token, lease_seconds=self.lease_seconds)
        except LeaseLost as lost:
            if not self.stopped:  # after stop(), the body's own write ended the lease
                self.lost = lost
                logger.error("run %s: lease lost while the body runs: %s", self.run_id, lost)
            return False
        except Exception as exc:  # keep beating: the store may come back
            logger.warning("run %s: heartbeat failed: %s", self.run_id, exc)
        return True


class _Heartbeats:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Beat]] = []
        self._seq = itertools.count()
        self._pid = -1

    def start(
        self,
        store: CheckpointStore,
        run_id: str,
        token: int,
        *,
        lease_seconds: float,
        interval: float,
    ) -> Beat:
        beat = Beat(store, run_id, token, lease_seconds, interval)
        with self._cond:
            if self._pid != os.getpid():  # first use, or a forked child: no thread yet
                self._pid = os.getpid()
                self._due = []
                threading.Thread(target=self._run, name="checkpoint-heartbeat", daemon=True).start()
            heapq.heappush(self._due, (time.monotonic() + interval, next(self._seq), beat))
            if self._due[0][2] is beat:  # due before the one the thread waits for
                self._cond.notify()
        return beat

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
                _, _, beat = heapq.heappop(self._due)
            if beat.stopped or not beat.renew() or beat.stopped:
                continue
            with self._cond:
                heapq.heappush(self._due, (time.monotonic() + beat.interval, next(self._seq), beat))


#: The process's heartbeat scheduler.
heartbeats = _Heartbeats()
