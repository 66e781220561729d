"""``celery checkpoint``: see and act on paused runs from the shell.

Installed with the package as a ``celery`` subcommand (the ``celery.commands``
entry point); ``-A`` names the app, whose ``Checkpoints`` store is used
(``--store`` points at another one)::

    celery -A proj checkpoint list [--task T] [--step S] [--older-than 2h] [--json]
    celery -A proj checkpoint show RUN_ID [--json]
    celery -A proj checkpoint resume RUN_ID [--input JSON | --input @file.json | --input @-]
                                            [--request-id ID] [--pause N] [--json]
    celery -A proj checkpoint cancel RUN_ID [--reason TEXT] [--json]
    celery -A proj checkpoint recover [--json]
    celery -A proj checkpoint stats [--json]
    celery -A proj checkpoint prune --older-than 30d [--json]

``list`` streams: it prints each run as it reads it, so it starts at once and
keeps its memory flat over any number of paused runs. ``--json`` prints one
JSON object per line for ``list`` and one object for the other commands.
Durations are ``90s``, ``15m``, ``2h``, ``3d``, ``1w``, combinations such as
``1h30m``, or plain seconds.

Exit status: 0 done; 1 the run or the store said no (unknown or ended run,
input that fails the pause's ``expects``, another resume already won, store or
broker unavailable); 2 the command line is wrong (unknown option, invalid JSON,
unreadable input file, malformed run id or duration). Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from kombu.exceptions import KombuError

from .exceptions import CheckpointError, InvalidRunId, ResumeRejected
from .model import PausedWorkflow, utcnow, validate_run_id
from .store import RunInfo
from .task import Checkpoints

__all__ = ["checkpoint", "parse_duration"]

_STORE_KEY = "celery_checkpoint.store"
_CHECKPOINTS_KEY = "celery_checkpoint.checkpoints"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class Failed(click.ClickException):
    """The run or the store refused: exit status 1."""

    exit_code = 1


class BadInput(click.ClickException):
    """The command line is wrong: exit status 2, like click's usage errors."""

    exit_code = 2


def _one_line(text: object) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _rejected(exc: ResumeRejected) -> str:
    details = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ())) or 'input'}: {error.get('msg')}"
        for error in exc.errors[:5]
        if isinstance(error, dict)
    )
    return f"{exc}: {details}" if details else str(exc)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors an operator can cause or meet into one line and an exit status."""
    try:
        yield
    except (click.ClickException, BrokenPipeError):
        raise
    except InvalidRunId as exc:
        raise BadInput(_one_line(exc)) from None
    except ResumeRejected as exc:
        raise Failed(_one_line(_rejected(exc))) from None
    except CheckpointError as exc:
        raise Failed(_one_line(exc)) from None
    except (KombuError, OSError) as exc:
        raise Failed(_one_line(f"{type(exc).__name__}: {exc}")) from None


_MAX_DURATION = 100 * 365 * 86400.0  # past this, datetime arithmetic overflows soon


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


class _Duration(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.2+
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            option = param.opts[0] if param is not None and param.opts else "duration"
            raise BadInput(f"{option}: {exc}") from None


def _checkpoints(ctx: click.Context) -> Checkpoints:
    """The app's ``Checkpoints`` (``ctx.obj.app``, as ``celery`` sets it up)."""
    found = ctx.meta.get(_CHECKPOINTS_KEY)
    if isinstance(found, Checkpoints):
        return found
    app = getattr(ctx.obj, "app", None)
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    store = ctx.meta.get(_STORE_KEY)
    with _errors():
        checkpoints = Checkpoints(app, store=store) if store else Checkpoints.for_app(app)
        checkpoints.config  # noqa: B018 - a bad checkpoint_* setting fails here, in one line
    ctx.meta[_CHECKPOINTS_KEY] = checkpoints
    return checkpoints


def _run_id(value: str) -> str:
    try:
        return validate_run_id(value)
    except InvalidRunId as exc:
        raise BadInput(_one_line(exc)) from None


def _read_input(text: str | None) -> Any:
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


# -- formatting ----------------------------------------------------------------


