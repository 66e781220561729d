"""Every error survives the trips Celery makes it take: pickle (the prefork pool,
pickle result serializers) and a JSON result backend, which rebuilds an exception
as ``cls(*args)``. Each comes back as its own class, with its message and fields."""

from __future__ import annotations

import pickle

import pytest
from celery import Celery
from celery.backends.base import Backend

from celery_checkpoint.exceptions import (
    AlreadyResumed,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImproperlyConfigured,
    InvalidRunId,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    RunCancelled,
    StoreUnavailable,
)

ERRORS: list[CheckpointError] = [
    ImproperlyConfigured("checkpoint_store: unknown scheme 'x'"),
    InvalidRunId("run id '../x' is not allowed"),
    CorruptCheckpoint("order-1", "record: invalid JSON"),
    CheckpointNotFound("order-1"),
    CheckpointExists("order-1", "key 'stripe:pi_1' is held by run 'order-0'"),
    LeaseLost("order-1", "superseded by token 4"),
    ResumeRejected("order-1", "1 error", [{"loc": ["approved"], "msg": "Input should be a bool"}]),
    AlreadyResumed("order-1", "evt-1"),
    AlreadyResumed("order-1", "evt-1", completed=True),
    AlreadyResumed("stripe:pi_1", "evt-1", key=True),
    PauseExpired("run 'order-1' expired at its deadline"),
    RunCancelled("run 'order-1' was cancelled: customer left"),
    StoreUnavailable("save of run 'order-1' failed"),
]

FIELDS = (
    "run_id",
    "status",
    "detail",
    "errors",
    "pending_request_id",
    "completed",
    "key",
    "message",
)


def _fields(error: BaseException) -> dict[str, object]:
    return {name: getattr(error, name) for name in FIELDS if hasattr(error, name)}


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_is_the_same_after_pickle(error: CheckpointError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert _fields(again) == _fields(error)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_is_the_same_after_a_json_result_backend(error: CheckpointError) -> None:
    app = Celery(set_as_current=False)
    app.conf.result_serializer = "json"
    backend = Backend(app)
    again = backend.exception_to_python(backend.prepare_exception(error, "json"))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert _fields(again) == _fields(error)


def test_a_store_error_rebuilt_from_json_keeps_its_cause_as_text() -> None:
    app = Celery(set_as_current=False)
    app.conf.result_serializer = "json"
    backend = Backend(app)
    error = StoreUnavailable("save of run 'order-1' failed", OSError(28, "No space left"))
    again = backend.exception_to_python(backend.prepare_exception(error, "json"))
    assert isinstance(again, StoreUnavailable)
    assert str(again).startswith("save of run 'order-1' failed: ")
    assert "No space left" in str(again)
    assert isinstance(again.cause, Exception)


def test_an_answer_refused_for_a_key_names_the_key() -> None:
    assert str(AlreadyResumed("stripe:pi_1", "evt-1", key=True)) == (
        "key 'stripe:pi_1' already has an answer waiting for its pause ('evt-1')"
    )
