"""How a run lives in a Redis hash, the arguments of the scripts that write one,
and the time units the scripts use.

A run's hash holds the record JSON as last saved (field ``record``, kept as
bytes so a corrupt one is moved aside unchanged), the control fields that
transitions change without rewriting the JSON (they override it on read), and
the lease (``lease_*``). See "Key layout" in the package docstring.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from ...exceptions import CorruptCheckpoint
from ...model import Lease, Owner, ResumeRequest, RunRecord, utcnow, validate_run_id

__all__ = [
    "GROUPS",
    "control_fields",
    "from_ms",
    "from_us",
    "group_of",
    "lease_from",
    "not_a_hash",
    "overlay",
    "restore_args",
    "resume_from",
    "save_args",
    "split",
    "split_flat",
    "text",
    "us",
    "valid",
    "wrong_type",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
#: Run groups, each one hash tag (part of the key layout: never change it).
GROUPS = 16
_ENDED_BY = frozenset({"repause", "release", "recovery", "cancel", "complete"})
_STATUSES = frozenset({"paused", "cancelled", "expired", "failed", "completed"})
_RESUME_STATUSES = frozenset({"pending", "failed"})


def group_of(run_id: str) -> int:
    """The group of a run: its keys are ``<prefix>:{<group as 2 hex digits>}:...``."""
    return zlib.crc32(run_id.encode()) % GROUPS


def valid(run_id: str) -> bool:
    """Whether an id read back from an index is a run id (anything else is skipped)."""
    try:
        validate_run_id(run_id)
    except ValueError:
        return False
    return True


def us(when: datetime) -> int:
    """Microseconds since the epoch, exactly (naive datetimes are UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // _US


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def from_us(microseconds: int) -> datetime:
    """The inverse of :func:`us`."""
    return _EPOCH + timedelta(microseconds=microseconds)


def text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def wrong_type(error: BaseException | None) -> bool:
    """Whether Redis refused a command because the key holds another type."""
    return error is not None and "WRONGTYPE" in str(error)


def not_a_hash(run_id: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(run_id, "its key is not a run hash")


def split(pairs: Iterable[tuple[Any, Any]]) -> tuple[bytes | None, dict[str, str]]:
    """A run's hash: its record JSON, as stored (bytes: a corrupt record is moved
    aside unchanged), and its other fields as text."""
    record: bytes | None = None
    fields: dict[str, str] = {}
    for name, value in pairs:
        key = text(name)
        if key == "record":
            record = value if isinstance(value, bytes) else str(value).encode()
        else:
            fields[key] = text(value)
    return record, fields


def split_flat(flat: list[Any]) -> tuple[bytes | None, dict[str, str]]:
    """:func:`split` of a hash as a script returns it: a flat array of names and values."""
    it = iter(flat)
    return split(zip(it, it, strict=True))


def _literal(value: str, allowed: frozenset[str], what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}")
    return value


def resume_from(ctl: dict[str, str]) -> ResumeRequest | None:
    raw = ctl.get("resume")
    if raw is None:
        return None
    request = ResumeRequest.model_validate_json(raw)
    request.pause_seq = int(ctl["resume_seq"])
    request.status = _literal(ctl["resume_status"], _RESUME_STATUSES, "resume status")
    request.error = ctl.get("resume_error")
    return request


def overlay(run: RunRecord, ctl: dict[str, str]) -> None:
    """Apply the control fields, which transitions change after the JSON was written.

    Only fields that differ are assigned: a model's ``__setattr__`` is slow, and on
    the common path (claim of a fresh pause) nothing differs.
    """
    if not ctl:
        return
    ended_by = ctl.get("ended_by")
    updates: dict[str, Any] = {
        "last_token": int(ctl.get("last_token", run.last_token)),
        "lease_ended_by": None if ended_by is None else _literal(ended_by, _ENDED_BY, "lease end"),
        "recoveries": int(ctl.get("recoveries", run.recoveries)),
        "status": _literal(ctl.get("status", run.status), _STATUSES, "status"),
        "ended_reason": ctl.get("ended_reason"),
    }
    if "resume" in ctl or run.resume is not None:
        updates["resume"] = resume_from(ctl)
    # Set by the scripts that end a run (and written as given by a restore).
    if "ended_at" in ctl:
        updates["ended_at"] = from_us(int(ctl["ended_at"]))
    if "result" in ctl:
        updates["result"] = ctl["result"]
    for name, value in updates.items():
        if getattr(run, name) != value:
            setattr(run, name, value)


def control_fields(run: RunRecord, resume: ResumeRequest | None) -> list[str]:
    """The control fields written beside the record JSON (:func:`overlay` reads them
    back); a field at its default (status paused, no recoveries) is left out."""
    fields = ["pause_seq", str(run.pause_seq), "step", run.step]
    if run.status != "paused":
        fields += ["status", run.status]
    if run.recoveries:
        fields += ["recoveries", str(run.recoveries)]
    if run.lease_ended_by is not None:
        fields += ["ended_by", run.lease_ended_by]
    if run.ended_reason is not None:
        fields += ["ended_reason", run.ended_reason]
    if run.expires_at is not None:
        # In the deadline index; request_resume refuses answers past it
        # unless the pause resumes on its timeout.
        expires = run.on_timeout == "expire"
        fields += ["deadline", str(us(run.expires_at)) if expires else "r"]
    if resume is not None:
        fields += [
            "resume",
            resume.model_dump_json(),
            "resume_id",
            resume.request_id,
            "resume_seq",
            str(resume.pause_seq),
            "resume_status",
            resume.status,
        ]
        if resume.error is not None:
            fields += ["resume_error", resume.error]
    return fields


def save_args(
    paused: RunRecord,
    token: int | None,
    create: bool,
    resume: ResumeRequest | None,
    binding: tuple[str, str, int, bool] | None = None,
) -> list[Any]:
    """The save script's run id and arguments; ``binding`` is (key, nonce, the
    binding's time, whether the record takes the early answer reserved with it)."""
    # The JSON is written as given. The control fields written beside it, and
    # last_token / lease_ended_by which the script decides, override it on read;
    # a field at its default (status paused, no recoveries) is left out.
    fields = control_fields(paused, resume)
    if binding is not None:
        fields += ["key", binding[0], "key_nonce", binding[1]]
    if token is not None:
        fields += ["ended_by", "repause"]  # after the record's own, so it wins
    key, nonce, since, takes = binding or ("", "", "", False)
    return [
        paused.run_id,
        "create" if create else ("" if token is None else token),
        paused.to_json(),
        paused.last_token,
        us(paused.paused_at),
        "" if paused.expires_at is None else us(paused.expires_at),
        "" if resume is None else resume.status,
        key,
        nonce,
        since,
        "1" if takes else "",
        *fields,
    ]


def restore_args(run: RunRecord, binding: tuple[str, str, int] | None) -> list[Any]:
    """The restore script's run id and arguments; ``binding`` is (key, nonce, the
    binding's time) for a paused run naming a key."""
    fields = control_fields(run, run.resume)
    ended_at = ""
    if run.ended:
        ended_at = str(us(run.ended_at or utcnow()))
        if run.result is not None:
            fields += ["result", run.result]
    if binding is not None:
        fields += ["key", binding[0], "key_nonce", binding[1]]
    key, nonce, since = binding or ("", "", "")
    return [
        run.run_id,
        "ended" if run.ended else "paused",
        run.to_json(),
        run.last_token,
        us(run.paused_at),
        "" if run.expires_at is None or run.ended else us(run.expires_at),
        "" if run.resume is None or run.ended else run.resume.status,
        ended_at,
        key,
        nonce,
        since,
        *fields,
    ]


def lease_from(ctl: dict[str, str]) -> Lease:
    """The lease held in a run hash's ``lease_*`` fields."""
    return Lease(
        token=int(ctl["lease_token"]),
        owner=Owner.model_validate_json(ctl["lease_owner"]),
        claimed_at=from_ms(int(ctl["lease_claimed"])),
        expires_at=from_ms(int(ctl["lease_expires"])),
    )
