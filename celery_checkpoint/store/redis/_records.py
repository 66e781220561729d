"""How one run lives in Redis: its keys, the call of one transition script,
parsing (or moving aside) its hash, and the check of a business key's binding
that every step on a key ends with."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
from typing import Any, cast

from pydantic import ValidationError

from ...exceptions import CheckpointExists, CorruptCheckpoint, LeaseLost, StoreUnavailable
from ...model import RunRecord, corrupt_detail
from ._codec import group_of, not_a_hash, overlay, split, text, wrong_type
from ._connection import Connection

__all__ = ["Records"]

logger = logging.getLogger("celery_checkpoint.store.redis")


class Records:
    """Per-run helpers shared by the Redis store's transitions, key steps and sweeps."""

    _conn: Connection
    _groups: builtins.list[str]

    def _group(self, run_id: str) -> str:
        """The key base of the run's group (its hash tag)."""
        return self._groups[group_of(run_id)]

    def _run(self, script: str, action: str, run_id: str, *args: Any) -> builtins.list[Any]:
        """One transition: one script, one round trip, never retried."""
        group = self._group(run_id)
        try:
            result = self._conn.evalsha(script, f"{group}run:{run_id}", run_id, group, *args)
        except self._conn.errors as exc:
            if wrong_type(exc):
                raise not_a_hash(run_id) from exc
            raise self._conn.unavailable(action, run_id, exc) from exc
        result[0] = text(result[0])
        return result

    def _key_run(self, script: str, action: str, key: str, *args: Any) -> builtins.list[Any]:
        """One step on a business key's hash: one script in the key's own group."""
        group = self._groups[group_of(key)]
        try:
            result = self._conn.evalsha(script, f"{group}key:{key}", key, group, *args)
        except self._conn.errors as exc:
            raise self._conn.unavailable(f"{action} of key {key!r}", "*", exc) from exc
        result[0] = text(result[0])
        return result

    def _verify_key(self, key: str, run_id: str, nonce: str, prev: str) -> str:
        """Settle the key's binding to ``run_id`` under ``nonce`` by what the run's
        record says (step one: ``key_check`` in the run's group, which fences the
        nonce unless the record carries it; step two: ``key_settle`` in the key's
        group). Returns the verdict: 'current', 'prev' or 'gone'."""
        verdict, written = self._run("key_check", "key check", run_id, key, nonce, prev)
        self._settle(key, run_id, nonce, text(verdict), text(written))
        return text(verdict)

    def _settle(self, key: str, run_id: str, nonce: str, verdict: str, written: str) -> None:
        self._key_run("key_settle", "key check", key, run_id, nonce, verdict, written)

    def _release_key(self, run_id: str, key: str, nonce: str) -> None:
        """The run's record no longer names ``key`` under ``nonce`` (it ended, or
        names another key): unbind the key. Not raised if it fails: a binding
        whose run does not hold the key is settled by the next look at the key."""
        try:
            self._verify_key(key, run_id, nonce, "")
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to release later: %s", run_id, key, exc)

    def _key(self, run_id: str, suffix: str = "") -> str:
        """A key of the run: its hash (no suffix), ``/ended``, ``/corrupt``..."""
        return f"{self._group(run_id)}run:{run_id}{suffix}"

    @staticmethod
    def _save_refused(run_id: str, token: int | None, result: builtins.list[Any]) -> None:
        """Raise the contract's error for a save the script refused (nothing saved)."""
        if result[0] == "lost":
            raise LeaseLost(run_id, f"token {token} is not the current lease")
        if result[0] == "exists":
            raise CheckpointExists(run_id, text(result[1]))
        if result[0] == "inflight":
            raise LeaseLost(
                run_id, f"the run is in flight under token {int(result[1])}; save with it"
            )

    def _record(self, run_id: str, body: bytes | str, ctl: dict[str, str]) -> RunRecord:
        try:
            run = RunRecord.from_json(body)
            overlay(run, ctl)
        except (ValidationError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(run_id, corrupt_detail(exc, body)) from exc
        if run.run_id != run_id:
            raise CorruptCheckpoint(run_id, f"record names run {run.run_id!r}")
        return run

    def _read_run(
        self, action: str, run_id: str, *, ended: bool = False
    ) -> tuple[bytes | None, dict[str, str]]:
        """The run's record JSON (None if there is no run) and its other fields."""
        key = self._key(run_id, "/ended" if ended else "")
        try:
            raw = self._conn.read(action, run_id, lambda: self._conn.client.hgetall(key))
        except StoreUnavailable as exc:
            if wrong_type(exc.cause):
                raise not_a_hash(run_id) from exc
            raise
        return split(cast("dict[Any, Any]", raw).items())

    def _raw_value(self, run_id: str) -> bytes:
        """What a key that is not a run hash holds, if a string (to move it aside)."""
        with contextlib.suppress(Exception):
            value = self._conn.client.get(self._key(run_id))
            if isinstance(value, bytes):
                return value
        return b""

    def _quarantine(self, run_id: str, body: bytes | str, exc: CorruptCheckpoint) -> None:
        """Move a corrupt run aside to ``.../corrupt`` (``/corrupt.1``... if taken),
        unless it changed meanwhile."""
        data = body.encode() if isinstance(body, str) else body
        try:
            result = self._run("quarantine", "quarantine", run_id, hashlib.sha1(data).hexdigest())
        except StoreUnavailable as err:
            logger.warning("could not move corrupt checkpoint %s aside: %s", run_id, err)
            return
        if result[0] == "ok":
            logger.warning("moved corrupt checkpoint aside to %s: %s", text(result[1]), exc)
