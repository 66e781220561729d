"""Business keys in the file store: the key's part of a pause, an answer by key,
and the answers kept for a key before its pause (``early/<key>.json``). See the
package docstring for how a key entry and an early answer survive a crash."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from pydantic import ValidationError

from ...exceptions import AlreadyResumed, CheckpointExists
from ...model import ResumeRequest, RunRecord, utcnow
from ._fs import key_name
from ._transitions import Transitions

__all__ = ["EARLY_FIELD", "Early", "Keys"]

logger = logging.getLogger("celery_checkpoint.store.file")

#: The field under which a record being written over an early answer carries
#: that answer (see :meth:`Keys._read_early`). Records ignore unknown fields.
EARLY_FIELD = "_early_answer"


@dataclass(frozen=True)
class Early:
    """An answer kept for a business key before a pause named it."""

    request: ResumeRequest
    expires: float  #: epoch seconds
    raw: bytes  #: the file as stored


def early_bytes(key: str, request: ResumeRequest, expires: float) -> bytes:
    body = request.model_dump_json()
    return f'{{"key":{json.dumps(key)},"expires_at":{expires!r},"request":{body}}}'.encode()


class Keys(Transitions):
    """A business key's part of a save, ``find_key``, ``answer_key``; early answers."""

    def _take_key(self, record: RunRecord, key: str) -> Early | None:
        """The key's part of a save, under the run's and the key's locks: refuse a
        key another live run holds, point the key's entry at this run (before the
        record, durably), and pick the early answer this pause consumes, attached
        to ``record`` as its pending request."""
        fs, run_id = self._fs, record.run_id
        holder = self._key_holder(key)
        if holder is not None and holder != run_id and self._holds(holder, key):
            raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
        early = self._read_early(key)
        if early is not None and not self._consumes(record, early):
            early = None
        if holder != run_id:
            fs.write("keys", key_name(key), run_id.encode())
        if early is not None:
            record.resume = early.request.model_copy(
                update={"pause_seq": record.pause_seq, "status": "pending", "error": None}
            )
        return early

    @staticmethod
    def _consumes(record: RunRecord, early: Early) -> bool:
        """Whether the pause takes the early answer: as ``request_resume`` right
        after the save would accept it (no pending request of this pause, the
        deadline of an expiring pause not passed), and the answer is unexpired."""
        now = utcnow()
        if early.expires <= now.timestamp():
            return False
        current = record.current_resume
        if current is not None and current.status == "pending":
            return False
        deadline = record.expires_at
        return not (record.on_timeout == "expire" and deadline is not None and now >= deadline)

    def _find_key(self, key: str) -> str | None:
        with self._io("find_key", key):
            holder = self._key_holder(key)
            return holder if holder is not None and self._holds(holder, key) else None

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        fs = self._fs
        with self._io("answer_key", key):
            while True:
                holder = self._key_holder(key)
                runs = () if holder is None else (holder,)
                # The key's lock and its holder's, in the one order every caller
                # takes them: a save naming the key waits, or has finished.
                with fs.locked_all(runs, (key,)):
                    if self._key_holder(key) != holder:
                        continue  # another run took the key meanwhile: lock that one
                    if holder is not None and self._holds(holder, key):
                        return holder, self._resume_locked(holder, request, None)
                    early = self._read_early(key)
                    now = time.time()
                    if early is not None and early.expires > now:
                        if early.request.request_id == request.request_id:
                            return None, early.request
                        raise AlreadyResumed(key, early.request.request_id, key=True)
                    self._write_early(key, request, now + ttl)
                    return None, request

    def _read_early(self, key: str) -> Early | None:
        """The answer kept for ``key``, expired or not; the caller holds the key's lock.

        A file holding a run's record instead is a save that consumed the
        answer and was killed between its two renames (see ``write_through``):
        the record never reached ``paused/``, so the answer is put back as it was.
        """
        fs, name = self._fs, key_name(key)
        data = fs.read("early", name)
        if data is None:
            return None
        try:
            parsed = json.loads(data)
            if isinstance(parsed, dict) and "run_id" in parsed:
                kept = parsed[EARLY_FIELD]
                data = json.dumps(kept, separators=(",", ":")).encode()
                fs.write("early", name, data, mtime=float(kept["expires_at"]))
                logger.info("key %s: put back the early answer of a save cut short", key)
                parsed = kept
            return Early(
                request=ResumeRequest.model_validate(parsed["request"]),
                expires=float(parsed["expires_at"]),
                raw=data,
            )
        except (ValueError, TypeError, KeyError, ValidationError) as exc:
            fs.move_aside("early", name, f"early answer of key {key!r}: {exc}")
            return None

    def _write_early(self, key: str, request: ResumeRequest, expires: float) -> None:
        """Keep ``request`` for ``key`` until ``expires`` (the file's mtime, for the prune)."""
        self._fs.write("early", key_name(key), early_bytes(key, request, expires), mtime=expires)
