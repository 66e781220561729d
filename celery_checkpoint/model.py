"""The records of a run, its lease and resume request, and the rules about one run.

A :class:`RunRecord` is everything needed to continue a run after its worker
has gone: the task, its arguments, the Celery request fields that keep a chain
or chord attached, the user's JSON state, and the resume request. The same
record describes the run while it is paused, in flight (with ``lease`` set by
a claim) and once it ended (``status`` other than ``"paused"``: a tombstone).
It is serialised as JSON (never pickle) and carries ``schema_version`` so newer
code can read records written by older code. ``PausedWorkflow`` is its former
name, kept as an alias.

The rules every layer shares live here, once: which request belongs to the
current pause (:attr:`RunRecord.current_resume`), which error an ended run
answers with (:meth:`RunRecord.ended_error`), and what a valid run id is.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from .exceptions import AlreadyResumed, CheckpointError, InvalidRunId, PauseExpired, RunCancelled

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "EARLIER_ANSWERS_KEPT",
    "MAX_DURATION",
    "SCHEMA_VERSION",
    "CeleryRequest",
    "EndStatus",
    "Lease",
    "Owner",
    "PausedWorkflow",
    "ResumeRequest",
    "RunRecord",
    "RunStatus",
    "Via",
    "corrupt_detail",
    "process_owner",
    "utcnow",
    "validate_key",
    "validate_run_id",
]

SCHEMA_VERSION = 1
#: How many request ids of earlier answers a run's record keeps.
EARLIER_ANSWERS_KEPT = 50

#: How long a claim lasts without a heartbeat, unless configured.
DEFAULT_LEASE_SECONDS = 60.0
#: The longest pause timeout or duration anything accepts: far enough, and
#: clear of ``datetime``'s range for any date this code will see.
MAX_DURATION = timedelta(days=365 * 100)

_RUN_ID = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,199}")
# Names the stores use for their own files; a run id ending in one could be
# mistaken for one of them by a person reading the directory, so it is refused.
_RESERVED_SUFFIXES = (".json", ".inflight", ".corrupt", ".tmp", ".lock", ".pending", ".ended")

RunStatus = Literal["paused", "cancelled", "expired", "failed", "completed"]
#: How a run can be ended from outside its body (``CheckpointStore.end``).
EndStatus = Literal["cancelled", "expired", "failed"]
#: Through what an answer reached a pause (recorded on its request).
Via = Literal["code", "cli", "api", "inbox", "link", "webhook", "timeout"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_KEY = re.compile(r"[A-Za-z0-9_:@+=/-][A-Za-z0-9_.:@+=/-]{0,199}")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid business key; raise :class:`InvalidRunId`.

    Allowed: 1-200 characters of ``[A-Za-z0-9_.:@+=/-]``, not starting with
    ``.``: room for ``provider:id`` forms such as ``stripe:pi_3Nk2...`` or
    ``docusign:envelope/4f1c``.
    """
    if not isinstance(key, str):
        raise InvalidRunId(f"key must be a string, not {type(key).__name__}")
    if not _KEY.fullmatch(key):
        shown = key if len(key) <= 60 else key[:57] + "..."
        raise InvalidRunId(
            f"invalid key {shown!r}: use 1-200 characters of [A-Za-z0-9_.:@+=/-], "
            "not starting with '.'"
        )
    return key


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is safe as a file name and a key; raise :class:`InvalidRunId`.

    Allowed: 1-200 characters of ``[A-Za-z0-9_.:-]``, not starting with ``.``
    and not ending in a suffix the stores use for their own files.
    """
    if not isinstance(run_id, str):
        raise InvalidRunId(f"run id must be a string, not {type(run_id).__name__}")
    if not _RUN_ID.fullmatch(run_id):
        shown = run_id if len(run_id) <= 60 else run_id[:57] + "..."
        raise InvalidRunId(
            f"invalid run id {shown!r}: use 1-200 characters of [A-Za-z0-9_.:-], "
            "not starting with '.'"
        )
    if run_id.endswith(_RESERVED_SUFFIXES):
        raise InvalidRunId(
            f"invalid run id {run_id!r}: it ends in a reserved suffix "
            f"({', '.join(_RESERVED_SUFFIXES)})"
        )
    return run_id


class Owner(BaseModel):
    """Who holds a lease: a worker node name and the process on its host."""

    model_config = ConfigDict(frozen=True)

    node: str
    host: str
    pid: int
    # Process start time (clock ticks since boot, from /proc) so a recycled pid
    # is not mistaken for the owner. None where /proc is not available.
    pid_start: int | None = None
    # The kernel's boot id and the pid namespace: a pid proves death only on
    # the same boot of the same machine, in the same namespace (containers and
    # cloned VMs may share a host name without sharing either).
    boot_id: str | None = None
    pid_ns: str | None = None

    @classmethod
    def current(cls, node: str | None = None) -> Owner:
        pid = os.getpid()
        host = socket.gethostname()
        return cls(
            node=node or f"{host}:{pid}",
            host=host,
            pid=pid,
            pid_start=_pid_start(pid),
            boot_id=_BOOT_ID,
            pid_ns=_pid_namespace(),
        )

    def is_dead_here(self) -> bool:
        """True only when the owner is proved dead: same machine, same pid
        namespace, and its process is gone (or its pid now names another process).

        "Same machine" is the kernel's boot id, equal to ours and known on both
        sides; a host name proves nothing (containers and cloned VMs share one),
        and neither does a different boot id: two machines may share a host name,
        so another boot id may be a live machine next door. Such an owner's lease
        is taken over only when it expires. Likewise the pid namespace must be
        ours and known: a pid in another namespace means nothing here.
        """
        if self.host != socket.gethostname():
            return False
        if self.boot_id is None or _BOOT_ID is None or self.boot_id != _BOOT_ID:
            return False
        here = _pid_namespace()
        if self.pid_ns is None or here is None or self.pid_ns != here:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, owned by another user
        if self.pid_start is not None:
            started = _pid_start(self.pid)
            if started is not None and started != self.pid_start:
                return True  # the pid was recycled by another process
        return False

    def __str__(self) -> str:
        return f"{self.node} (pid {self.pid} on {self.host})"


_PROCESS_OWNER: tuple[int, Owner, str] | None = None


def process_owner() -> tuple[Owner, str]:
    """This process as a lease owner, and its JSON: built once per process (a
    forked child builds its own), for claims that name no owner."""
    global _PROCESS_OWNER
    pid = os.getpid()
    if _PROCESS_OWNER is None or _PROCESS_OWNER[0] != pid:
        owner = Owner.current()
        _PROCESS_OWNER = (pid, owner, owner.model_dump_json())
    return _PROCESS_OWNER[1], _PROCESS_OWNER[2]


def _read_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


_BOOT_ID = _read_boot_id()


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # Field 22 (starttime); field 2 (comm) may hold spaces, so split after ')'.
    try:
        return int(stat.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


class Lease(BaseModel):
    """The right to run a claimed checkpoint, fenced by a token that grows on every claim."""

    token: int
    owner: Owner
    claimed_at: datetime
    expires_at: datetime

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at


class ResumeRequest(BaseModel):
    """A resume recorded on the paused record; the worker takes its input from here."""

    request_id: str
    input: JsonValue = None
    pause_seq: int
    requested_at: datetime = Field(default_factory=utcnow)
    # pending: waiting for (or being run by) a worker. failed: the resumed body
    # raised; a Celery retry of the same message still resumes with this input,
    # the recovery timer does not re-send it, and a new resume may replace it.
    status: Literal["pending", "failed"] = "pending"
    error: str | None = None
    timed_out: bool = False
    #: Who answered (a user name, an e-mail, a service), as the caller said.
    actor: str | None = None
    #: Through what the answer came.
    via: Via = "code"


class CeleryRequest(BaseModel):
    """The request fields a re-sent message needs to continue the run's canvas.

    ``signature`` is the JSON form of ``task.signature_from_request()`` taken at
    pause time: task id, root/parent/group ids, chord, chain, link, link_error,
    reply_to and routing options.
    """

    task_id: str | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None
    signature: dict[str, Any] = Field(default_factory=dict)


class RunRecord(BaseModel):
    """The stored record of one run: paused at ``step``, in flight, or ended."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    run_id: str
    task_name: str
    step: str
    pause_seq: int = 1
    state: JsonValue = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    request: CeleryRequest = Field(default_factory=CeleryRequest)
    reason: str | None = None
    # Import path ("module:QualName") of the type the resume input must match.
    expects: str | None = None
    # The JSON Schema of ``expects`` taken at pause time: a form can be drawn
    # from it without importing the task's code.
    expects_schema: dict[str, JsonValue] | None = None
    # A business key naming the pause (a payment intent, an envelope id): unique
    # among live runs, so an answer can find the run without its id.
    key: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    paused_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    on_timeout: Literal["expire", "resume"] = "expire"
    resume: ResumeRequest | None = None
    # The request ids that answered the run's earlier pauses, oldest first (the
    # last EARLIER_ANSWERS_KEPT): a webhook delivered again after the run moved
    # on is the same answer, not an answer to the new pause.
    earlier_answers: list[str] = Field(default_factory=list)
    # Fencing token of the last claim that ended (released, re-paused, recovered).
    # The next claim takes last_token + 1, so tokens grow on every claim of a run.
    last_token: int = 0
    # How the lease of last_token ended, so a late ``complete`` by that holder
    # can tell its own re-pause (a no-op) from a lost lease (LeaseLost).
    lease_ended_by: Literal["repause", "release", "recovery", "cancel", "complete"] | None = None
    recoveries: int = 0
    status: RunStatus = "paused"
    ended_reason: str | None = None
    ended_at: datetime | None = None
    # The body's return value as kombu JSON text, kept with the completion so
    # a worker killed before Celery stored it can still deliver it.
    result: str | None = None
    # Set on the record a claim returns; never stored on the paused record.
    lease: Lease | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("run_id")
    @classmethod
    def _check_run_id(cls, value: str) -> str:
        return validate_run_id(value)

    @field_validator("created_at", "paused_at", "expires_at", "ended_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude={"lease"}).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RunRecord:
        """Parse a stored record; older ``schema_version`` records are upgraded here."""
        return cls.model_validate_json(data)

    @property
    def current_resume(self) -> ResumeRequest | None:
        """The resume request of the current pause; a request left over from an
        earlier pause of the run is not this pause's answer."""
        request = self.resume
        if request is not None and request.pause_seq == self.pause_seq:
            return request
        return None

    def answer_status(self, request: ResumeRequest) -> Literal["pending", "failed", "applied"]:
        """How ``request`` (an answer recorded on this run) stands: ``failed`` (its
        body raised), ``applied`` (it resumed a pause the run has left: the run
        completed or paused again), else ``pending`` (not run yet, or running)."""
        if request.status == "failed":
            return "failed"
        if self.status == "completed" or request.pause_seq < self.pause_seq:
            return "applied"
        return "pending"

    def answered_pause(self, request_id: str) -> int | None:
        """The pause ``request_id`` answered, when that is an earlier pause of this
        run (or, for a completed run, its last one): the same answer again, never
        a new one. None otherwise."""
        request = self.resume
        if (
            request is not None
            and request.request_id == request_id
            and (request.pause_seq < self.pause_seq or self.status == "completed")
        ):
            return request.pause_seq
        earlier = self.earlier_answers
        for back, seen in enumerate(reversed(earlier), start=1):
            if seen == request_id:  # one entry per resumed pause, the latest last
                return self.pause_seq - back
        return None

    @property
    def ended(self) -> bool:
        return self.status != "paused"

    def ended_error(self) -> CheckpointError:
        """What an answer to this ended run is refused with: ``AlreadyResumed``
        (completed), ``PauseExpired`` (expired) or ``RunCancelled`` (cancelled, failed)."""
        why = f": {self.ended_reason}" if self.ended_reason else ""
        if self.status == "completed":
            done = self.resume.request_id if self.resume is not None else "<none>"
            return AlreadyResumed(self.run_id, done, completed=True)
        if self.status == "expired":
            return PauseExpired(f"run {self.run_id!r} expired at step {self.step!r}{why}")
        return RunCancelled(f"run {self.run_id!r} was {self.status}{why}")


#: The former name of :class:`RunRecord`, kept for one release.
PausedWorkflow = RunRecord


def corrupt_detail(exc: Exception, data: bytes | str) -> str:
    """One line saying why a stored record did not parse, for ``CorruptCheckpoint``."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{first} ({len(data)} bytes)"
