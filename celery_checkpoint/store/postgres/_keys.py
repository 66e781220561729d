"""Business keys in the PostgreSQL store: a pause naming a key, and an answer by
key, each a short transaction under an advisory lock on the key, taken first:
of a racing pause and answer, one sees the other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...exceptions import AlreadyResumed, CheckpointExists, CorruptCheckpoint
from ...model import ResumeRequest, RunRecord
from ._codec import resume_of
from ._transitions import Transitions

if TYPE_CHECKING:
    from psycopg import Connection as PgConnection

__all__ = ["Keys"]


class Keys(Transitions):
    """A pause naming a business key, ``find_key``, ``answer_key``."""

    def _save_keyed(
        self, conn: PgConnection[Any], run: RunRecord, token: int | None, create: bool
    ) -> ResumeRequest | None:
        """A pause naming a business key: unique among live runs, and it takes the
        early answer waiting for the key, in one transaction under the key's lock."""
        key = run.key
        try:
            with conn.transaction():
                conn.execute(self._q["lock_key"], (key,))
                holder = self._one(conn, "key_holder", (key, run.run_id))
                if holder is not None:
                    raise CheckpointExists(run.run_id, f"key {key!r} is held by run {holder[0]!r}")
                self._save_on(conn, run, token, create)
                row = self._one(conn, "consume_early_answer", (key, run.run_id, run.run_id))
        except self._conn.psycopg.errors.UniqueViolation as exc:  # the index, as a backstop
            raise CheckpointExists(run.run_id, f"key {key!r} is held by another run") from exc
        if row is None:
            return None
        try:
            return resume_of(row[0], row[1], "pending", None)
        except ValueError as exc:
            raise CorruptCheckpoint(run.run_id, f"early answer: {exc}") from exc

    def _find_key(self, key: str) -> str | None:
        """The live run holding business key ``key``, if any."""
        row = self._read_one("find_key", "*", "find_key", (key,))
        return None if row is None else str(row[0])

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        """Answer the live run holding ``key``, or keep the answer for the pause that
        will name it (``ttl`` seconds); one transaction under the key's lock."""

        def answer(conn: PgConnection[Any]) -> tuple[str | None, ResumeRequest]:
            with conn.transaction():
                conn.execute(self._q["lock_key"], (key,))
                holder = self._one(conn, "find_key", (key,))
                if holder is not None:
                    run_id = str(holder[0])
                    return run_id, self._request_resume_on(conn, run_id, request, None)
                kept = self._one(conn, "early_answer", (key,))
                if kept is not None:
                    existing = ResumeRequest.model_validate_json(kept[0])
                    if existing.request_id != request.request_id:
                        raise AlreadyResumed(key, existing.request_id, key=True)
                    return None, existing
                conn.execute(
                    self._q["put_early_answer"],
                    (key, request.request_id, request.model_dump_json(), ttl),
                )
                return None, request

        return self._conn.write("answer_key", "*", answer)
