"""An order workflow that pauses for a person's approval, end to end.

Run it with ``make demo`` or ``python examples/approval.py``. It needs no
server: it starts its own ``celery worker`` process on kombu's ``filesystem://``
transport and Celery's ``file://`` result backend in a temporary directory,
with the default kind of checkpoint store (an embedded SQLite database, here
in that directory), and prints each step.

The workflow, ``approval.fulfil``:

1. reserves stock for the order (once: a resumed run skips it),
2. pauses at ``await_approval`` expecting an :class:`Approval` — the worker
   slot is free while a person decides,
3. is resumed with the decision and ships or cancels the order.

Then the front door: the demo serves the web app (:func:`celery_checkpoint.web.create_app`)
on loopback beside its worker, prints the inbox's address and the approval
e-mail of a third order (``examples/approval_email.py``), and answers that
order by POSTing the e-mail's "Approve" link, as the confirm button would.

``filesystem://`` has no message acknowledgement, which is fine for a demo and
never for crash safety: use Redis or RabbitMQ in production.
"""

from __future__ import annotations

import json
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
    checkpoint_store=f"sqlite:///{WORKDIR / 'checkpoints.db'}",
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
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, APPROVAL_DEMO_DIR=str(WORKDIR), PYTHONPATH=path)
    say(f"demo directory: {WORKDIR}")
    say("starting a celery worker (filesystem broker, file result backend, SQLite store)")
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
        front_door(worker)
        return 0
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def front_door(worker: subprocess.Popen[bytes]) -> None:
    """Serve the web app beside the worker and answer an order through a signed link."""
    import socket
    import threading
    import urllib.request

    import uvicorn
    from approval_email import email_body

    from celery_checkpoint.web import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    token = "demo-token-0123456789abcdef"
    web = create_app(
        checkpoints,
        secret_keys=["demo-key-0123456789abcdef"],
        base_url=base,
        tokens={token: "demo-ops"},
        # A demo on loopback: anyone on this machine is "local-demo" in the inbox.
        authenticate=lambda request: "local-demo" if request.client else None,
    )
    server = uvicorn.Server(uvicorn.Config(web, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    try:
        say("")
        say(f"web app serving beside the worker: inbox {base}/ , API {base}/api/runs")
        result = fulfil.delay(3, ["chair"])
        wait_for_state(result, "PAUSED", worker)
        ask = urllib.request.Request(
            f"{base}/api/runs", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(ask, timeout=30) as response:
            listed = json.load(response)["runs"]
        say(f"order 3: paused; GET /api/runs lists {len(listed)} paused run(s)")
        body = email_body(checkpoints, result.id, "3", "manager@shop.example")
        say("the approval e-mail for order 3:")
        for line in body.splitlines():
            say(f"  | {line}")
        approve = next(line.split(": ", 1)[1] for line in body.splitlines() if "Approve:" in line)
        with urllib.request.urlopen(approve, timeout=30) as response:
            say(f"GET the Approve link (a mail scanner would): {response.status}, nothing changed")
        confirm = urllib.request.Request(approve, data=b"", method="POST")
        with urllib.request.urlopen(confirm, timeout=30) as response:
            say(f"POST the Approve link (the confirm button): {response.status}, answer recorded")
        say(f"order 3: {result.get(timeout=30)} (state {result.state})")
        ended = checkpoints.store.ended(result.id)
        if ended is not None and ended.resume is not None:
            say(f"order 3: answered by {ended.resume.actor} via {ended.resume.via}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
