"""A child forked while the parent holds a run's lock does not keep it locked."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from celery_checkpoint import PausedWorkflow
from celery_checkpoint.store.file import FileStore


def test_child_forked_while_a_lock_is_held_can_use_the_store_and_frees_it(
    tmp_path: Path,
) -> None:
    store = FileStore(tmp_path / "store")
    store.save(PausedWorkflow(run_id="forked", task_name="t", step="s"))
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._fs.locked("forked"):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's held mutex and flock must not bind it
        os.close(read)
        try:
            won = store.claim("forked") is not None  # waits until the parent lets go
            os.write(write, b"ok" if won else b"lost")
        finally:
            os._exit(0)
    os.close(write)
    release.set()  # the parent lets go; the child's claim must then get through
    holder.join()
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert store.lease("forked") is not None  # the child's claim took effect
