"""What a task body sees and raises: :class:`Pause`, :class:`Run`, and ``expects``.

``raise Pause("await_approval", expects=Approval)`` ends the execution and
checkpoints the run; ``checkpoints.current()`` returns the body's :class:`Run`
(resumed or not, the state saved at the pause, the validated resume input).

``expects`` is any type pydantic's ``TypeAdapter`` takes. The input of a resume
is validated against it before anything changes; :func:`validate_input` is the
one place that does it, on the client and again on the worker.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

from pydantic import JsonValue, TypeAdapter, ValidationError

from .exceptions import ImproperlyConfigured, ResumeRejected
from .model import MAX_DURATION, RunRecord

__all__ = ["PAUSED", "RESUMING", "Pause", "Run", "expects_schema", "type_path", "validate_input"]

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
            except ValidationError as exc:
                raise TypeError(
                    f"Pause {name} must be JSON (dicts, lists, str, int, float, bool, None): "
                    f"{exc.errors(include_url=False)[0]['msg']}"
                ) from None
        super().__init__(step)
        self.step = step
        self.state = state
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.expects = expects
        self.expects_path = None if expects is None else type_path(expects)
        self.reason = reason
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"Pause({self.step!r})"


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
    """``module:QualName`` of a type so a resume in another process can validate against it."""
    module = getattr(expects, "__module__", None)
    qualname = getattr(expects, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname:
        raise ImproperlyConfigured(
            f"Pause(expects={expects!r}): expects must be a pydantic model or type defined at "
            "module level, so the process that resumes the run can import it"
        )
    return f"{module}:{qualname}"


#: Built once: building a TypeAdapter takes about a millisecond, and every resume
#: without ``expects`` (client and worker side) validates its input with it.
JSON: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)


@functools.lru_cache(maxsize=256)
def _adapter(path: str) -> TypeAdapter[Any]:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(
            f"cannot import the resume input type {path!r}: {exc}. Import the module that "
            "defines it where resume() is called"
        ) from exc
    return TypeAdapter(obj)


def validate_input(run: RunRecord, value: Any) -> tuple[Any, JsonValue]:
    """Validate ``value`` against the pause's ``expects``: (python value, its JSON form).

    Raises ``ResumeRejected`` carrying pydantic's errors; nothing is changed.
    """
    if run.expects is None:
        try:
            return value, JSON.validate_python(value)
        except ValidationError as exc:
            raise ResumeRejected(run.run_id, "the input is not JSON", exc.errors()) from exc
    adapter = _adapter(run.expects)
    try:
        parsed = adapter.validate_python(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise ResumeRejected(
            run.run_id, f"input does not match {run.expects}: {exc.error_count()} error(s)", errors
        ) from exc
    return parsed, cast(JsonValue, adapter.dump_python(parsed, mode="json"))


def expects_schema(run: RunRecord) -> dict[str, Any] | None:
    """The JSON Schema of the pause's ``expects``: the one taken at pause time,
    else built from the importable type (records written before it was kept);
    None when the pause expects any JSON or the type cannot be imported here."""
    if run.expects_schema is not None:
        return dict(run.expects_schema)
    if run.expects is None:
        return None
    try:
        schema: dict[str, Any] = _adapter(run.expects).json_schema()
    except Exception:  # not importable here, or no JSON Schema for it: a JSON field then
        return None
    return schema
