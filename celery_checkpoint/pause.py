"""What a task body sees and raises: :class:`Pause`, :class:`Run`, and ``expects``.

``raise Pause("await_approval", expects=Approval)`` ends the execution and
checkpoints the run; ``checkpoints.current()`` returns the body's :class:`Run`
(resumed or not, the state saved at the pause, the validated resume input).

``expects`` is any type pydantic's ``TypeAdapter`` takes (a model, a
dataclass, a TypedDict, ``list[int]``, ``Literal["yes", "no"]``...). It is
written down at the pause (:mod:`._expects`) with its JSON Schema, and the
input of a resume is validated against it before anything changes
(:func:`validate_input`). The input is stored as the JSON pydantic makes of
the validated value (by alias), and the worker validates that JSON again
(:func:`revalidate`): what ``resume`` accepted, the worker accepts, as the
same value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pydantic import JsonValue, TypeAdapter, ValidationError

from ._expects import adapter_for, schema_of, spec_of
from .exceptions import ResumeRejected
from .model import MAX_DURATION, RunRecord, validate_key

__all__ = [
    "PAUSED",
    "RESUMING",
    "Pause",
    "Run",
    "expects_schema",
    "revalidate",
    "type_path",
    "validate_input",
]

#: The Celery state of a paused run.
PAUSED = "PAUSED"
#: The Celery state of a run resumed after a failed attempt, until it ends again.
RESUMING = "RESUMING"


class Pause(Exception):
    """Raise in a checkpointed task body to pause the run at ``step``.

    ``state`` is JSON the resumed body reads back as ``run.state``. ``timeout``
    (a ``timedelta`` or seconds) ends the pause on its own: ``on_timeout="expire"``
    fails the run with ``PauseExpired``; ``"resume"`` resumes it with
    ``run.timed_out`` true and no input. ``expects`` is a pydantic model or
    type the resume input is validated against before anything changes.
    ``key`` names the pause by a business key, unique among live runs of the
    store, so a webhook can answer it without the run id
    (:meth:`~celery_checkpoint.Checkpoints.resume_key`); an answer that came
    before the pause is waiting for it and resumes the run at once.

    Not a :class:`~celery_checkpoint.CheckpointError`: pausing is control flow,
    the way Celery keeps ``Retry`` and ``Ignore`` apart from errors.
    """

    def __init__(
        self,
        step: str,
        *,
        state: JsonValue = None,
        timeout: timedelta | float | None = None,
        on_timeout: Literal["expire", "resume"] = "expire",
        expects: Any = None,
        reason: str | None = None,
        metadata: dict[str, JsonValue] | None = None,
        key: str | None = None,
    ) -> None:
        if not isinstance(step, str) or not step:
            raise TypeError("Pause needs a step name: Pause('await_approval', ...)")
        if on_timeout not in ("expire", "resume"):
            raise ValueError(f"on_timeout must be 'expire' or 'resume', not {on_timeout!r}")
        if isinstance(timeout, int | float):
            if not math.isfinite(timeout):
                raise ValueError(f"Pause timeout must be a finite number of seconds, not {timeout}")
            timeout = timedelta(seconds=timeout)
        if timeout is not None and not timedelta(0) < timeout <= MAX_DURATION:
            raise ValueError(
                f"Pause timeout must be positive and at most {MAX_DURATION.days} days, "
                f"not {timeout}"
            )
        for name, value in (("state", state), ("metadata", metadata)):
            try:
                JSON.validate_python(value)
            except ValidationError:
                where, what = _first_non_json(value, name)
                raise TypeError(
                    f"Pause {name} must be JSON: {where} is {what} (state and metadata hold "
                    "dicts with string keys, lists, str, int, float, bool and None: store a "
                    "datetime as an ISO string, a set as a list)"
                ) from None
        super().__init__(step)
        self.step = step
        self.state = state
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.expects = expects
        #: ``expects`` written down (see :mod:`celery_checkpoint._expects`)
        self.expects_path = None if expects is None else spec_of(expects)
        #: its JSON Schema, kept in the record for forms drawn without the task's code
        self.expects_schema = None if self.expects_path is None else schema_of(self.expects_path)
        self.reason = reason
        self.metadata = dict(metadata or {})
        #: a business key naming this pause (``"stripe:pi_123"``): an answer finds
        #: the run by it (``checkpoints.resume_key``), even one that came first
        self.key = None if key is None else validate_key(key)

    def __str__(self) -> str:
        return (
            f"pause at step {self.step!r}: only a task decorated with @checkpoints.task "
            "can pause; a plain @app.task fails with it"
        )

    def __repr__(self) -> str:
        return f"Pause({self.step!r}): only a @checkpoints.task body can pause"


def _first_non_json(value: Any, path: str) -> tuple[str, str]:
    """Where in ``value`` the first thing JSON cannot hold is, and what it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} key {key!r}", _a(type(key).__name__) + " key"
            found = _first_non_json(item, f"{path}[{key!r}]")
            if found[1]:
                return found
        return path, ""
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_non_json(item, f"{path}[{i}]")
            if found[1]:
                return found
        return path, ""
    if value is None or isinstance(value, str | int | float | bool):
        return path, ""
    return path, _a(type(value).__name__)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


