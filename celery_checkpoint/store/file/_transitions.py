"""The file store's transitions of one run, and its reads: each transition holds
the run's stripe lock and orders its writes by the rules of the package docstring."""

from __future__ import annotations

import time
from datetime import timedelta

from ...exceptions import (
    AlreadyResumed,
    CheckpointNotFound,
    LeaseLost,
    PauseExpired,
    ResumeRejected,
)
from ...model import EndStatus, Lease, Owner, ResumeRequest, RunRecord, process_owner, utcnow
from ._records import Records

__all__ = ["Transitions"]


class Transitions(Records):
    """Claim, request_resume, heartbeat, complete, release and end of one run, and its reads."""

    def _exists(self, run_id: str) -> bool:
        with self._io("exists", run_id):
            return self._fs.exists("paused", run_id) or self._fs.exists("ended", run_id)

    def _load(self, run_id: str) -> RunRecord | None:
        with self._io("load", run_id):
            return self._read_visible(run_id)

    def _lease(self, run_id: str) -> Lease | None:
        with self._io("lease", run_id):
            run = self._read_visible(run_id)
            return None if run is None else self._live_lease(run, self._read_lease(run_id))

    def _claim(
        self, run_id: str, owner: Owner | None, lease_seconds: float, pause_seq: int | None
    ) -> RunRecord | None:
        with self._io("claim", run_id), self._fs.locked(run_id):
            run = self._read_live(run_id)
            if run is None or run.ended:
                return None
            if pause_seq is not None and run.pause_seq != pause_seq:
                return None
            if self._live_lease(run, self._read_lease_tolerant(run_id, run)) is not None:
                return None
            now = utcnow()
            lease = Lease(
                token=run.last_token + 1,
                owner=owner or process_owner()[0],
                claimed_at=now,
                expires_at=now + timedelta(seconds=lease_seconds),
            )
            # The lease is not fsynced: it only matters while its holder lives,
            # and a power cut kills every holder on this machine. A lease lost
            # that way leaves the run PAUSED with its request pending (it runs
            # again, as a recovered run would); a torn one is moved aside and
            # the run re-armed past its token. Either way nothing is lost.
            self._fs.write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            # The pending entry stays: if this lease is lost to a power cut, the
            # request must still be found and re-sent.
            run.lease = lease
            return run

    def _request_resume(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        with self._io("request_resume", run_id), self._fs.locked(run_id):
            return self._resume_locked(run_id, request, pause_seq)

    def _resume_locked(
        self, run_id: str, request: ResumeRequest, pause_seq: int | None
    ) -> ResumeRequest:
        """request_resume with the run's lock held (answer_key shares it)."""
        request_id = request.request_id
        fs = self._fs
        run = self._read_live(run_id)
        if run is None:
            ended = self._read_ended(run_id, tolerant=True)
            if ended is None:
                raise CheckpointNotFound(run_id)
            done = ended.resume if ended.status == "completed" else None
            if done is not None and done.request_id == request_id:
                return done  # the same resume again, after it ran to completion
            raise ended.ended_error()
        if pause_seq is not None and pause_seq != run.pause_seq:
            raise ResumeRejected(
                run_id,
                f"the resume aims at pause {pause_seq} but the run is at pause "
                f"{run.pause_seq} (step {run.step!r})",
            )
        pending = run.current_resume
        if pending is not None and pending.request_id == request_id:
            return pending
        # Past the deadline of an expiring pause only the timer's own request
        # gets in: any other answer is too late, whatever else it would meet.
        deadline = run.expires_at
        if (
            not request.timed_out
            and run.on_timeout == "expire"
            and deadline is not None
            and utcnow() >= deadline
        ):
            raise PauseExpired(
                f"run {run_id!r} stopped waiting at step {run.step!r} at "
                f"{deadline.isoformat()}: the answer came too late"
            )
        # In flight with no request of this pause (a timeout or a redelivery
        # claimed it): accepting would be lost when the holder completes.
        live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
        if pending is not None and (pending.status == "pending" or live is not None):
            raise AlreadyResumed(run_id, pending.request_id)
        if live is not None:
            raise AlreadyResumed(run_id, f"<none: in flight under token {live.token}>")
        request = request.model_copy(update={"pause_seq": run.pause_seq})
        run.resume = request
        # The entry first: a request on the record with no entry would never
        # be re-sent; an entry with no request is dropped by due_resumes.
        fs.touch("pending", run_id, time.time(), durable=True)
        fs.write("paused", run_id, run.to_json())
        return request

    def _heartbeat(self, run_id: str, token: int, lease_seconds: float) -> Lease:
        with self._io("heartbeat", run_id), self._fs.locked(run_id):
            lease = self._live_lease(self._read_live(run_id), self._read_lease(run_id))
            if lease is None or lease.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            lease = lease.model_copy(
                update={"expires_at": utcnow() + timedelta(seconds=lease_seconds)}
            )
            self._fs.write("inflight", run_id, lease.model_dump_json().encode(), durable=False)
            return lease

    def _complete(self, run_id: str, token: int | None, result: str | None = None) -> None:
        fs = self._fs
        with self._io("complete", run_id), fs.locked(run_id):
            run = self._read_live(run_id, tolerant=True)
            lease = self._read_lease_tolerant(run_id, run)
            live = self._live_lease(run, lease)
            if token is not None:
                if live is None:
                    self._check_ended_lease(run_id, run, token)
                    if lease is not None and run is None:
                        fs.unlink("inflight", run_id, sync=False)
                    return  # completed already, or re-paused by this very holder
                if live.token != token:
                    raise LeaseLost(run_id, f"token {token} is not the current lease")
            if run is None or live is None:
                # Not in flight: a paused record (a fresh re-pause) stays as it is.
                if lease is not None:
                    fs.unlink("inflight", run_id, sync=False)
                return
            # The tombstone first and durably: from here on the run has completed
            # (a tombstone wins over a paused record), even after a power cut, so
            # a redelivered message, a late writer and a repeated resume see it.
            run.status = "completed"
            run.lease_ended_by = "complete"
            run.ended_at = utcnow()
            run.result = result
            if result is not None:
                # A result to deliver: its entry leads (an entry without a
                # completed tombstone is dropped by due_deliveries), and the
                # tombstone holding it is written out whole, durably.
                fs.touch("undelivered", run_id, time.time(), durable=True)
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json())
                fs.unlink("paused", run_id, sync=False)
            elif live.token == run.last_token + 1:
                # The paused record's bytes are durable already: moved into ended/
                # they are the tombstone at the cost of one directory fsync, and
                # read as completed by the next token until rewritten just below.
                fs.move("paused", "ended", run_id)
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json(), durable=False)
            else:  # not a lease a claim of this record handed out: spell it all out
                run.last_token = live.token
                fs.write("ended", run_id, run.to_json())
                fs.unlink("paused", run_id, sync=False)
            self._drop_indexes(run_id)
            fs.unlink("inflight", run_id, sync=False)
        if run.key is not None:
            self._release_key(run.key, run_id)

    def _mark_delivered(self, run_id: str) -> None:
        # Under the lock: due_deliveries re-dates entries it found.
        with self._io("mark_delivered", run_id), self._fs.locked(run_id):
            self._fs.unlink("undelivered", run_id, sync=False)

    def _release(self, run_id: str, token: int, error: str | None) -> None:
        fs = self._fs
        with self._io("release", run_id), fs.locked(run_id):
            run = self._read_live(run_id)
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if run is None or live is None or live.token != token:
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            run.last_token = token
            run.lease_ended_by = "release"
            if run.resume is not None:
                run.resume.status = "failed"
                run.resume.error = error
            fs.write("paused", run_id, run.to_json())
            fs.unlink("inflight", run_id, sync=False)  # dead: token <= last_token
            fs.unlink("pending", run_id, sync=False)  # a failed request is not re-sent

    def _end(
        self, run_id: str, status: EndStatus, reason: str | None, token: int | None
    ) -> RunRecord | None:
        fs = self._fs
        with self._io("end", run_id), fs.locked(run_id):
            run = self._read_live(run_id)
            if run is None:
                return None
            live = self._live_lease(run, self._read_lease_tolerant(run_id, run))
            if token is not None and (live is None or live.token != token):
                raise LeaseLost(run_id, f"token {token} is not the current lease")
            if live is not None:
                run.last_token = live.token  # fence the holder
            run.lease_ended_by = "cancel"
            run.status = status
            run.ended_reason = reason
            run.ended_at = utcnow()
            # The tombstone first and durably; what it supersedes goes after.
            fs.write("ended", run_id, run.to_json())
            fs.unlink("paused", run_id, sync=False)
            self._drop_indexes(run_id)
            fs.unlink("inflight", run_id, sync=False)
        if run.key is not None:
            self._release_key(run.key, run_id)
        return run

    def _ended(self, run_id: str) -> RunRecord | None:
        with self._io("ended", run_id):
            return self._read_ended(run_id)
