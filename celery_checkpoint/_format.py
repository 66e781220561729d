"""How ``celery checkpoint`` shows runs: durations, states, table rows, JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from .model import RunRecord
from .store import RunInfo

__all__ = ["COLUMNS", "ago", "deadline", "echo_json", "iso", "row", "span", "state_of", "summary"]


def span(seconds: float) -> str:
    """``2d 3h``, ``3h 5m``, ``4m 10s``, ``12s``: the two largest units."""
    seconds = int(abs(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def ago(when: datetime | None, now: datetime) -> str:
    return "-" if when is None else f"{span((now - when).total_seconds())} ago"


def deadline(run: RunRecord, now: datetime) -> str:
    if run.expires_at is None:
        return "-"
    left = (run.expires_at - now).total_seconds()
    return f"in {span(left)}" if left > 0 else f"due {span(left)} ago"


def state_of(info: RunInfo) -> str:
    if info.in_flight:
        return "in flight"
    request = info.run.current_resume
    if request is not None:
        if request.status == "pending":
            return "timing out" if request.timed_out else "resuming"
        return "resume failed"
    return "paused"


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def summary(info: RunInfo) -> dict[str, Any]:
    run, lease, request = info.run, info.lease, info.run.resume
    return {
        "run_id": run.run_id,
        "task": run.task_name,
        "step": run.step,
        "pause_seq": run.pause_seq,
        "state": state_of(info),
        "reason": run.reason,
        "created_at": iso(run.created_at),
        "paused_at": iso(run.paused_at),
        "expires_at": iso(run.expires_at),
        "on_timeout": run.on_timeout if run.expires_at is not None else None,
        "request_id": None if request is None else request.request_id,
        "owner": None if lease is None else str(lease.owner),
        "lease_expires_at": None if lease is None else iso(lease.expires_at),
        "recoveries": run.recoveries,
    }


COLUMNS = (
    ("RUN ID", 36),
    ("TASK", 24),
    ("STEP", 20),
    ("PAUSE", 5),
    ("STATE", 13),
    ("PAUSED", 12),
    ("EXPIRES", 0),
)


def row(values: tuple[str, ...]) -> str:
    # Fixed widths: a streamed table cannot measure rows it has not read yet.
    # A longer value pushes the line instead of being cut (run ids get copied).
    return " ".join(
        f"{value:<{width}}" if width else value
        for value, (_, width) in zip(values, COLUMNS, strict=True)
    ).rstrip()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str, ensure_ascii=False))
