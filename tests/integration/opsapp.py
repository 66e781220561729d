"""The app of the operations integration tests: timeouts, cancel and ``celery checkpoint``.

Workers and ``celery checkpoint`` subprocesses run ``celery -A
tests.integration.opsapp ...`` from the repository root; the test process
builds the same app with :func:`make_app`. Both read their settings from
``OPS_IT_*`` environment variables (:func:`environment` writes them), so the
broker, result backend, queue, key prefix, store and marker directory always
agree. Bodies leave marker files in the marker directory, which is how a test
counts executions across processes.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import BaseModel

from celery_checkpoint import Checkpoints, Pause

PREFIX = "OPS_IT_"
KEYS = ("broker", "backend", "store", "queue", "prefix", "markers", "recovery_interval")


class Approval(BaseModel):
    approved: bool
    approver: str


def environment(**settings: str) -> dict[str, str]:
    """The ``OPS_IT_*`` variables for ``settings`` (see ``KEYS``)."""
    unknown = set(settings) - set(KEYS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    return {PREFIX + key.upper(): str(value) for key, value in settings.items()}


def mark(markers: str, kind: str, run_id: str, text: str = "") -> None:
    """Leave ``<kind>.<run_id>.<unique>`` holding ``text``, atomically."""
    name = f"{kind}.{run_id}.{uuid.uuid4().hex}"
    tmp = Path(markers, "." + name)
    tmp.write_text(text)
    tmp.rename(Path(markers, name))


def marks(markers: str | Path, kind: str, run_id: str) -> list[str]:
    return sorted(p.read_text() for p in Path(markers).glob(f"{kind}.{run_id}.*"))


def make_app(env: dict[str, str] | None = None) -> Celery:
    env = dict(os.environ if env is None else env)

    def get(key: str, default: str | None = None) -> str:
        value = env.get(PREFIX + key.upper(), default)
        if value is None:
            raise RuntimeError(f"tests.integration.opsapp needs {PREFIX + key.upper()}")
        return value

    prefix = get("prefix", "ops-it")
    broker = get("broker")
    app = Celery("opsapp", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=get("backend"),
        task_default_queue=get("queue", "ops-it"),
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        result_expires=3600,
        checkpoint_store=get("store"),
        checkpoint_recovery_interval=float(get("recovery_interval", "30")),
        checkpoint_lease_seconds=10,
    )
    if broker.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:broker:"}
        app.conf.result_backend_transport_options = {"global_keyprefix": f"{prefix}:results:"}
    checkpoints = Checkpoints(app)
    markers = get("markers", "")

    @checkpoints.task(bind=True, name="opsapp.approve", shared=False)
    def approve(
        self: Any, order: str, timeout: float | None = None, on_timeout: str = "expire"
    ) -> str:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause(
                "await_approval",
                timeout=timeout,
                on_timeout=on_timeout,  # type: ignore[arg-type]
                expects=Approval,
                reason=f"order {order}",
            )
        if run.timed_out:
            mark(markers, "body", run.run_id, "timed out")
            return f"{order} timed out"
        decision: Approval = run.resume_input
        mark(markers, "body", run.run_id, decision.approver)
        return f"{order} {'approved' if decision.approved else 'refused'} by {decision.approver}"

    @checkpoints.task(bind=True, name="opsapp.gated", shared=False)
    def gated(self: Any) -> str:
        """The resumed body marks its start and waits for its gate file."""
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("await_go")
        mark(markers, "start", run.run_id)
        gate = Path(markers, f"gate-{run.run_id}")
        while not gate.exists():
            time.sleep(0.02)
        mark(markers, "end", run.run_id)
        return "finished"

    @app.task(name="opsapp.record_error", shared=False)
    def record_error(request: Any, exc: BaseException, traceback: Any) -> None:
        """An error callback (``link_error``): called in the worker with the failure."""
        mark(markers, "errback", request.id, f"{type(exc).__name__}: {exc}")

    return app


def __getattr__(name: str) -> Any:
    # ``celery -A tests.integration.opsapp`` looks up ``app``: build it from the
    # environment only then, so importing this module in the tests builds nothing.
    if name == "app":
        app = make_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)
