"""Walk one run through the file checkpoint store, printing each transition.

Run it with ``python examples/store_walkthrough.py`` (no server needed).
"""

from __future__ import annotations

import tempfile

from celery_checkpoint import CheckpointStore, LeaseLost, PausedWorkflow


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = CheckpointStore.open(directory)
        store.save(PausedWorkflow(run_id="order-42", task_name="shop.ship", step="await_approval"))
        print("paused:", store.load("order-42").step)  # type: ignore[union-attr]
        store.request_resume("order-42", {"approved": True}, request_id="req-1")
        run = store.claim("order-42")
        assert run is not None and run.lease is not None
        print("claimed with token", run.lease.token, "input", run.resume.input)  # type: ignore[union-attr]
        print("second claim:", store.claim("order-42"))
        store.complete("order-42", token=run.lease.token)
        print("completed; runs left:", store.count())
        try:
            store.heartbeat("order-42", run.lease.token)
        except LeaseLost as exc:
            print("late heartbeat:", exc)


if __name__ == "__main__":
    main()
