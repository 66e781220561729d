"""An approval e-mail with "Approve" and "Reject" links that answer a paused run.

Run it with ``python examples/approval_email.py``: it needs no server. It
records one paused order in a file store in a temporary directory and prints
the e-mail a task would send for it. ``make demo`` (``examples/approval.py``)
sends the same e-mail for a real paused run and answers it by following the
"Approve" link.

Each link is signed (``checkpoint_web_secret_keys``), bound to this pause of
this run and to its answer, and expires with the pause. Opening a link only
shows the answer and a confirm button (mail scanners open links too); the
press of that button answers, once: a second press is the same answer.
"""

from __future__ import annotations

import tempfile
from datetime import timedelta

from celery import Celery
from pydantic import BaseModel

from celery_checkpoint import Checkpoints, RunRecord


class Approval(BaseModel):
    approved: bool
    approver: str
    note: str = ""


def email_body(checkpoints: Checkpoints, run_id: str, order: str, manager: str) -> str:
    """The e-mail asking ``manager`` to approve ``order``, one link per answer."""
    approve = checkpoints.resume_link(
        run_id, {"approved": True, "approver": manager}, actor=manager, expires_in=timedelta(days=2)
    )
    reject = checkpoints.resume_link(
        run_id,
        {"approved": False, "approver": manager},
        actor=manager,
        expires_in=timedelta(days=2),
    )
    return (
        f"To: {manager}\n"
        f"Subject: Order {order} needs your approval\n"
        "\n"
        f"Order {order} is over the limit and waits for your decision.\n"
        "\n"
        f"  Approve: {approve}\n"
        f"  Reject:  {reject}\n"
        "\n"
        "Each link opens a page with a confirm button; nothing happens until you press it.\n"
    )


def main() -> None:
    app = Celery("shop", broker="memory://")
    app.conf.update(
        checkpoint_store=tempfile.mkdtemp(prefix="approval-email-"),
        checkpoint_web_secret_keys=["change-me-to-a-long-random-key"],
        checkpoint_web_base_url="https://shop.example/approvals",
    )
    checkpoints = Checkpoints(app)
    # What a task's ``raise Pause("await_approval", expects=Approval)`` leaves in the store.
    checkpoints.store.save(
        RunRecord(
            run_id="order-42",
            task_name="shop.fulfil",
            step="await_approval",
            expects=f"{__name__}:Approval",
            reason="order 42 needs a manager's approval",
        )
    )
    print(email_body(checkpoints, "order-42", "42", "manager@shop.example"))


if __name__ == "__main__":
    main()
