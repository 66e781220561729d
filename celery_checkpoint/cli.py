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
    celery -A proj checkpoint serve [--host 127.0.0.1] [--port 8000]
                                    [--authenticate MODULE:FUNCTION] [--root-path /approvals]

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
import sys
import uuid
from typing import Any

import click
from kombu.exceptions import KombuError

from ._cli_admin import migrate, serve
from ._cli_base import (
    STORE_KEY,
    BadInput,
    Duration,
    Failed,
    checkpoints_of,
    errors,
    key_arg,
    one_line,
    os_user,
    parse_duration,
    read_input,
    run_id_arg,
)
from ._format import COLUMNS, ago, deadline, echo_json, iso, row, span, state_of, summary
from .checkpoints import Checkpoints
from .model import utcnow
from .store import RunInfo

__all__ = ["checkpoint", "parse_duration"]


# -- the commands ----------------------------------------------------------------


@click.group(name="checkpoint")
@click.option(
    "--store",
    metavar="TARGET",
    default=None,
    help=(
        "Checkpoint store instead of the app's: sqlite:///path.db, postgresql://..., "
        "redis://host:port/db, or a directory (file:///dir)."
    ),
)
@click.pass_context
def checkpoint(ctx: click.Context, store: str | None) -> None:
    """Paused runs of celery-checkpoint: list, show, resume, cancel, recover, stats."""
    ctx.meta[STORE_KEY] = store


