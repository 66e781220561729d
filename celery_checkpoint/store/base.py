"""The store contract every backend implements, and how a store is opened.

A run is PAUSED while only its checkpoint record exists, and IN-FLIGHT while a
lease (owner, fencing token, expiry) is attached to it. Each transition below is
atomic: of any number of concurrent callers, in any number of processes, each
sees the state before or after it, never in between.

* :meth:`CheckpointStore.claim` is the only way from PAUSED to IN-FLIGHT, and
  exactly one of any number of concurrent claims wins.
* Writes that carry a ``token`` (save, complete, release, heartbeat, end) fail
  with :class:`~celery_checkpoint.LeaseLost` and change nothing when the token
  is not the run's current one.
* :meth:`CheckpointStore.recover_orphaned` re-arms only leases that expired or
  whose owner is proved dead, so it is safe to call at any time from any number
  of processes.

The public methods check their arguments (run ids above all) once, here, and
call a private primitive of the same name that a backend fills in
(``_save``, ``_claim``...). Operations derived from the primitives
(:meth:`CheckpointStore.stats`, :meth:`CheckpointStore.exists`) have a default
that a backend may replace with a cheaper one. This module holds the
transitions of one run; the operations over many runs (listing, counting, the
passes a worker makes) are in :mod:`._passes`, which the store inherits.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import JsonValue

from ..exceptions import ImproperlyConfigured
from ..model import (
    DEFAULT_LEASE_SECONDS,
    EndStatus,
    Lease,
    Owner,
    ResumeRequest,
    RunRecord,
    Via,
    validate_key,
    validate_run_id,
)
from ._passes import Passes
from ._shapes import (
    GroupCounts,
    Order,
    RunFilter,
    RunInfo,
    StoreStats,
    make_stats,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_LEASE_SECONDS",
    "CheckpointStore",
    "GroupCounts",
    "Order",
    "RunFilter",
    "RunInfo",
    "StoreStats",
    "make_stats",
]

#: scheme -> "module:Class"; a plain path means the file backend.
BACKENDS: dict[str, str] = {
    "file": "celery_checkpoint.store.file:FileStore",
    "postgres": "celery_checkpoint.store.postgres:PostgresStore",
    "postgresql": "celery_checkpoint.store.postgres:PostgresStore",
    "sqlite": "celery_checkpoint.store.sqlite:SqliteStore",
    "redis": "celery_checkpoint.store.redis:RedisStore",
    "rediss": "celery_checkpoint.store.redis:RedisStore",
    "unix": "celery_checkpoint.store.redis:RedisStore",
}
_URL_WITHOUT_SLASHES = re.compile(
    r"(file|sqlite|redis|rediss|unix|postgres|postgresql):(?!//)", re.IGNORECASE
)
_END_STATUSES = ("cancelled", "expired", "failed")


class CheckpointStore(Passes):
    """A checkpoint store. ``CheckpointStore.open(target)`` picks the backend."""

    #: the URL scheme(s) this backend serves, for error messages
    url: str = ""

    def __init__(self, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.lease_seconds = float(lease_seconds)

    @staticmethod
    def open(target: str | os.PathLike[str] | CheckpointStore, **options: Any) -> CheckpointStore:
        """Open the store at ``target``: a directory path, ``file:///abs/dir``,
        ``redis://host:port/db`` or ``rediss://...``; a store is returned as it is.

        Raises ``ImproperlyConfigured`` for an unknown scheme (naming the known
        ones) and ``StoreUnavailable`` when the store cannot be reached.
        """
        if isinstance(target, CheckpointStore):
            return target
        text = os.fspath(target)
        if not text:
            raise ImproperlyConfigured("empty checkpoint store target: give a directory or a URL")
        scheme = urlsplit(text).scheme.lower() if "://" in text else ""
        if not scheme and _URL_WITHOUT_SLASHES.match(text):
            raise ImproperlyConfigured(
                f"checkpoint store target {text!r} looks like a URL without '//': write "
                "file:///absolute/dir or redis://host:port/db, or a plain directory path"
            )
        if scheme and scheme not in BACKENDS:
            known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
            raise ImproperlyConfigured(
                f"unknown checkpoint store scheme {scheme!r} in {text!r}: use a directory path "
                f"or one of {known}"
            )
        module_name, _, cls_name = BACKENDS[scheme or "file"].partition(":")
        backend: Any = getattr(importlib.import_module(module_name), cls_name)
        if scheme == "file":
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise ImproperlyConfigured(
                    f"file store URL {text!r} names host {parts.netloc!r}: the file store is "
                    "local; use file:///absolute/dir (three slashes)"
                )
            text = unquote(parts.path)
        store: CheckpointStore = backend(text, **options)
        return store

    # -- the contract ------------------------------------------------------

    def save(
        self, run: RunRecord, *, token: int | None = None, create: bool = False
    ) -> ResumeRequest | None:
        """Persist ``run`` atomically and durably.

        Without ``token``: create or overwrite the run's checkpoint (a first
        pause); ``LeaseLost`` if the run is in flight. A new run under the id
        of an ended one replaces the ended record, its tokens still growing.
        ``create=True`` (a run's first pause): only if the run has no checkpoint
        at all, paused, in flight or ended; else ``CheckpointExists``, nothing changed.
        With ``token``: a re-pause by the lease holder; the new record replaces
        the old one and the lease ends in the same step. Raises
        ``LeaseLost`` (nothing changed) if ``token`` is stale, and
        ``StoreUnavailable`` on I/O failure (the previous checkpoint intact).

        A pause naming a business key (``run.key``): the key must not be held
        by another live run (``CheckpointExists``, nothing changed); an early
        answer kept for the key (:meth:`answer_key`) is consumed in the same
        step, attached as the run's pending resume request, and returned.
        """
        validate_run_id(run.run_id)
        if run.key is not None:
            validate_key(run.key)
        if create and token is not None:
            raise ValueError("save(create=True) is a first pause: it takes no token")
        return self._save(run, token, create)

    def exists(self, run_id: str) -> bool:
        """Whether the run has any record, paused, in flight or ended, without
        reading it."""
        return self._exists(validate_run_id(run_id))

    def load(self, run_id: str) -> RunRecord | None:
        """The run's checkpoint (paused or in flight), or None. Never claims.

        Raises ``CorruptCheckpoint`` if the record cannot be parsed.
        """
        return self._load(validate_run_id(run_id))

    def lease(self, run_id: str) -> Lease | None:
        """The run's current lease if it is in flight, else None."""
        return self._lease(validate_run_id(run_id))

    def claim(
        self,
        run_id: str,
        *,
        owner: Owner | None = None,
        lease_seconds: float | None = None,
        pause_seq: int | None = None,
    ) -> RunRecord | None:
        """PAUSED -> IN-FLIGHT; exactly one of concurrent claims wins.

        Returns the checkpoint with ``lease`` set (token = previous + 1), or
        None when the run is unknown, already in flight, ended, or (with
        ``pause_seq``) paused at a different pause than the caller aimed at.
        """
        return self._claim(
            validate_run_id(run_id), owner, self._lease_seconds(lease_seconds), pause_seq
        )

    def request_resume(
        self,
        run_id: str,
        input: JsonValue,
        request_id: str,
        *,
        pause_seq: int | None = None,
        timed_out: bool = False,
        actor: str | None = None,
        via: Via = "code",
    ) -> ResumeRequest:
        """Attach a pending resume request to a paused run (compare-and-set).

        The same ``request_id`` again returns the accepted request unchanged. A
        different one while a request is pending or the run is in flight raises
        ``AlreadyResumed``; a failed request may be replaced. Raises
        ``CheckpointNotFound`` for an unknown run, ``RunCancelled`` or
        ``PauseExpired`` for an ended one (the request that completed a run,
        asked again, is returned), and ``ResumeRejected`` when ``pause_seq``
        names another pause than the current one.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_resume needs a non-empty request id")
        request = ResumeRequest(
            request_id=request_id,
            input=input,
            pause_seq=0,  # the store sets the run's current pause
            timed_out=timed_out,
            actor=actor,
            via=via,
        )
        return self._request_resume(validate_run_id(run_id), request, pause_seq)

    def heartbeat(self, run_id: str, token: int, *, lease_seconds: float | None = None) -> Lease:
        """Extend the lease from now; ``LeaseLost`` if ``token`` is stale."""
        return self._heartbeat(validate_run_id(run_id), token, self._lease_seconds(lease_seconds))

    def complete(self, run_id: str, *, token: int | None = None, result: str | None = None) -> None:
        """The body finished: the run ends as completed, keeping a tombstone. Idempotent.

        ``result`` is the body's value as text (kombu's JSON): the tombstone
        keeps it, and the run waits in an undelivered index until
        :meth:`mark_delivered` says Celery stored it (see :meth:`due_deliveries`).

        A run whose lease already ended by a re-pause ``save`` keeps its fresh
        paused record. With a ``token`` that is not the current lease's,
        ``LeaseLost`` and nothing changes. Without one, an in-flight run is
        dropped whatever its token (an operator's action) and a run that is not
        in flight is left as it is.
        """
        self._complete(validate_run_id(run_id), token, result)

    def mark_delivered(self, run_id: str) -> None:
        """Celery stored the completed run's result: it leaves the undelivered
        index (the tombstone keeps the result). Idempotent; unknown runs: no-op."""
        self._mark_delivered(validate_run_id(run_id))

    def release(self, run_id: str, token: int, *, error: str | None = None) -> None:
        """The body failed: IN-FLIGHT -> PAUSED with nothing lost.

        The resume input stays (a Celery retry of the same message resumes with
        it) and the request is marked failed so recovery does not re-send it.
        ``LeaseLost`` if ``token`` is not the current lease.
        """
        self._release(validate_run_id(run_id), token, error)

    def end(
        self,
        run_id: str,
        status: EndStatus,
        *,
        reason: str | None = None,
        token: int | None = None,
    ) -> RunRecord | None:
        """End a paused or in-flight run for good as ``status``; it is kept as ended.

        Returns the ended record, or None if there was no such run (never
        paused, or ended already). Any lease is fenced: the holder's later
        writes raise ``LeaseLost``. With ``token``, only that lease holder may
        end the run (``LeaseLost`` otherwise).
        """
        if status not in _END_STATUSES:
            raise ValueError(f"end status must be cancelled, expired or failed, not {status!r}")
        return self._end(validate_run_id(run_id), status, reason, token)

    def cancel(
        self,
        run_id: str,
        *,
        reason: str | None = None,
        status: EndStatus = "cancelled",
        token: int | None = None,
    ) -> RunRecord | None:
        """``end(run_id, "cancelled")``; ``status=`` is kept for callers of the
        former signature, for one release: use :meth:`end`."""
        return self.end(run_id, status, reason=reason, token=token)

    def ended(self, run_id: str) -> RunRecord | None:
        """The record of a completed, cancelled, expired or failed run, or None."""
        return self._ended(validate_run_id(run_id))

    def find_key(self, key: str) -> str | None:
        """The id of the live (paused or in-flight) run whose pause names ``key``."""
        return self._find_key(validate_key(key))

    def answer_key(
        self,
        key: str,
        input: JsonValue,
        request_id: str,
        *,
        ttl: float,
        actor: str | None = None,
        via: Via = "webhook",
    ) -> tuple[str | None, ResumeRequest]:
        """Answer whichever run waits on ``key``, or keep the answer until one does.

        A live run holding the key: exactly ``request_resume`` on it (same rules,
        same errors), returning ``(run_id, request)``. None: the answer is kept
        for ``ttl`` seconds and ``(None, request)`` returned; a pause naming the
        key consumes it in its save. Per key one answer is kept: the same
        ``request_id`` again returns it, another raises ``AlreadyResumed``.
        Answer and pause racing happen in one order or the other, never both
        and never neither.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("answer_key needs a non-empty request id")
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        request = ResumeRequest(
            request_id=request_id, input=input, pause_seq=0, actor=actor, via=via
        )
        return self._answer_key(validate_key(key), request, float(ttl))

    def restore(self, run: RunRecord) -> bool:
        """Write ``run`` exactly as given (paused, or ended as a tombstone, with its
        indexes) if the store has no record of it; True if written. For moving
        runs between stores: a run in flight (``run.lease`` set) is refused."""
        validate_run_id(run.run_id)
        if run.lease is not None:
            raise ValueError(f"run {run.run_id!r} is in flight: only paused and ended runs move")
        if run.key is not None:
            validate_key(run.key)
        return self._restore(run)

    def close(self) -> None:
        """Release connections or file handles."""

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