def _span(seconds: float) -> str:
    """``2d 3h``, ``3h 5m``, ``4m 10s``, ``12s``: the two largest units."""
    seconds = int(abs(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def _ago(when: datetime | None, now: datetime) -> str:
    return "-" if when is None else f"{_span((now - when).total_seconds())} ago"


def _deadline(run: PausedWorkflow, now: datetime) -> str:
    if run.expires_at is None:
        return "-"
    left = (run.expires_at - now).total_seconds()
    return f"in {_span(left)}" if left > 0 else f"due {_span(left)} ago"


def _state(info: RunInfo) -> str:
    if info.in_flight:
        return "in flight"
    request = info.run.resume
    if request is not None and request.pause_seq == info.run.pause_seq:
        if request.status == "pending":
            return "timing out" if request.timed_out else "resuming"
        return "resume failed"
    return "paused"


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _summary(info: RunInfo) -> dict[str, Any]:
    run, lease, request = info.run, info.lease, info.run.resume
    return {
        "run_id": run.run_id,
        "task": run.task_name,
        "step": run.step,
        "pause_seq": run.pause_seq,
        "state": _state(info),
        "reason": run.reason,
        "created_at": _iso(run.created_at),
        "paused_at": _iso(run.paused_at),
        "expires_at": _iso(run.expires_at),
        "on_timeout": run.on_timeout if run.expires_at is not None else None,
        "request_id": None if request is None else request.request_id,
        "owner": None if lease is None else str(lease.owner),
        "lease_expires_at": None if lease is None else _iso(lease.expires_at),
        "recoveries": run.recoveries,
    }


_COLUMNS = (
    ("RUN ID", 36),
    ("TASK", 24),
    ("STEP", 20),
    ("PAUSE", 5),
    ("STATE", 13),
    ("PAUSED", 12),
    ("EXPIRES", 0),
)


def _row(values: tuple[str, ...]) -> str:
    # Fixed widths: a streamed table cannot measure rows it has not read yet.
    # A longer value pushes the line instead of being cut (run ids get copied).
    return " ".join(
        f"{value:<{width}}" if width else value
        for value, (_, width) in zip(values, _COLUMNS, strict=True)
    ).rstrip()


def _echo(data: Any) -> None:
    click.echo(json.dumps(data, default=str, ensure_ascii=False))


# -- the commands ----------------------------------------------------------------


@click.group(name="checkpoint")
@click.option(
    "--store",
    metavar="TARGET",
    default=None,
    help="Checkpoint store instead of the app's: a directory, file:///dir or redis://host:port/db.",
)
@click.pass_context
def checkpoint(ctx: click.Context, store: str | None) -> None:
    """Paused runs of celery-checkpoint: list, show, resume, cancel, recover, stats."""
    ctx.meta[_STORE_KEY] = store


@checkpoint.command(name="list")
@click.option("--task", metavar="NAME", help="Only runs of this task.")
@click.option("--step", metavar="STEP", help="Only runs paused at this step.")
@click.option(
    "--older-than",
    type=_Duration(),
    metavar="DURATION",
    help="Only runs paused longer ago than this (90s, 15m, 2h, 3d).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_runs(
    ctx: click.Context,
    task: str | None,
    step: str | None,
    older_than: float | None,
    as_json: bool,
) -> None:
    """Paused and in-flight runs, printed as they are read."""
    checkpoints = _checkpoints(ctx)
    count = 0
    now = utcnow()
    try:
        with _errors():
            if not as_json:
                click.echo(_row(tuple(title for title, _ in _COLUMNS)))
            for info in checkpoints.store.list(task=task, step=step, older_than=older_than):
                count += 1
                if as_json:
                    _echo(_summary(info))
                    continue
                run = info.run
                click.echo(
                    _row(
                        (
                            run.run_id,
                            run.task_name,
                            run.step,
                            str(run.pause_seq),
                            _state(info),
                            _ago(run.paused_at, now),
                            _deadline(run, now),
                        )
                    )
                )
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, like other Unix tools.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        ctx.exit(0)
    if not as_json:
        click.echo(f"({count} run{'s' if count != 1 else ''})")


@checkpoint.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@click.pass_context
def show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Everything the store holds about one run (paused, in flight or ended)."""
    run_id = _run_id(run_id)
    store = _checkpoints(ctx).store
    with _errors():
        run = store.load(run_id)
        lease = store.lease(run_id) if run is not None else None
        if run is None:
            run = store.ended(run_id)
        if run is None:
            raise Failed(f"no run {run_id!r} in the checkpoint store {store!r}")
    info = RunInfo(run=run, lease=lease)
    status = run.status if run.status != "paused" else _state(info)
    if as_json:
        data = run.model_dump(mode="json", exclude={"lease"})
        data["state"] = status
        data["lease"] = None if lease is None else lease.model_dump(mode="json")
        _echo(data)
        return
    now = utcnow()
    request = run.resume
    lines: list[tuple[str, str]] = [
        ("run id", run.run_id),
        ("task", run.task_name),
        ("state", status + (f": {run.ended_reason}" if run.ended_reason else "")),
        ("step", f"{run.step} (pause {run.pause_seq})"),
        ("reason", run.reason or "-"),
        ("created", f"{run.created_at.isoformat()} ({_ago(run.created_at, now)})"),
        ("paused", f"{run.paused_at.isoformat()} ({_ago(run.paused_at, now)})"),
    ]
    if run.expires_at is not None:
        lines.append(
            (
                "expires",
                f"{run.expires_at.isoformat()} ({_deadline(run, now)}, then {run.on_timeout})",
            )
        )
    lines.append(("expects", run.expects or "any JSON"))
    if request is not None and request.pause_seq == run.pause_seq:
        what = "timeout" if request.timed_out else f"input {json.dumps(request.input)}"
        detail = f": {request.error}" if request.error else ""
        lines.append(("resume", f"{request.request_id} {request.status}{detail} ({what})"))
    if lease is not None:
        lines.append(
            ("lease", f"token {lease.token} held by {lease.owner}, until {_iso(lease.expires_at)}")
        )
    lines += [
        ("recoveries", str(run.recoveries)),
        ("args", json.dumps(run.args, default=str)),
        ("kwargs", json.dumps(run.kwargs, default=str)),
        ("run state", json.dumps(run.state, default=str)),
    ]
    if run.metadata:
        lines.append(("metadata", json.dumps(run.metadata, default=str)))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")


@checkpoint.command()
@click.argument("run_id")
@click.option(
    "--input",
    "input_text",
    metavar="JSON|@FILE",
    default=None,
    help="The resume input: JSON, @file.json, or @- for stdin (default: null).",
)
@click.option(
    "--request-id", metavar="ID", help="Idempotency key: the same id twice is one resume."
)
@click.option(
    "--pause",
    "pause_seq",
    type=click.IntRange(min=1),
    metavar="N",
    help="Resume only if the run is still at this pause (see 'show').",
)
@click.option("--json", "as_json", is_flag=True, help="Print the accepted request as JSON.")
@click.pass_context
def resume(
    ctx: click.Context,
    run_id: str,
    input_text: str | None,
    request_id: str | None,
    pause_seq: int | None,
    as_json: bool,
) -> None:
    """Resume a paused run; its input is checked against the pause's 'expects' first."""
    run_id = _run_id(run_id)
    value = _read_input(input_text)
    request_id = request_id or uuid.uuid4().hex
    checkpoints = _checkpoints(ctx)
    with _errors():
        try:
            checkpoints.resume(run_id, value, request_id=request_id, pause_seq=pause_seq)
        except KombuError as exc:
            raise Failed(
                _one_line(
                    f"resume {request_id} of run {run_id!r} was recorded, but sending its "
                    f"message failed ({exc}); a worker's recovery pass sends it later"
                )
            ) from None
    if as_json:
        _echo({"run_id": run_id, "request_id": request_id, "accepted": True})
    else:
        click.echo(f"resume {request_id} of run {run_id} accepted; a worker continues it")


@checkpoint.command()
@click.argument("run_id")
@click.option("--reason", metavar="TEXT", help="Why: stored with the run and in its REVOKED state.")
@click.option("--json", "as_json", is_flag=True, help="Print the cancelled run as JSON.")
@click.pass_context
def cancel(ctx: click.Context, run_id: str, reason: str | None, as_json: bool) -> None:
    """Cancel a paused or in-flight run for good (an in-flight body's result is dropped)."""
    run_id = _run_id(run_id)
    checkpoints = _checkpoints(ctx)
    with _errors():
        was_in_flight = checkpoints.store.lease(run_id) is not None
        ended = checkpoints.cancel(run_id, reason=reason)
    if as_json:
        _echo(
            {
                "run_id": ended.run_id,
                "task": ended.task_name,
                "step": ended.step,
                "status": ended.status,
                "reason": ended.ended_reason,
                "was_in_flight": was_in_flight,
            }
        )
        return
    where = (
        "was in flight: its worker's outcome will be dropped"
        if was_in_flight
        else f"was paused at step {ended.step}"
    )
    click.echo(f"cancelled run {ended.run_id} ({ended.task_name}, {where})")


@checkpoint.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def recover(ctx: click.Context, as_json: bool) -> None:
    """One recovery pass, as every worker runs on its timer; prints what it did."""
    from .bootstep import recover as recovery_pass

    checkpoints = _checkpoints(ctx)
    with _errors():
        report = recovery_pass(checkpoints.app)
    if as_json:
        _echo(dataclasses.asdict(report))
    else:
        click.echo(f"recovery pass: {report}")


@checkpoint.command()
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """How many runs are paused, in flight, waiting for a worker or past their deadline."""
    store = _checkpoints(ctx).store
    with _errors():
        counts = store.stats()
    if as_json:
        _echo(counts)
        return
    labels = (
        ("runs", "runs"),
        ("paused", "  paused"),
        ("in_flight", "  in flight"),
        ("pending_resumes", "pending resumes"),
        ("due_timeouts", "due timeouts"),
    )
    shown: dict[str, object] = dict(counts)
    for key, label in labels:
        if key in shown:
            click.echo(f"{label:<16} {shown[key]:>8}")


@checkpoint.command()
@click.option(
    "--older-than",
    type=_Duration(),
    required=True,
    metavar="DURATION",
    help="Delete runs that ended longer ago than this (e.g. 30d); required.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the count as JSON.")
@click.pass_context
def prune(ctx: click.Context, older_than: float, as_json: bool) -> None:
    """Delete the records of runs that ended (completed, cancelled, expired, failed).

    Ended records recognise late messages for finished runs; prune only past
    the broker's visibility timeout and the tasks' retries.
    """
    store = _checkpoints(ctx).store
    with _errors():
        pruned = store.prune_ended(older_than)
    if as_json:
        _echo({"pruned": pruned, "older_than_seconds": older_than})
    else:
        click.echo(f"pruned {pruned} ended runs that ended over {_span(older_than)} ago")
