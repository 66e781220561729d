"""What a resume accepts, the worker accepts; what the first execution received,
the resumed one receives; every way out of a resumed body ends its lease.

Through an embedded worker (threads pool, ``memory://`` broker with kombu's JSON
serializer, in-memory results) on a file store.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Annotated, Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore
from celery.result import AsyncResult
from pydantic import TypeAdapter

from celery_checkpoint import (
    Checkpoints,
    ImproperlyConfigured,
    Pause,
    ResumeRejected,
    StoreUnavailable,
)
from celery_checkpoint.store.file import FileStore
from tests.unit import fidelity_types as ft

#: What each ``fid.answer`` run pauses for, by name (the task gets the name).
EXPECTS: dict[str, Any] = {
    "aliased": ft.Aliased,
    "strict": ft.Strict,
    "generic": ft.Box[int],
    "dataclass": ft.Shipment,
    "typeddict": ft.Address,
    "annotated": ft.PositiveInt,
    "literal": ft.YesNo,
    "union": int | str,
    "list": list[int],
    "nested": dict[str, list[ft.Shipment]],
}
SEEN: dict[str, list[Any]] = {}
SEEN_LOCK = threading.Lock()


def _saw(run_id: str, value: Any) -> None:
    with SEEN_LOCK:
        SEEN.setdefault(run_id, []).append(value)


class LosesOneCompleteReply(FileStore):
    """Applies the first ``complete`` and then loses its reply, as a dropped
    connection would: the caller sees ``StoreUnavailable``."""

    lost = threading.Event()

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        super()._complete(run_id, token, result)
        if not self.lost.is_set():
            self.lost.set()
            raise StoreUnavailable("reply lost", ConnectionResetError(104, "reset by peer"))


@dataclasses.dataclass
class Harness:
    app: Celery
    checkpoints: Checkpoints
    tasks: dict[str, Any]

    def paused(self, name: str, *args: Any, **kwargs: Any) -> AsyncResult:
        result = self.tasks[name].apply_async(args, kwargs)
        wait_for(lambda: self.checkpoints.store.load(result.id) is not None, "the pause")
        return result


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    app = Celery("fid", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.broker_transport_options = {"polling_interval": 0.05}
    app.conf.task_default_queue = f"fid-{uuid.uuid4().hex[:12]}"
    store = LosesOneCompleteReply(tmp_path_factory.mktemp("fid") / "store")
    LosesOneCompleteReply.lost.set()  # only the test that wants a lost reply clears it
    checkpoints = Checkpoints(app, store=store)

    @checkpoints.task(bind=True, name="fid.answer", shared=False)
    def answer(self: Any, kind: str) -> str:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("answer", expects=EXPECTS[kind])
        return repr(run.resume_input)

    @checkpoints.task(bind=True, name="fid.args", shared=False)
    def typed_args(
        self: Any, when: datetime, amount: Decimal, ident: uuid.UUID, blob: bytes, *, on: date
    ) -> str:
        run = checkpoints.current()
        _saw(run.run_id, [(type(v).__name__, v) for v in (when, amount, ident, blob, on)])
        if not run.resumed:
            raise Pause("go")
        return "ok"

    @checkpoints.task(bind=True, name="fid.hand_on", shared=False)
    def hand_on(self: Any, how: str) -> Any:
        run = checkpoints.current()
        if not run.resumed:
            raise Pause("go")
        _saw(run.run_id, (how, self.request.retries, run.resume_input))
        if how == "ignore":
            raise Ignore()
        if how == "replace":
            raise self.replace(double.s(21))
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return ["retried", run.resume_input]

    @app.task(name="fid.double", shared=False)
    def double(n: int) -> int:
        return n * 2

    @app.task(name="fid.plain_pause", shared=False)
    def plain_pause() -> None:
        raise Pause("await_approval")

    tasks = {t.name.split(".")[1]: t for t in (answer, typed_args, hand_on, double, plain_pause)}
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
        yield Harness(app, checkpoints, tasks)


# -- 1 and 2: answers survive the round trip; expects means what it says ---------------


CASES = [
    ("aliased", {"approvedBy": "ana"}),
    ("strict", {"n": [1, 2], "on": "2026-01-02"}),  # as JSON sends it: a list, a string
    ("strict", {"n": (1, 2), "on": date(2026, 1, 2)}),
    ("generic", {"item": "3"}),
    ("dataclass", {"carrier": "ups"}),
    ("typeddict", {"street": "Main St", "lines": ["a", "b"]}),
    ("annotated", 7),
    ("literal", "yes"),
    ("union", "12"),
    ("list", [1, "2"]),
    ("nested", {"a": [{"carrier": "dhl", "parcels": 2}]}),
]


@pytest.mark.parametrize(
    ("kind", "value"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)]
)
def test_the_worker_receives_the_value_resume_accepted(
    harness: Harness, kind: str, value: Any
) -> None:
    result = harness.paused("answer", kind)
    harness.checkpoints.resume(result.id, value)
    adapter = TypeAdapter(EXPECTS[kind])
    try:
        expected = adapter.validate_python(value)
    except Exception:
        import json

        expected = adapter.validate_json(json.dumps(value))
    assert result.get(timeout=30) == repr(expected)


def test_the_record_keeps_the_json_schema_of_expects(harness: Harness) -> None:
    result = harness.paused("answer", "literal")
    run = harness.checkpoints.store.load(result.id)
    assert run is not None
    assert run.expects_schema == TypeAdapter(ft.YesNo).json_schema()
    assert run.expects_schema == {"enum": ["yes", "no"], "type": "string"}
    harness.checkpoints.cancel(result.id)


@pytest.mark.parametrize(
    ("kind", "bad"),
    [("list", ["not-an-int"]), ("literal", "maybe"), ("annotated", 0), ("strict", {"n": [1]})],
)
def test_expects_refuses_what_its_type_refuses_and_the_run_stays_paused(
    harness: Harness, kind: str, bad: Any
) -> None:
    result = harness.paused("answer", kind)
    with pytest.raises(ResumeRejected) as refused:
        harness.checkpoints.resume(result.id, bad)
    assert refused.value.errors, "pydantic's errors are carried"
    run = harness.checkpoints.store.load(result.id)
    assert run is not None and run.resume is None
    harness.checkpoints.cancel(result.id)


def test_an_expects_that_cannot_be_rebuilt_elsewhere_is_refused_at_pause() -> None:
    def local() -> type:
        class Decision(ft.Aliased):
            pass

        return Decision

    with pytest.raises(ImproperlyConfigured, match="defined inside a function"):
        Pause("x", expects=local())
    with pytest.raises(ImproperlyConfigured, match="cannot be written down"):
        Pause("x", expects=Annotated[int, lambda v: v])
    with pytest.raises(ImproperlyConfigured, match="pydantic cannot validate"):
        Pause("x", expects=object())


# -- 3: arguments keep their types ------------------------------------------------------


def test_the_resumed_body_receives_the_arguments_the_first_one_received(
    harness: Harness,
) -> None:
    args = (
        datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=timezone.utc),
        Decimal("19.990"),
        uuid.UUID(int=42),
        b"\xff\x00not utf-8\xfe",
    )
    result = harness.paused("args", *args, on=date(2026, 5, 2))
    harness.checkpoints.resume(result.id, None)
    assert result.get(timeout=30) == "ok"
    first, resumed = SEEN[result.id]
    assert first == resumed
    assert [name for name, _ in resumed] == ["datetime", "Decimal", "UUID", "bytes", "date"]
    assert [value for _, value in resumed] == [*args, date(2026, 5, 2)]


# -- 4: errors name the problem -----------------------------------------------------------


def test_pause_in_a_plain_task_fails_saying_it_needs_the_checkpoint_decorator(
    harness: Harness,
) -> None:
    result = harness.tasks["plain_pause"].delay()
    with pytest.raises(Exception, match=r"@checkpoints\.task"):
        result.get(timeout=30)
    assert result.state == "FAILURE"


def test_state_that_is_not_json_names_the_key() -> None:
    with pytest.raises(
        TypeError, match=r"Pause state must be JSON: state\['order'\]\['when'\] is a datetime"
    ):
        Pause("x", state={"order": {"id": 1, "when": datetime.now()}})
    with pytest.raises(
        TypeError, match=r"Pause metadata must be JSON: metadata\['tags'\] is a set"
    ):
        Pause("x", metadata={"tags": {"a"}})


# -- 5: every path out of a resumed body ends the lease ------------------------------------


def _ended_completed(harness: Harness, run_id: str) -> None:
    store = harness.checkpoints.store
    wait_for(lambda: store.load(run_id) is None, f"{run_id} to leave the paused set")
    ended = store.ended(run_id)
    assert ended is not None and ended.status == "completed"
    assert store.lease(run_id) is None
    assert run_id not in {r.run_id for r in store.recover_orphaned()}


def test_ignore_in_a_resumed_body_completes_the_run(harness: Harness) -> None:
    result = harness.paused("hand_on", "ignore")
    harness.checkpoints.resume(result.id, "go")
    _ended_completed(harness, result.id)
    assert SEEN[result.id] == [("ignore", 0, "go")]


def test_replace_in_a_resumed_body_hands_the_run_to_the_replacement(harness: Harness) -> None:
    result = harness.paused("hand_on", "replace")
    harness.checkpoints.resume(result.id, "go")
    assert AsyncResult(result.id, app=harness.app).get(timeout=30) == 42
    _ended_completed(harness, result.id)


def test_retry_in_a_resumed_body_resumes_again_with_the_same_input_at_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    result = harness.paused("hand_on", "retry")
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        harness.checkpoints.resume(result.id, {"n": 1})
        assert result.get(timeout=30) == ["retried", {"n": 1}]
    assert SEEN[result.id] == [("retry", 0, {"n": 1}), ("retry", 1, {"n": 1})]
    assert not [r for r in caplog.records if "does not show pause" in r.getMessage()]
    _ended_completed(harness, result.id)


# -- 6: the store and the result agree ---------------------------------------------------


def test_a_lost_reply_to_complete_is_recognised_and_the_value_delivered(
    harness: Harness,
) -> None:
    result = harness.paused("answer", "dataclass")
    LosesOneCompleteReply.lost.clear()
    harness.checkpoints.resume(result.id, {"carrier": "ups"})
    assert result.get(timeout=30) == repr(ft.Shipment(carrier="ups"))
    assert LosesOneCompleteReply.lost.is_set(), "the reply was lost once"
    _ended_completed(harness, result.id)
