"""The Celery app shared by the integration tests and their ``celery worker`` subprocesses.

A worker is started as ``celery -A tests.integration.proj worker ...`` from the
repository root; the test process builds the same app with :func:`make_app`.
Both read one :class:`Settings`, which travels to the worker as ``CC_IT_*``
environment variables (see :meth:`Settings.to_env`), so the two sides always
agree on the broker, the result backend, the queue, the key prefix and the
marker directory. The checkpoint store reaches the worker through its
``--checkpoint-store`` option, which the tests thereby exercise.

Checkpointed bodies leave marker files in ``Settings.markers`` (see
:func:`mark`): a test counts and times body executions from them instead of
trusting the body's return value alone.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel, Field

from celery_checkpoint import Checkpoints, Pause
from celery_checkpoint.signals import checkpoint_completed

ENV_PREFIX = "CC_IT_"


class Approval(BaseModel):
    """Resume input of :func:`approve`; module level so any process can validate it."""

    approved: bool
    approver: str


class Shipping(BaseModel):
    city: str
    express: bool = False


class Review(BaseModel):
    """Resume input of :func:`review`: a form with most kinds of field (the web tests)."""

    approved: bool
    approver: str = Field(pattern=r"^[a-z]+$", description="Your login, in lower case")
    quantity: int = Field(ge=1, le=10)
    priority: Literal["low", "normal", "high"] = "normal"
    tags: list[str] = []
    shipping: Shipping
    note: str | None = None


class Payment(BaseModel):
    """What the payment webhook answers ``proj.pay`` with."""

    status: Literal["succeeded", "failed"]
    amount: int


@dataclass(frozen=True)
class Settings:
    """Everything the test process and its worker subprocesses must agree on."""

    broker: str
    backend: str
    store: str
    markers: str
    queue: str
    #: every Redis key of one test starts with this (broker, results, Redis store)
    prefix: str
    lease_seconds: float = 10.0
    recovery_interval: float = 1.0
    acks_late: bool = False
    #: Redis broker only: seconds before an unacknowledged message is redelivered
    visibility_timeout: float = 0.0
    #: Redis broker only: restore unacknowledged messages past their visibility
    #: timeout every second (kombu's default looks every 100 s)
    restore_every_second: bool = False
    #: how long the chaos body sleeps between its start and end markers
    body_seconds: float = 2.0
    #: recoveries of one run before recovery marks it failed
    max_recoveries: float = 5
    #: seconds before recovery re-sends a lost resume or delivers a kept result
    resend_after: float = 300.0

    def to_env(self) -> dict[str, str]:
        return {
            ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in asdict(self).items()
        }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(ENV_PREFIX + spec.name.upper())
            if raw is None:
                continue
            if spec.type == "float":
                values[spec.name] = float(raw)
            elif spec.type == "bool":
                values[spec.name] = raw == "true"
            else:
                values[spec.name] = raw
        missing = [f.name for f in fields(cls) if f.name not in values and f.name in _REQUIRED]
        if missing:
            names = ", ".join(ENV_PREFIX + name.upper() for name in missing)
            raise RuntimeError(f"tests.integration.proj needs the environment variables {names}")
        return cls(**values)


_REQUIRED = ("broker", "backend", "store", "markers", "queue", "prefix")


def mark(markers: str, kind: str, run_id: str, execution: str | None = None) -> str:
    """Leave ``<kind>.<run_id>.<pid>.<execution>`` holding the wall-clock time, atomically.

    Returns ``execution`` (a fresh unique id if not given), so a body can tag
    its start and end markers as one execution.
    """
    execution = execution or uuid.uuid4().hex
    name = f"{kind}.{run_id}.{os.getpid()}.{execution}"
    tmp = Path(markers, "." + name)
    tmp.write_text(repr(time.time()))
    tmp.rename(Path(markers, name))
    return execution


def read_marks(markers: str | Path, kind: str, run_id: str) -> list[tuple[int, float]]:
    """(pid, time) of every ``kind`` marker of ``run_id``, oldest first."""
    found = []
    for path in Path(markers).glob(f"{kind}.{run_id}.*"):
        _, _, pid, _ = path.name.rsplit(".", 3)
        found.append((int(pid), float(path.read_text())))
    return sorted(found, key=lambda item: item[1])


def read_executions(markers: str | Path, run_id: str) -> list[tuple[int, float, float | None]]:
    """(pid, start, end or None) of every body execution of ``run_id``, by start time."""
    found = []
    for start in Path(markers).glob(f"start.{run_id}.*"):
        _, _, pid, execution = start.name.rsplit(".", 3)
        end = start.with_name(f"end.{run_id}.{pid}.{execution}")
        finished = float(end.read_text()) if end.exists() else None
        found.append((int(pid), float(start.read_text()), finished))
    return sorted(found, key=lambda item: item[1])


def gate_path(markers: str | Path, run_id: str) -> Path:
    """The file a gated body waits for before it returns."""
    return Path(markers, f"gate-{run_id}")


def make_app(settings: Settings, *, with_store: bool = True) -> Celery:
    """The test app; ``with_store=False`` leaves the store to ``--checkpoint-store``."""
    app = Celery("proj")
    broker_options: dict[str, Any] = {}
    if settings.broker.startswith("redis"):
        broker_options["global_keyprefix"] = f"{settings.prefix}:broker:"
        if settings.visibility_timeout:
            broker_options["visibility_timeout"] = settings.visibility_timeout
        if settings.restore_every_second:
            broker_options.update(unacked_restore_interval=1, unacked_restore_throttle=1)
    app.conf.update(
        broker_url=settings.broker,
        result_backend=settings.backend or None,  # "": no result backend at all
        broker_transport_options=broker_options,
        result_backend_transport_options={"global_keyprefix": f"{settings.prefix}:results:"},
        result_expires=3600,
        task_default_queue=settings.queue,
        task_acks_late=settings.acks_late,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        checkpoint_lease_seconds=settings.lease_seconds,
        checkpoint_recovery_interval=settings.recovery_interval,
        checkpoint_max_recoveries=int(settings.max_recoveries),
        checkpoint_resend_after=settings.resend_after,
    )
    if with_store:
        app.conf.checkpoint_store = settings.store
    checkpoints = Checkpoints(app)
    markers = settings.markers

    def kill_after_complete(sender: Any = None, run: Any = None, **_: Any) -> None:
        """A worker dying between the store's completion and Celery's SUCCESS: the
        whole worker (its process group), when the test asked for it."""
        if run is not None and Path(markers, f"kill-after-complete-{run.run_id}").exists():
            Path(markers, f"kill-after-complete-{run.run_id}").unlink()
            os.killpg(os.getpgrp(), signal.SIGKILL)

    checkpoint_completed.connect(kill_after_complete, weak=False)

    @app.task(shared=False, name="proj.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="proj.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="proj.lease_owner")
    def lease_owner(run_id: str) -> int | None:
        """The pid holding ``run_id``'s lease as this task sees it, or None."""
        lease = checkpoints.store.lease(run_id)
        return None if lease is None else lease.owner.pid

    @checkpoints.task(bind=True, shared=False, name="proj.wait_for")
    def wait_for(self: Any, x: int) -> int:
        """Pauses once; returns ``x`` plus the resume input."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_number", state={"x": x}, expects=int)
        mark(markers, "body", run.run_id)
        return x + int(run.resume_input)

    @checkpoints.task(bind=True, shared=False, name="proj.approve")
    def approve(self: Any, order: str) -> str:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_approval", expects=Approval, reason=f"order {order}")
        decision: Approval = run.resume_input
        mark(markers, "body", run.run_id)
        verdict = "approved" if decision.approved else "refused"
        return f"{order} {verdict} by {decision.approver}"

    @checkpoints.task(bind=True, shared=False, name="proj.timed")
    def timed(self: Any, x: int, timeout: float, on_timeout: str = "resume") -> Any:
        """Pauses with ``timeout``; the resumed body marks its start (a lateness probe)."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause(
                "await_deadline",
                state={"x": x},
                timeout=timeout,
                on_timeout=on_timeout,  # type: ignore[arg-type]
            )
        mark(markers, "body", run.run_id)
        return "timed out" if run.timed_out else run.resume_input

    @checkpoints.task(bind=True, shared=False, name="proj.pay")
    def pay(self: Any, order: str, intent: str) -> dict[str, Any]:
        """Pauses for the payment of ``intent``, named by the key ``stripe:<intent>``."""
        run = checkpoints.current()
        if not run.resumed:
            mark(markers, "first", run.run_id)
            raise Pause("await_payment", key=f"stripe:{intent}", expects=Payment)
        mark(markers, "body", run.run_id)
        return {"order": order, "payment": run.resume_input.model_dump(mode="json")}

    @checkpoints.task(bind=True, shared=False, name="proj.review")
    def review(self: Any, order: str) -> dict[str, Any]:
        """Pauses for a :class:`Review`; returns the order and the review as JSON."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_review", expects=Review, reason=f"order {order} needs a review")
        mark(markers, "body", run.run_id)
        return {"order": order, "review": run.resume_input.model_dump(mode="json")}

    @checkpoints.task(bind=True, shared=False, name="proj.two_pauses")
    def two_pauses(self: Any, x: int) -> dict[str, Any]:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("first", state={"x": x})
        mark(markers, f"body-{run.step}", run.run_id)
        if run.step == "first":
            raise Pause("second", state={"x": x, "first": run.resume_input})
        first = run.state["first"] if isinstance(run.state, dict) else None
        return {"x": x, "first": first, "second": run.resume_input}

    @checkpoints.task(bind=True, shared=False, name="proj.fail_on_request")
    def fail_on_request(self: Any, x: int) -> int:
        """The resumed body raises when the input asks it to."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_verdict", state={"x": x})
        mark(markers, "body", run.run_id)
        verdict = run.resume_input if isinstance(run.resume_input, dict) else {}
        if verdict.get("fail"):
            raise RuntimeError(f"resumed body of {run.run_id} failed on request")
        return x * 10

    @checkpoints.task(bind=True, shared=False, name="proj.gated")
    def gated(self: Any, x: int) -> Any:
        """The resumed body marks its start, then waits for the test to open its gate."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_input", state={"x": x})
        mark(markers, "body", run.run_id)
        gate = gate_path(markers, run.run_id)
        while not gate.exists():
            time.sleep(0.02)
        return run.resume_input

    @checkpoints.task(bind=True, shared=False, name="proj.gated_pause")
    def gated_pause(self: Any, x: int) -> Any:
        """The first execution marks its start and waits for its gate before it pauses."""
        run = checkpoints.current()
        if not run.resumed:
            mark(markers, "first", run.run_id)
            gate = gate_path(markers, f"pause-{run.run_id}")
            while not gate.exists():
                time.sleep(0.02)
            raise Pause("await_input", state={"x": x})
        mark(markers, "body", run.run_id)
        return x + int(run.resume_input)

    @checkpoints.task(bind=True, shared=False, name="proj.slow")
    def slow(self: Any, x: int) -> int:
        """The resumed body marks start, sleeps ``body_seconds``, marks end (chaos)."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_go", state={"x": x})
        execution = mark(markers, "start", run.run_id)
        time.sleep(settings.body_seconds)
        mark(markers, "end", run.run_id, execution)
        return x * 2

    return app


def resume_from_child(
    env: dict[str, str], run_id: str, value: int, request_id: str, go: Any, out: Any
) -> None:
    """Child-process side of the concurrent resume test: one resume when ``go`` is set."""
    from celery_checkpoint import AlreadyResumed

    app = make_app(Settings.from_env(env))
    checkpoints = Checkpoints.for_app(app)
    checkpoints.store.load(run_id)  # open the store before the start line
    out.put(("ready", request_id, None))
    go.wait()
    try:
        checkpoints.resume(run_id, value, request_id=request_id)
    except AlreadyResumed:
        out.put(("already", request_id, None))
    except Exception as exc:
        out.put(("error", request_id, repr(exc)))
    else:
        out.put(("accepted", request_id, value))
    finally:
        app.close()


def __getattr__(name: str) -> Any:
    # ``celery -A tests.integration.proj`` looks up ``app``: build it from the
    # environment only then, so importing this module in the tests builds nothing.
    if name == "app":
        from_option = os.environ.get(ENV_PREFIX + "STORE_FROM_OPTION") == "true"
        app = make_app(Settings.from_env(), with_store=not from_option)
        globals()["app"] = app
        return app
    raise AttributeError(name)
