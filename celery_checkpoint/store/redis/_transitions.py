"""The Redis store's transitions of one run, and its reads: each transition is
one script in the run's group (see "Atomicity" in the package docstring)."""

from __future__ import annotations

import contextlib

from pydantic import ValidationError

from ...exceptions import (
    AlreadyResumed,
    CheckpointNotFound,
    CorruptCheckpoint,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
    StoreUnavailable,
)
from ...model import EndStatus, Lease, Owner, ResumeRequest, RunRecord, process_owner
from ._codec import from_ms, from_us, lease_from, resume_from, split_flat, text
from ._records import Records

__all__ = ["Transitions"]


class Transitions(Records):
    """Claim, request_resume, heartbeat, complete, release and end of one run, and its reads."""

    def _exists(self, run_id: str) -> bool:
        keys = (self._key(run_id), self._key(run_id, "/ended"))  # one hash slot
        found: int = self._conn.read("exists", run_id, lambda: self._conn.client.exists(*keys))
        return found > 0

    def _load(self, run_id: str) -> RunRecord | None:
        body, ctl = self._read_run("load", run_id)
        return None if body is None else self._record(run_id, body, ctl)

    def _lease(self, run_id: str) -> Lease | None:
        body, ctl = self._read_run("lease", run_id)
        run = None if body is None else self._record(run_id, body, ctl)
        if run is None or "lease_token" not in ctl:
            return None
        try:
            if int(ctl["lease_token"]) <= run.last_token:
                return None  # superseded by a later write
            return lease_from(ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"lease: {exc}") from exc

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        if owner is None:
            owner, owner_json = process_owner()
        else:
            owner_json = owner.model_dump_json()
        result = self._run(
            "claim",
            "claim",
            run_id,
            owner_json,
            owner.host,
            round(lease_seconds * 1000),
            "" if pause_seq is None else pause_seq,
        )
        if result[0] != "ok":
            return None
        _, flat, token, claimed_ms, expires_ms = result
        body, fields = split_flat(flat)
        assert body is not None  # the script claims only a run with a record
        try:
            run = self._record(run_id, body, fields)
        except CorruptCheckpoint:
            # The claim won but the record is unusable: give the lease back at once
            # (the run stays as it was, corrupt, for list/recovery to move aside).
            with contextlib.suppress(StoreUnavailable):
                self._run("release", "claim", run_id, token, "0", "0", "")
            raise
        # Built without validation: every value is ours or the script's integers.
        run.lease = Lease.model_construct(
            token=token,
            owner=owner,
            claimed_at=from_ms(claimed_ms),
            expires_at=from_ms(expires_ms),
        )
        return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        result = self._resume(run_id, request, pause_seq)
        assert result is not None  # only an answer by key can find a binding stale
        return result

    def _resume(
        self,
        run_id: str,
        request: ResumeRequest,
        pause_seq: int | None,
        binding: tuple[str, str] | None = None,
    ) -> ResumeRequest | None:
        """request_resume; with ``binding`` (key, nonce), only if the run holds the
        key under that binding: None (after settling the binding) if it does not."""
        request_id = request.request_id
        key, nonce = binding or ("", "")
        result = self._run(
            "request_resume",
            "request_resume",
            run_id,
            request_id,
            request.model_dump_json(),
            "" if pause_seq is None else pause_seq,
            "1" if request.timed_out else "",
            key,
            nonce,
        )
        status = result[0]
        if status == "stale":
            verdict, written = (text(v) for v in result[1])
            self._settle(key, run_id, nonce, verdict, written)
            return None
        if status == "notfound":
            raise CheckpointNotFound(run_id)
        if status == "ended":
            body, fields = split_flat(result[1])
            ended = self._record(run_id, body or b"", fields)
            done = ended.resume if ended.status == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise ended.ended_error()
        if status == "rejected":
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause "
                f"{int(result[1])} (step {text(result[2])!r})",
            )
        if status == "expired":
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {text(result[1])!r} at "
                f"{from_us(int(result[2])).isoformat()}: the answer came too late"
            )
        if status == "already":
            raise AlreadyResumed(run_id, text(result[1]))
        if status == "busy":
            raise AlreadyResumed(run_id, f"<none: in flight under token {int(result[1])}>")
        try:
            accepted = resume_from(split_flat(result[1])[1])
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, f"resume request: {exc}") from exc
        assert accepted is not None
        return accepted

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        result = self._run("heartbeat", "heartbeat", run_id, token, round(lease_seconds * 1000))
        if result[0] != "ok":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        _, owner, claimed, expires = result
        return Lease(
            token=token,
            owner=Owner.model_validate_json(owner),
            claimed_at=from_ms(int(claimed)),
            expires_at=from_ms(int(expires)),
        )

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        reply = self._run(
            "complete",
            "complete",
            run_id,
            "" if token is None else token,
            "" if result is None else "1",
            result or "",
        )
        if reply[0] == "ok":
            if len(reply) > 1:
                self._release_key(run_id, text(reply[1]), text(reply[2]))
            return
        why = text(reply[1])
        if why == "ended":
            raise LeaseLost(run_id, f"the run was {text(reply[2])}")
        if why == "ended_by":
            raise LeaseLost(run_id, f"token {token} ended by {text(reply[2]) or 'a later claim'}")
        raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _mark_delivered(self, run_id: str) -> None:
        self._run("mark_delivered", "mark_delivered", run_id)

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        result = self._run(
            "release",
            "release",
            run_id,
            token,
            "1",
            "0" if error is None else "1",
            error or "",
        )
        if result[0] != "ok":
            raise LeaseLost(run_id, f"token {token} is not the current lease")

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        result = self._run(
            "cancel",
            "cancel",
            run_id,
            status,
            "0" if reason is None else "1",
            reason or "",
            "" if token is None else token,
        )
        if result[0] == "none":
            return None
        if result[0] == "corrupt":
            raise CorruptCheckpoint(run_id, f"the record is not JSON ({int(result[1])} bytes)")
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        body, fields = split_flat(result[1])
        assert body is not None  # the script cancels only a run with a record
        if "key" in fields:
            self._release_key(run_id, fields["key"], fields.get("key_nonce", ""))
        try:
            return self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(run_id, exc.detail + "; the run was ended anyway") from exc

    def _ended(self, run_id: str) -> RunRecord | None:
        body, ctl = self._read_run("ended", run_id, ended=True)
        return None if body is None else self._record(run_id, body, ctl)
