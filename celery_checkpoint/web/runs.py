"""What the API, the inbox and the links share: reading runs, paging, answering once.

Every answer the web app records goes through :func:`answer`, so the three
front doors agree on what "already answered" means: the run (paused, in
flight or ended) already carries this very request id. Anything else is
handed to ``Checkpoints.resume``, the one compare-and-set every resume goes
through.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from kombu.exceptions import KombuError

from ..exceptions import CheckpointNotFound
from ..model import RunRecord, Via, validate_key, validate_run_id
from ..store import Order, RunInfo

if TYPE_CHECKING:
    from ..checkpoints import Checkpoints

__all__ = [
    "ORDERS",
    "Answered",
    "BadCursor",
    "Page",
    "Status",
    "answer",
    "decode_cursor",
    "encode_cursor",
    "find",
    "page",
    "status_of",
]

logger = logging.getLogger("celery_checkpoint.web")

ORDERS: tuple[Order, ...] = ("oldest", "newest", "deadline")

Status = Literal[
    "paused",
    "resuming",
    "timing_out",
    "resume_failed",
    "in_flight",
    "completed",
    "cancelled",
    "expired",
    "failed",
]


def status_of(run: RunRecord, in_flight: bool) -> Status:
    """One word for where the run is, for people and programs alike."""
    if run.status != "paused":
        return run.status
    if in_flight:
        return "in_flight"
    request = run.current_resume
    if request is None:
        return "paused"
    if request.status == "failed":
        return "resume_failed"
    return "timing_out" if request.timed_out else "resuming"


def find(checkpoints: Checkpoints, run_id: str) -> RunInfo:
    """The run, paused, in flight or ended; ``CheckpointNotFound`` otherwise."""
    store = checkpoints.store
    run_id = validate_run_id(run_id)
    run = store.load(run_id)
    if run is not None:
        return RunInfo(run=run, lease=store.lease(run_id))
    ended = store.ended(run_id)
    if ended is None:
        raise CheckpointNotFound(run_id)
    return RunInfo(run=ended, lease=None)


# -- paging ---------------------------------------------------------------------------


class BadCursor(ValueError):
    """A cursor this listing did not hand out (or for another order)."""


def encode_cursor(order: Order, position: tuple[str, str]) -> str:
    raw = json.dumps([order, *position], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        made_for, when, run_id = json.loads(raw)
        datetime.fromisoformat(when)
        validate_run_id(run_id)
    except (binascii.Error, ValueError, TypeError):
        raise BadCursor("the cursor is not one this listing handed out") from None
    if made_for != order:
        raise BadCursor(f"the cursor was made for order={made_for}, not order={order}")
    return str(when), str(run_id)


@dataclass(frozen=True)
class Page:
    rows: list[RunInfo]
    next_cursor: str | None


def page(
    checkpoints: Checkpoints,
    *,
    task: str | None,
    step: str | None,
    older_than: float | None,
    order: Order,
    limit: int,
    cursor: str | None,
) -> Page:
    """One page of live runs in ``order``; ``BadCursor`` for a cursor not from here."""
    after = decode_cursor(cursor, order) if cursor else None
    listing = checkpoints.runs(
        task=task, step=step, older_than=older_than, order=order, after=after
    )
    try:
        rows = list(itertools.islice(listing, limit + 1))
    finally:
        close = getattr(listing, "close", None)
        if close is not None:
            close()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(order, rows[-1].position(order)) if more and rows else None
    return Page(rows, next_cursor)


# -- answering ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    """What an answer came to: accepted now, or this very request was accepted before."""

    run_id: str
    request_id: str
    pause_seq: int
    again: bool  #: True: "already answered" by this same request
    note: str | None = None


def _same_request(checkpoints: Checkpoints, run_id: str, request_id: str) -> int | None:
    """The pause this request answered, if the run already carries it."""
    store = checkpoints.store
    run = store.load(run_id)
    if run is None:
        ended = store.ended(run_id)
        return None if ended is None else ended.answered_pause(request_id)
    current = run.current_resume
    if current is not None and current.request_id == request_id and not current.timed_out:
        return current.pause_seq
    return run.answered_pause(request_id)  # an earlier pause's answer, delivered again


def answer(
    checkpoints: Checkpoints,
    run_id: str,
    input: Any,
    *,
    request_id: str,
    pause_seq: int | None,
    actor: str | None,
    via: Via,
) -> Answered:
    """Resume ``run_id`` once per ``request_id``; raises what ``resume`` raises.

    A repeat of a request the run already carries (pending, running, or the
    one that completed it) changes nothing and is reported as ``again``. A
    request recorded whose message could not be sent is still accepted: a
    worker's recovery pass sends it.
    """
    run_id = validate_run_id(run_id)
    seen = _same_request(checkpoints, run_id, request_id)
    if seen is not None:
        return Answered(run_id, request_id, seen, again=True)
    note = None
    try:
        checkpoints.resume(
            run_id, input, request_id=request_id, pause_seq=pause_seq, actor=actor, via=via
        )
    except KombuError as exc:
        logger.warning("run %s: answer %s recorded, sending it failed: %s", run_id, request_id, exc)
        note = "recorded; sending it to a worker failed, a worker's recovery pass sends it later"
    seen = _same_request(checkpoints, run_id, request_id)
    return Answered(run_id, request_id, seen if seen is not None else pause_seq or 0, False, note)


@dataclass(frozen=True)
class KeyAnswered:
    """What an answer to a business key came to."""

    key: str
    run_id: str | None  #: the run that waits on the key; None: kept for its pause
    request_id: str
    status: Literal["accepted", "already answered", "kept"]


def answer_key(
    checkpoints: Checkpoints,
    key: str,
    input: Any,
    *,
    request_id: str,
    actor: str | None,
    via: Via,
) -> KeyAnswered:
    """Answer the run paused with ``key``, or keep the answer for the pause that
    names it; raises what ``resume_key`` raises."""
    key = validate_key(key)
    run_id = checkpoints.store.find_key(key)
    if run_id is not None:
        try:
            done = answer(
                checkpoints,
                run_id,
                input,
                request_id=request_id,
                pause_seq=None,
                actor=actor,
                via=via,
            )
        except CheckpointNotFound:
            pass  # ended between the lookup and the answer: keep it for the next pause
        else:
            status: Literal["accepted", "already answered"] = (
                "already answered" if done.again else "accepted"
            )
            return KeyAnswered(key, run_id, request_id, status)
    result = checkpoints.resume_key(key, input, request_id=request_id, actor=actor, via=via)
    if result is None:
        return KeyAnswered(key, None, request_id, "kept")
    return KeyAnswered(key, str(result.id), request_id, "accepted")
