"""An embedded worker with tasks that pause with timeouts, for the operations tests.

:func:`running` starts ``celery.contrib.testing.worker.start_worker`` (threads
pool, ``memory://`` broker polled every 50 ms, ``cache+memory://`` results) on
an app bound to a file store in a temporary directory, with a queue of its own.
Bodies report what they saw in ``Ops.calls``; Celery's own ``task_postrun``
signal tells a test when a message has been handled (a timer message of an
earlier version, or a run message that was ignored), and the package's log
lines when a deadline timer went off with nothing to fire, so no test sleeps
to guess that something did not happen.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult
from celery.signals import task_postrun
from pydantic import BaseModel

from celery_checkpoint import Checkpoints, Pause
from celery_checkpoint.task import TIMER_TASK

T = TypeVar("T")


class Approval(BaseModel):
    approved: bool


@dataclass
class Ops:
    app: Celery
    checkpoints: Checkpoints
    store_dir: Path
    tasks: dict[str, Any]
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    #: (task name, task id, state, retval, args) of every message the worker finished
    handled: list[tuple[str, str, str | None, Any, tuple[Any, ...]]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: every line the package logged while the worker ran
    lines: list[str] = field(default_factory=list)

    def wait(self, predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
        """Poll until ``predicate()`` is truthy; a hang becomes a failure naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}; calls={self.calls}")
            time.sleep(0.02)

    def wait_state(self, result: AsyncResult, state: str) -> AsyncResult:
        """Wait for ``state``, read fresh (an ``AsyncResult`` caches a ready state)."""

        def fresh() -> AsyncResult:
            return AsyncResult(result.id, app=self.app)

        self.wait(lambda: fresh().state == state, f"{result.id} to be {state} ({fresh().state})")
        return fresh()

    def timers(self, run_id: str) -> list[Any]:
        """Return values of the timeout timers handled for ``run_id``."""
        with self.lock:
            return [
                retval
                for name, _, _, retval, args in self.handled
                if name == TIMER_TASK and args and args[0] == run_id
            ]

    def logged(self, text: str) -> list[str]:
        """The package's log lines containing ``text``."""
        with self.lock:
            return [line for line in self.lines if text in line]

    def ignored(self, run_id: str) -> int:
        """How many messages of the run itself the worker acknowledged and ignored."""
        with self.lock:
            return sum(
                1 for _, tid, state, _, _ in self.handled if tid == run_id and state == "IGNORED"
            )

    def bodies(self, name: str, run_id: str | None = None) -> list[tuple[Any, ...]]:
        """The ``calls`` entries named ``name`` (of ``run_id`` only, if given)."""
        return [
            call
            for call in self.calls
            if call[0] == name and (run_id is None or (len(call) > 1 and call[1] == run_id))
        ]


def build(store_dir: Path, **conf: Any) -> Ops:
    app = Celery("ops", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    # The memory transport's queues are shared by every app in the process: a
    # queue of its own keeps another test's worker off this app's messages.
    app.conf.task_default_queue = f"ops-{uuid.uuid4().hex[:12]}"
    app.conf.update(conf)
    checkpoints = Checkpoints(app, store=str(store_dir))
    ops = Ops(app=app, checkpoints=checkpoints, store_dir=store_dir, tasks={})

    @checkpoints.task(bind=True, name="ops.approve", shared=False)
    def approve(
        self: Any, order: int, timeout: float | None = None, on_timeout: str = "expire"
    ) -> Any:
        run = checkpoints.current()
        if not run.resumed:
            ops.calls.append(("approve-first", run.run_id))
            raise Pause(
                "await_approval",
                state={"order": order},
                timeout=timeout,
                on_timeout=on_timeout,  # type: ignore[arg-type]
                expects=Approval,
                reason=f"order {order}",
            )
        ops.calls.append(("approve", run.run_id, run.timed_out, run.resume_input, run.request_id))
        if run.timed_out:
            return "timed out"
        return "approved" if run.resume_input.approved else "refused"

    @checkpoints.task(bind=True, name="ops.two_step", shared=False)
    def two_step(self: Any, first_timeout: float) -> Any:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("first", timeout=first_timeout)
        ops.calls.append(("two_step", run.run_id, run.step, run.timed_out, run.resume_input))
        if run.step == "first":
            raise Pause("second", state={"first": run.resume_input})
        return [run.state, run.resume_input]

    @checkpoints.task(bind=True, name="ops.gated", shared=False)
    def gated(self: Any) -> Any:
        """The resumed body waits for the gate, then returns, raises or pauses as asked."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_go")
        ops.calls.append(("gated-start", run.run_id, run.token))
        ops.gate.wait(30)
        ops.calls.append(("gated-end", run.run_id, run.token))
        if run.resume_input == "raise":
            raise RuntimeError("the body failed after the gate")
        if run.resume_input == "pause":
            raise Pause("again")
        return "finished"

    @checkpoints.task(bind=True, name="ops.fails_when_timed_out", shared=False)
    def fails_when_timed_out(self: Any) -> Any:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_input")
        ops.calls.append(("fails_when_timed_out", run.run_id, run.timed_out, run.resume_input))
        if run.timed_out:
            raise RuntimeError("the timed-out body failed")
        return run.resume_input

    @checkpoints.task(bind=True, name="ops.keyed", shared=False)
    def keyed(self: Any, key: str) -> Any:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_event", key=key)
        return run.resume_input

    @app.task(name="ops.errback", shared=False)
    def errback(request: Any, exc: BaseException, traceback: Any) -> None:
        ops.calls.append(("errback", request.id, type(exc).__name__, str(exc)))

    @app.task(name="ops.after", shared=False)
    def after(value: Any) -> Any:
        ops.calls.append(("after", value))
        return value

    ops.tasks.update(
        approve=approve,
        two_step=two_step,
        gated=gated,
        fails_when_timed_out=fails_when_timed_out,
        keyed=keyed,
        errback=errback,
        after=after,
    )
    return ops


@contextmanager
def running(store_dir: Path, **conf: Any) -> Iterator[Ops]:
    """An :class:`Ops` whose embedded worker runs for the ``with`` block."""
    ops = build(store_dir, **conf)

    def record(
        sender: Any = None,
        task_id: str | None = None,
        state: str | None = None,
        retval: Any = None,
        args: Any = None,
        **_: Any,
    ) -> None:
        if sender is None or getattr(sender, "app", None) is not ops.app:
            return
        with ops.lock:
            ops.handled.append((sender.name, str(task_id), state, retval, tuple(args or ())))

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with ops.lock:
                ops.lines.append(record.getMessage())

    package = logging.getLogger("celery_checkpoint")
    level, lines = package.level, Lines(logging.DEBUG)
    package.setLevel(logging.DEBUG)
    package.addHandler(lines)
    task_postrun.connect(record, weak=False)
    try:
        with start_worker(ops.app, pool="threads", concurrency=4, perform_ping_check=False):
            yield ops
    finally:
        ops.gate.set()
        task_postrun.disconnect(record)
        package.removeHandler(lines)
        package.setLevel(level)
