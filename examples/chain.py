"""A chain whose middle task pauses for a person, on Redis or on RabbitMQ, end to end.

Run it against a local server with one of::

    pip install 'celery-checkpoint[redis]'
    python examples/chain.py --broker redis      # Redis on 127.0.0.1:6379: broker,
                                                 # result backend and checkpoint store
    python examples/chain.py --broker rabbitmq   # RabbitMQ on 127.0.0.1:5672: broker,
                                                 # rpc:// results, a file checkpoint store

``CHAIN_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and ``CHAIN_AMQP_URL``
(default ``amqp://guest:guest@127.0.0.1:5672//``) point elsewhere. The script
starts its own ``celery worker`` process on a queue of its own, prints each
step and ends by itself, deleting that queue.

The chain ``price | approve | invoice``:

1. ``chain.price`` prices the order;
2. ``chain.approve`` pauses at ``await_approval`` with the priced order as its
   state: the chain stops there, the worker slot is free, and **no broker
   message is held** while a person decides (so RabbitMQ's ``consumer_timeout``
   and Redis's ``visibility_timeout`` never meet a paused run);
3. once resumed, ``approve`` returns the approved order and the chain goes on
   to ``chain.invoice``; ``get()`` on the chain returns the invoice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from celery import chain as celery_chain
from pydantic import BaseModel

from celery_checkpoint import Checkpoints, Pause

HERE = Path(__file__).resolve().parent
ENV = "CHAIN_EXAMPLE_"

if __name__ == "__main__":
    # Run as the module "chain", the name the worker imports, so the tasks and
    # the Approval type have one identity in both processes.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    options = parser.parse_args()
    _workdir = tempfile.mkdtemp(prefix="chain-example-")
    os.environ.update(
        {
            ENV + "BROKER": options.broker,
            ENV + "DIR": _workdir,
            ENV + "ID": uuid.uuid4().hex[:12],
        }
    )
    sys.path.insert(0, str(HERE))
    import chain

    try:
        sys.exit(chain.main())
    finally:
        shutil.rmtree(_workdir, ignore_errors=True)

BROKER = os.environ.get(ENV + "BROKER", "redis")
WORKDIR = Path(os.environ.get(ENV + "DIR") or tempfile.mkdtemp(prefix="chain-example-"))
RUN = os.environ.get(ENV + "ID", "example")
QUEUE = f"chain-example-{RUN}"
REDIS_URL = os.environ.get("CHAIN_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("CHAIN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

app = Celery("chain")
if BROKER == "redis":
    app.conf.update(
        broker_url=REDIS_URL,
        result_backend=REDIS_URL,
        checkpoint_store=f"{REDIS_URL}?prefix=chain-example:{RUN}:",
    )
else:
    app.conf.update(
        broker_url=AMQP_URL,
        result_backend="rpc://",  # states go straight back to the client that sent the chain
        checkpoint_store=str(WORKDIR / "checkpoints"),
    )
app.conf.update(
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
)
checkpoints = Checkpoints(app)


class Approval(BaseModel):
    approved: bool
    approver: str


def say(text: str) -> None:
    print(text, flush=True)


@app.task(name="chain.price")
def price(order_id: int, items: dict[str, float]) -> dict[str, Any]:
    total = round(sum(items.values()), 2)
    say(f"  [worker] order {order_id}: priced at {total}")
    return {"order_id": order_id, "items": items, "total": total}


@checkpoints.task(bind=True, name="chain.approve")
def approve(self: object, order: dict[str, Any]) -> dict[str, Any]:
    run = checkpoints.current()
    if not run.resumed:
        say(f"  [worker] order {order['order_id']}: waiting for a manager's approval")
        raise Pause(
            "await_approval",
            state={"total": order["total"]},
            expects=Approval,
            reason=f"order {order['order_id']} totals {order['total']}",
        )
    decision: Approval = run.resume_input
    say(
        f"  [worker] order {order['order_id']}: approved={decision.approved} by {decision.approver}"
    )
    return {**order, "approved": decision.approved, "approver": decision.approver}


@app.task(name="chain.invoice")
def invoice(order: dict[str, Any]) -> str:
    if not order["approved"]:
        return f"order {order['order_id']}: refused by {order['approver']}, nothing invoiced"
    return f"order {order['order_id']}: invoiced {order['total']}, approved by {order['approver']}"


def wait_for_state(result: Any, state: str, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while result.state != state:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with status {worker.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {state}, last state {result.state}")
        time.sleep(0.05)


def main() -> int:
    env = dict(os.environ, PYTHONPATH=str(HERE))
    say(f"broker: {app.conf.broker_url}, results: {app.conf.result_backend}")
    say(f"checkpoint store: {app.conf.checkpoint_store}")
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "chain", "--quiet", "worker"),
            *("--pool=solo", "--loglevel=ERROR", "-Q", QUEUE),
            *("--without-mingle", "--without-gossip", "--without-heartbeat"),
        ],
        cwd=HERE,
        env=env,
    )
    try:
        last = celery_chain(
            price.s(7, {"lamp": 49.5, "desk": 180.0}), approve.s(), invoice.s()
        ).apply_async()
        middle = last.parent
        say(f"chain sent; its middle task is {middle.id}")
        wait_for_state(middle, "PAUSED", worker)
        say(f"middle task: state {middle.state}, waiting at {middle.info['step']!r}")
        say(f"last task: state {last.state} (the chain waits)")
        for info in checkpoints.runs():
            say(f"paused in the store: {info.run.run_id} {info.run.task_name} at {info.run.step}")

        checkpoints.resume(middle.id, {"approved": True, "approver": "ana"})
        say(f"resumed; the chain ends with: {last.get(timeout=60)!r}")
        say(f"paused runs left in the store: {checkpoints.store.count()}")
        checkpoints.store.prune_ended(0)  # what `celery checkpoint prune` does from cron
        return 0
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        with app.connection_for_write() as conn:  # the example's queue goes with it
            conn.default_channel.queue_delete(QUEUE)
        checkpoints.store.close()
