"""The revoke and terminate control handlers, wrapped: Celery's reply, then the runs cancelled.

These call the handlers a worker's main process dispatches broadcasts to
(``Panel.data``) with a real app and file store; the end to end behaviour
with real workers and brokers is in ``tests/integration/test_revoke.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.utils.collections import AttributeDict
from celery.worker import state as worker_state
from celery.worker.control import Panel

from celery_checkpoint import Checkpoints, RunCancelled, RunRecord
from celery_checkpoint._revoke import install


@pytest.fixture
def checkpoints(tmp_path: Path) -> Iterator[Checkpoints]:
    app = Celery("revoking", set_as_current=False)
    app.conf.broker_url = "memory://"
    bound = Checkpoints(app, store=str(tmp_path / "store"))
    install()
    yield bound
    bound.store.close()
    app.close()


@pytest.fixture(autouse=True)
def _forget_revoked_ids() -> Iterator[None]:
    before = set(worker_state.revoked)
    yield
    for task_id in set(worker_state.revoked) - before:
        worker_state.revoked.discard(task_id)


def _paused(checkpoints: Checkpoints, run_id: str) -> None:
    checkpoints.store.save(RunRecord(run_id=run_id, task_name="t", step="wait"), create=True)


def _dispatch(app: Celery, command: str, **arguments: Any) -> Any:
    """What the worker's mailbox does with a broadcast: ``handlers[method](state, **args)``."""
    return Panel.data[command](AttributeDict(app=app, consumer=None), **arguments)


def test_a_revoke_cancels_the_runs_among_its_ids_and_answers_as_celery_does(
    checkpoints: Checkpoints,
) -> None:
    _paused(checkpoints, "run-a")
    _paused(checkpoints, "run-b")

    reply = _dispatch(checkpoints.app, "revoke", task_id=["run-a", "plain-task", "not a run id"])
    assert "ok" in reply and "flagged as revoked" in reply["ok"]
    assert {"run-a", "plain-task", "not a run id"} <= set(worker_state.revoked)
    ended = checkpoints.store.ended("run-a")
    assert ended is not None and ended.status == "cancelled"
    assert ended.ended_reason == "revoked with Celery's revoke"
    assert checkpoints.store.load("run-b") is not None  # not named: still paused
    with pytest.raises(RunCancelled, match="Celery's revoke"):
        checkpoints.resume("run-a", 1)

    # Every worker receives the broadcast: the second time is a no-op.
    assert "ok" in _dispatch(checkpoints.app, "revoke", task_id="run-a")
    again = checkpoints.store.ended("run-a")
    assert again is not None and again.ended_at == ended.ended_at


def test_terminate_cancels_with_a_reason_saying_so(checkpoints: Checkpoints) -> None:
    _paused(checkpoints, "run-t")
    reply = _dispatch(checkpoints.app, "terminate", signal="SIGTERM", task_id="run-t")
    assert reply == {"ok": "terminate: tasks unknown"}  # Celery's reply: no such active task
    ended = checkpoints.store.ended("run-t")
    assert ended is not None and ended.ended_reason == "revoked with Celery's revoke (terminate)"


def test_a_revoke_never_fails_for_a_store_that_cannot_be_opened(tmp_path: Path) -> None:
    app = Celery("broken", set_as_current=False)
    app.conf.broker_url = "memory://"
    (tmp_path / "a-file").write_text("not a directory")
    Checkpoints(app, store=str(tmp_path / "a-file" / "store"))
    install()
    reply = _dispatch(app, "revoke", task_id="run-x")
    assert reply == {"ok": "tasks {'run-x'} flagged as revoked"}
    app.close()


def test_a_revoke_on_an_app_without_checkpoints_is_celerys_alone() -> None:
    app = Celery("plain", set_as_current=False)
    app.conf.broker_url = "memory://"
    install()
    assert _dispatch(app, "revoke", task_id="some-task") == {
        "ok": "tasks {'some-task'} flagged as revoked"
    }
    assert "some-task" in worker_state.revoked
    app.close()
