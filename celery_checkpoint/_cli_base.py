"""What every ``celery checkpoint`` command shares: errors as one line and an
exit status, durations, the app's ``Checkpoints``, and reading ``--input``."""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from kombu.exceptions import KombuError

from .checkpoints import Checkpoints
from .exceptions import CheckpointError, InvalidRunId, ResumeRejected
from .model import MAX_DURATION, validate_key, validate_run_id

__all__ = [
    "CHECKPOINTS_KEY",
    "STORE_KEY",
    "BadInput",
    "Duration",
    "Failed",
    "checkpoints_of",
    "errors",
    "key_arg",
    "one_line",
    "os_user",
    "parse_duration",
    "read_input",
    "rejected",
    "run_id_arg",
]

STORE_KEY = "celery_checkpoint.store"
CHECKPOINTS_KEY = "celery_checkpoint.checkpoints"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class Failed(click.ClickException):
    """The run or the store refused: exit status 1."""

    exit_code = 1


class BadInput(click.ClickException):
    """The command line is wrong: exit status 2, like click's usage errors."""

    exit_code = 2


def one_line(text: object) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def rejected(exc: ResumeRejected) -> str:
    details = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ())) or 'input'}: {error.get('msg')}"
        for error in exc.errors[:5]
        if isinstance(error, dict)
    )
    return f"{exc}: {details}" if details else str(exc)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn the errors an operator can cause or meet into one line and an exit status."""
    try:
        yield
    except (click.ClickException, BrokenPipeError):
        raise
    except InvalidRunId as exc:
        raise BadInput(one_line(exc)) from None
    except ResumeRejected as exc:
        raise Failed(one_line(rejected(exc))) from None
    except CheckpointError as exc:
        raise Failed(one_line(exc)) from None
    except (KombuError, OSError) as exc:
        raise Failed(one_line(f"{type(exc).__name__}: {exc}")) from None


_MAX_DURATION = MAX_DURATION.total_seconds()


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h``, ``3d``, ``1w``, ``1h30m`` or ``45``; ``ValueError``."""
    compact = text.strip().lower().replace(" ", "")
    try:
        seconds = float(compact)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(compact):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(compact) or not compact:
            raise ValueError(
                f"{text!r} is not a duration: use 90s, 15m, 2h, 3d, 1h30m or seconds"
            ) from None
    if seconds < 0 or seconds != seconds or seconds > _MAX_DURATION:
        raise ValueError(f"{text!r} is not a duration: it must be from 0 to 100 years")
    return seconds


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.2+
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            option = param.opts[0] if param is not None and param.opts else "duration"
            raise BadInput(f"{option}: {exc}") from None


def checkpoints_of(ctx: click.Context) -> Checkpoints:
    """The app's ``Checkpoints`` (``ctx.obj.app``, as ``celery`` sets it up)."""
    found = ctx.meta.get(CHECKPOINTS_KEY)
    if isinstance(found, Checkpoints):
        return found
    app = getattr(ctx.obj, "app", None)
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    store = ctx.meta.get(STORE_KEY)
    with errors():
        checkpoints = Checkpoints(app, store=store) if store else Checkpoints.for_app(app)
        checkpoints.config  # noqa: B018 - a bad checkpoint_* setting fails here, in one line
        checkpoints.store  # noqa: B018 - and a store that cannot be opened, before any output
    ctx.meta[CHECKPOINTS_KEY] = checkpoints
    return checkpoints


def os_user() -> str | None:
    """The operator's login name, recorded as who answered from the shell."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def key_arg(value: str) -> str:
    try:
        return validate_key(value)
    except InvalidRunId as exc:
        raise BadInput(one_line(exc)) from None


def run_id_arg(value: str) -> str:
    try:
        return validate_run_id(value)
    except InvalidRunId as exc:
        raise BadInput(one_line(exc)) from None


def read_input(text: str | None) -> Any:
    """The JSON of ``--input``: inline, ``@path`` or ``@-`` (stdin)."""
    if text is None:
        return None
    source = "--input"
    data = text
    if text.startswith("@"):
        path = text[1:]
        if path == "-":
            source = "the input on stdin"
            try:
                data = sys.stdin.buffer.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"cannot read {source}: it is not UTF-8 ({exc.reason})") from None
        else:
            source = f"the input file {path!r}"
            try:
                data = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise BadInput(f"cannot read {source}: {reason}") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