@checkpoint.command(name="list")
@click.option("--task", metavar="NAME", help="Only runs of this task.")
@click.option("--step", metavar="STEP", help="Only runs paused at this step.")
@click.option(
    "--older-than",
    type=Duration(),
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
    checkpoints = checkpoints_of(ctx)
    count = 0
    now = utcnow()
    try:
        with errors():
            if not as_json:
                click.echo(row(tuple(title for title, _ in COLUMNS)))
            for info in checkpoints.store.list(task=task, step=step, older_than=older_than):
                count += 1
                if as_json:
                    echo_json(summary(info))
                    continue
                run = info.run
                click.echo(
                    row(
                        (
                            run.run_id,
                            run.task_name,
                            run.step,
                            str(run.pause_seq),
                            state_of(info),
                            ago(run.paused_at, now),
                            deadline(run, now),
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
    run_id = run_id_arg(run_id)
    store = checkpoints_of(ctx).store
    with errors():
        run = store.load(run_id)
        lease = store.lease(run_id) if run is not None else None
        if run is None:
            run = store.ended(run_id)
        if run is None:
            raise Failed(f"no run {run_id!r} in the checkpoint store {store!r}")
    info = RunInfo(run=run, lease=lease)
    status = run.status if run.status != "paused" else state_of(info)
    if as_json:
        data = run.model_dump(mode="json", exclude={"lease"})
        data["state"] = status
        data["lease"] = None if lease is None else lease.model_dump(mode="json")
        echo_json(data)
        return
    now = utcnow()
    lines: list[tuple[str, str]] = [
        ("run id", run.run_id),
        ("task", run.task_name),
        ("state", status + (f": {run.ended_reason}" if run.ended_reason else "")),
        ("step", f"{run.step} (pause {run.pause_seq})"),
        ("reason", run.reason or "-"),
        ("created", f"{run.created_at.isoformat()} ({ago(run.created_at, now)})"),
        ("paused", f"{run.paused_at.isoformat()} ({ago(run.paused_at, now)})"),
    ]
    if run.expires_at is not None:
        lines.append(
            (
                "expires",
                f"{run.expires_at.isoformat()} ({deadline(run, now)}, then {run.on_timeout})",
            )
        )
    lines.append(("expects", run.expects or "any JSON"))
    request = run.current_resume
    if request is not None:
        what = "timeout" if request.timed_out else f"input {json.dumps(request.input)}"
        detail = f": {request.error}" if request.error else ""
        status = run.answer_status(request)
        lines.append(("resume", f"{request.request_id} {status}{detail} ({what})"))
        who = request.actor or "unknown"
        lines.append(
            ("answered by", f"{who} via {request.via} at {request.requested_at.isoformat()}")
        )
    if lease is not None:
        lines.append(
            ("lease", f"token {lease.token} held by {lease.owner}, until {iso(lease.expires_at)}")
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
@click.argument("run_id", required=False)
@click.option(
    "--key",
    metavar="KEY",
    help="Answer the run paused with this business key instead of a run id (kept for the "
    "pause if none holds it yet).",
)
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
@click.option(
    "--actor", metavar="NAME", help="Who answers, recorded on the request (default: your login)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the accepted request as JSON.")
@click.pass_context
def resume(
    ctx: click.Context,
    run_id: str | None,
    key: str | None,
    input_text: str | None,
    request_id: str | None,
    pause_seq: int | None,
    actor: str | None,
    as_json: bool,
) -> None:
    """Resume a paused run; its input is checked against the pause's 'expects' first.

    Give the RUN_ID, or --key for the run paused with a business key.
    """
    if (run_id is None) == (key is None):
        raise BadInput("give a RUN_ID or --key KEY, not both and not neither")
    value = read_input(input_text)
    request_id = request_id or uuid.uuid4().hex
    checkpoints = checkpoints_of(ctx)
    if key is not None:
        _resume_key(checkpoints, key_arg(key), value, request_id, actor, as_json)
        return
    assert run_id is not None
    run_id = run_id_arg(run_id)
    with errors():
        try:
            checkpoints.resume(
                run_id,
                value,
                request_id=request_id,
                pause_seq=pause_seq,
                actor=actor or os_user(),
                via="cli",
            )
        except KombuError as exc:
            raise Failed(
                one_line(
                    f"resume {request_id} of run {run_id!r} was recorded, but sending its "
                    f"message failed ({exc}); a worker's recovery pass sends it later"
                )
            ) from None
    if as_json:
        echo_json({"run_id": run_id, "request_id": request_id, "accepted": True})
    else:
        click.echo(f"resume {request_id} of run {run_id} accepted; a worker continues it")


def _resume_key(
    checkpoints: Checkpoints,
    key: str,
    value: Any,
    request_id: str,
    actor: str | None,
    as_json: bool,
) -> None:
    with errors():
        result = checkpoints.resume_key(
            key, value, request_id=request_id, actor=actor or os_user(), via="cli"
        )
    run_id = None if result is None else str(result.id)
    if as_json:
        echo_json({"key": key, "run_id": run_id, "request_id": request_id, "early": run_id is None})
    elif run_id is None:
        click.echo(
            f"no run holds key {key} yet: answer {request_id} is kept for the pause that names it"
        )
    else:
        click.echo(
            f"resume {request_id} of run {run_id} (key {key}) accepted; a worker continues it"
        )


@checkpoint.command()
@click.argument("run_id")
@click.option("--reason", metavar="TEXT", help="Why: stored with the run and in its REVOKED state.")
@click.option("--json", "as_json", is_flag=True, help="Print the cancelled run as JSON.")
@click.pass_context
def cancel(ctx: click.Context, run_id: str, reason: str | None, as_json: bool) -> None:
    """Cancel a paused or in-flight run for good (an in-flight body's result is dropped)."""
    run_id = run_id_arg(run_id)
    checkpoints = checkpoints_of(ctx)
    with errors():
        was_in_flight = checkpoints.store.lease(run_id) is not None
        ended = checkpoints.cancel(run_id, reason=reason)
    if as_json:
        echo_json(
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
    checkpoints = checkpoints_of(ctx)
    with errors():
        report = checkpoints.recover()
    if as_json:
        echo_json(dataclasses.asdict(report))
    else:
        click.echo(f"recovery pass: {report}")


@checkpoint.command()
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """How many runs are paused, in flight, waiting for a worker or past their deadline."""
    store = checkpoints_of(ctx).store
    with errors():
        counts = store.stats()
    if as_json:
        echo_json(counts)
        return
    labels = (
        ("runs", "runs"),
        ("paused", "  paused"),
        ("in_flight", "  in flight"),
        ("pending_resumes", "pending resumes"),
        ("due_timeouts", "due timeouts"),
    )
    values: dict[str, object] = dict(counts)
    for key, label in labels:
        if key in values:
            click.echo(f"{label:<16} {values[key]:>8}")


@checkpoint.command()
@click.option(
    "--older-than",
    type=Duration(),
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
    store = checkpoints_of(ctx).store
    with errors():
        pruned = store.prune_ended(older_than)
    if as_json:
        echo_json({"pruned": pruned, "older_than_seconds": older_than})
    else:
        click.echo(f"pruned {pruned} ended runs that ended over {span(older_than)} ago")


checkpoint.add_command(serve)
checkpoint.add_command(migrate)
