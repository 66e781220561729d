"""An order workflow that pauses for a person's approval, end to end.

Run it with ``make demo`` or ``python examples/approval.py``. It needs no
server: it starts its own ``celery worker`` process on kombu's ``filesystem://``
transport and Celery's ``file://`` result backend in a temporary directory,
with the default file checkpoint store, and prints each step.

The workflow, ``approval.fulfil``:

1. reserves stock for the order (once: a resumed run skips it),
2. pauses at ``await_approval`` expecting an :class:`Approval` — the worker
   slot is free while a person decides,
3. is resumed with the decision and ships or cancels the order.

``filesystem://`` has no message acknowledgement, which is fine for a demo and
never for crash safety: use Redis or RabbitMQ in production.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery
from pydantic import BaseModel

from celery_checkpoint import Checkpoints, Pause, ResumeRejected

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    # Run as the module "approval", the name the worker imports, so the task
    # and the Approval type have one identity in both processes.
    _workdir = tempfile.mkdtemp(prefix="approval-demo-")
    os.environ["APPROVAL_DEMO_DIR"] = _workdir
    sys.path.insert(0, str(HERE))
    import approval

    try:
        sys.exit(approval.main())
    finally:
        shutil.rmtree(_workdir, ignore_errors=True)

WORKDIR = Path(os.environ.get("APPROVAL_DEMO_DIR") or tempfile.mkdtemp(prefix="approval-demo-"))
for folder in ("broker", "results", "checkpoints"):
    (WORKDIR / folder).mkdir(parents=True, exist_ok=True)

app = Celery("approval")
app.conf.update(
    broker_url="filesystem://localhost//",
    broker_transport_options={
        "data_folder_in": str(WORKDIR / "broker"),
        "data_folder_out": str(WORKDIR / "broker"),
        "control_folder": str(WORKDIR / "control"),
        "polling_interval": 0.1,
    },
    result_backend=f"file://{WORKDIR / 'results'}",
    checkpoint_store=str(WORKDIR / "checkpoints"),
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)
checkpoints = Checkpoints(app)


class Approval(BaseModel):
    approved: bool
    approver: str
    note: str = ""


def say(text: str) -> None:
    print(text, flush=True)


@checkpoints.task(bind=True, name="approval.fulfil")
def fulfil(self: object, order_id: int, items: list[str]) -> str:
    run = checkpoints.current()
    if not run.resumed:
        say(f"  [worker] order {order_id}: reserving stock for {', '.join(items)}")
        raise Pause(
            "await_approval",
            state={"reserved": items},
            expects=Approval,
            reason=f"order {order_id} needs a manager's approval",
        )
    decision: Approval = run.resume_input
    reserved = run.state["reserved"] if isinstance(run.state, dict) else []
    if decision.approved:
        say(f"  [worker] order {order_id}: approved by {decision.approver}, shipping {reserved}")
        return f"order {order_id} shipped"
    say(f"  [worker] order {order_id}: rejected by {decision.approver}, releasing {reserved}")
    return f"order {order_id} cancelled"


def wait_for_state(
    result: object, state: str, worker: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while getattr(result, "state", None) != state:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with status {worker.returncode}")
        if time.monotonic() > deadline:
            last = getattr(result, "state", None)
            raise SystemExit(f"timed out waiting for {state}, last state {last}")
        time.sleep(0.05)


def main() -> int:
    env = dict(os.environ, APPROVAL_DEMO_DIR=str(WORKDIR), PYTHONPATH=str(HERE))
    say(f"demo directory: {WORKDIR}")
    say("starting a celery worker (filesystem broker, file result backend, file store)")
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "approval", "--quiet", "worker"),
            *("--pool=solo", "--loglevel=ERROR"),
            *("--without-mingle", "--without-gossip", "--without-heartbeat"),
        ],
        cwd=HERE,
        env=env,
    )
    try:
        orders = {1: ["lamp", "desk"], 2: ["piano"]}
        results = {}
        for order_id, items in orders.items():
            results[order_id] = fulfil.delay(order_id, items)
            say(f"order {order_id}: sent as task {results[order_id].id}")
        for order_id, result in results.items():
            wait_for_state(result, "PAUSED", worker)
            say(f"order {order_id}: state {result.state}, waiting at {result.info['step']!r}")
        say(f"paused runs in the store: {checkpoints.store.count()}")

        try:
            checkpoints.resume(results[1].id, {"approved": "maybe"})
        except ResumeRejected as exc:
            say(f"order 1: a bad decision is refused and the run stays paused: {exc}")
            say(f"         {exc.errors[0]['loc']}: {exc.errors[0]['msg']}")

        checkpoints.resume(results[1].id, {"approved": True, "approver": "ana"})
        checkpoints.resume(results[2].id, {"approved": False, "approver": "ben"})
        for order_id, result in results.items():
            say(f"order {order_id}: {result.get(timeout=30)} (state {result.state})")
        say(f"paused runs left in the store: {checkpoints.store.count()}")
        return 0
    finally:
        worker.terminate()
        worker.wait(timeout=30)