@dataclass(frozen=True)
class Run:
    """What a checkpointed body knows about its run: ``checkpoints.current()``."""

    run_id: str
    resumed: bool
    step: str | None = None
    pause_seq: int = 0
    state: JsonValue = None
    resume_input: Any = None
    timed_out: bool = False
    request_id: str | None = None
    token: int | None = None


def type_path(expects: Any) -> str:
    """``expects`` written down for another process; kept for callers of the former name."""
    return spec_of(expects)


#: Built once: building a TypeAdapter takes about a millisecond, and every resume
#: without ``expects`` (client and worker side) validates its input with it.
JSON: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)


def validate_input(run: RunRecord, value: Any) -> tuple[Any, JsonValue]:
    """Validate ``value`` against the pause's ``expects``: (python value, the JSON to store).

    A value that fails as Python but is pure JSON is validated as JSON too, as
    the worker will (a strict model takes ``[1, 2]`` for a tuple from JSON).
    The stored form is pydantic's JSON of the value, by alias, so
    :func:`revalidate` on the worker gives back the same value. Raises
    ``ResumeRejected`` carrying pydantic's errors; nothing is changed.
    """
    if run.expects is None:
        try:
            return value, JSON.validate_python(value)
        except ValidationError as exc:
            raise ResumeRejected(
                run.run_id, "the input is not JSON", exc.errors(include_url=False)
            ) from exc
    adapter = adapter_for(run.expects)
    try:
        parsed = adapter.validate_python(value)
    except ValidationError as exc:
        try:
            parsed = adapter.validate_json(json.dumps(value))
        except (TypeError, ValueError):
            errors = exc.errors(include_url=False)
            raise ResumeRejected(
                run.run_id,
                f"input does not match {run.expects}: {exc.error_count()} error(s)",
                errors,
            ) from exc
    stored: JsonValue = json.loads(adapter.dump_json(parsed, by_alias=True))
    return parsed, stored


def revalidate(run: RunRecord, stored: JsonValue) -> Any:
    """The value of an input :func:`validate_input` stored (on the worker)."""
    if run.expects is None:
        return stored
    try:
        return adapter_for(run.expects).validate_json(json.dumps(stored))
    except ValidationError as exc:
        raise ResumeRejected(
            run.run_id,
            f"the stored input no longer matches {run.expects}: {exc.error_count()} error(s) "
            "(did the type change since the pause?)",
            exc.errors(include_url=False),
        ) from exc


def expects_schema(run: RunRecord) -> dict[str, Any] | None:
    """The JSON Schema of the pause's ``expects``: the one taken at pause time,
    else built from the type (records written before it was kept); None when
    the pause expects any JSON or the type cannot be imported here."""
    if run.expects_schema is not None:
        return dict(run.expects_schema)
    if run.expects is None:
        return None
    return schema_of(run.expects)
