"""A payment webhook that resumes the task waiting for the payment, found by a key.

Run it against a local Redis (broker and results) with::

    pip install 'celery-checkpoint[redis,web]' fastapi
    python examples/payment_webhook.py

It starts its own ``celery worker`` and a FastAPI app on loopback (the webhook
receiver a payment provider would call), then plays two orders:

1. ``order 1``: the task reaches its pause ``await_payment`` (named by the key
   ``stripe:<payment intent>``) first; the provider's event arrives, and arrives
   again (providers retry deliveries): the event id is the ``request_id``, so the
   second delivery is the same answer, and the task resumes once.
2. ``order 2``: the payment succeeds *before* the task reaches its pause. The
   answer is kept (``checkpoint_early_answer_ttl``, one day by default) and the
   pause that names the key takes it: the task goes on at once.

The webhook handler is the part to copy::

    @api.post("/webhooks/payments")
    def payment_event(event: PaymentEvent) -> dict[str, str]:
        intent = event.data.object
        checkpoints.resume_key(
            f"stripe:{intent.id}",
            {"status": intent.status, "amount": intent.amount},
            request_id=event.id,          # the provider's event id: retries are one answer
            actor="payment-provider",
            via="webhook",
        )
        return {"received": event.id}

``PAYMENT_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) points elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from celery import Celery
from pydantic import BaseModel

from celery_checkpoint import AlreadyResumed, Checkpoints, Pause

HERE = Path(__file__).resolve().parent
ENV = "PAYMENT_EXAMPLE_"

if __name__ == "__main__":
    # Run as the module "payment_webhook", the name the worker imports.
    _workdir = tempfile.mkdtemp(prefix="payment-example-")
    os.environ.update({ENV + "DIR": _workdir, ENV + "ID": uuid.uuid4().hex[:12]})
    sys.path.insert(0, str(HERE))
    import payment_webhook

    try:
        sys.exit(payment_webhook.main())
    finally:
        shutil.rmtree(_workdir, ignore_errors=True)

WORKDIR = Path(os.environ.get(ENV + "DIR") or tempfile.mkdtemp(prefix="payment-example-"))
RUN = os.environ.get(ENV + "ID", "example")
QUEUE = f"payment-example-{RUN}"
REDIS_URL = os.environ.get("PAYMENT_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("payment_webhook")
app.conf.update(
    broker_url=REDIS_URL,
    result_backend=REDIS_URL,
    checkpoint_store=f"sqlite:///{WORKDIR / 'checkpoints.db'}",
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
)
checkpoints = Checkpoints(app)


class Payment(BaseModel):
    status: Literal["succeeded", "failed"]
    amount: int


def say(text: str) -> None:
    print(text, flush=True)


@checkpoints.task(bind=True, name="payment_webhook.fulfil")
def fulfil(self: object, order: int, intent: str) -> str:
    run = checkpoints.current()
    if not run.resumed:
        say(f"  [worker] order {order}: waiting for payment {intent}")
        raise Pause("await_payment", key=f"stripe:{intent}", expects=Payment)
    payment: Payment = run.resume_input
    say(f"  [worker] order {order}: payment {payment.status} ({payment.amount} cents)")
    if payment.status != "succeeded":
        return f"order {order}: payment failed, not shipped"
    return f"order {order}: paid {payment.amount}, shipped"


# -- the webhook receiver ------------------------------------------------------------


class Intent(BaseModel):
    id: str
    status: Literal["succeeded", "failed"]
    amount: int


class EventData(BaseModel):
    object: Intent


class PaymentEvent(BaseModel):
    id: str
    type: str
    data: EventData


def make_api() -> object:
    from fastapi import FastAPI

    api = FastAPI()

    @api.post("/webhooks/payments")
    def payment_event(event: PaymentEvent) -> dict[str, str]:
        intent = event.data.object
        # Another event that already answered this payment: acknowledged, nothing changes.
        with contextlib.suppress(AlreadyResumed):
            checkpoints.resume_key(
                f"stripe:{intent.id}",
                {"status": intent.status, "amount": intent.amount},
                request_id=event.id,
                actor="payment-provider",
                via="webhook",
            )
        return {"received": event.id}

    return api


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _deliver(url: str, event_id: str, intent: str, amount: int) -> None:
    import httpx

    body = {
        "id": event_id,
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": intent, "status": "succeeded", "amount": amount}},
    }
    response = httpx.post(url, json=body, timeout=30)
    say(f"provider: delivered {event_id} for {intent}: HTTP {response.status_code}")


def main() -> int:
    import uvicorn

    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "payment_webhook", "--quiet", "worker"),
            *("--pool=solo", "--loglevel=ERROR", "-Q", QUEUE),
            *("--without-mingle", "--without-gossip", "--without-heartbeat"),
        ],
        cwd=HERE,
        env=env,
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_api(), host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/webhooks/payments"
    try:
        while not server.started:
            time.sleep(0.05)
        say(f"webhook receiver listening on {url}")

        first = fulfil.delay(1, f"pi_{RUN}_1")
        while checkpoints.store.find_key(f"stripe:pi_{RUN}_1") is None:
            if worker.poll() is not None:
                raise SystemExit("the worker stopped")
            time.sleep(0.05)
        say("order 1 is paused for its payment; the provider delivers the event twice")
        _deliver(url, f"evt_{RUN}_a", f"pi_{RUN}_1", 1200)
        _deliver(url, f"evt_{RUN}_a", f"pi_{RUN}_1", 1200)
        say(f"order 1: {first.get(timeout=60)}")

        say("order 2: the payment succeeds before the task reaches its pause")
        _deliver(url, f"evt_{RUN}_b", f"pi_{RUN}_2", 800)
        second = fulfil.delay(2, f"pi_{RUN}_2")
        say(f"order 2: {second.get(timeout=60)}")
        say(f"paused runs left in the store: {checkpoints.store.count()}")
        return 0
    finally:
        server.should_exit = True
        worker.terminate()
        worker.wait(timeout=60)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(QUEUE)
        checkpoints.store.close()
