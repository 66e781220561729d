"""Business keys in the Redis store: a pause binding its key, the binding settled,
an answer by key, and the prune of what a step cut short leaves. The steps, and
why a pause and an answer that race happen in exactly one order, are in
"Business keys" in the package docstring."""

from __future__ import annotations

import builtins
import logging
import uuid
from typing import Any

from pydantic import ValidationError

from ...exceptions import AlreadyResumed, CheckpointExists, CorruptCheckpoint, StoreUnavailable
from ...model import ResumeRequest, RunRecord
from ._codec import group_of, save_args, text, us
from ._transitions import Transitions

__all__ = ["KEY_ATTEMPTS", "Keys"]

logger = logging.getLogger("celery_checkpoint.store.redis")

#: How many times a keyed save, a restore or an answer by key binds again when
#: it finds its binding settled by another caller meanwhile.
KEY_ATTEMPTS = 50
_PRUNE_BATCH = 500  # early answers examined per script run by the prune
#: A key binding unsettled this long (server ms) is a save cut short: prune settles it.
_UNSETTLED_MS = 60_000
#: How long the nonces a key check fenced or found written are kept (server ms);
#: a save refuses a binding older than an hour, so none asks after that.
_NONCES_MS = 86_400_000


class Keys(Transitions):
    """The steps on business keys, each one script in the key's group or the run's."""

    def _save_keyed(
        self, paused: RunRecord, key: str, token: int | None, create: bool
    ) -> ResumeRequest | None:
        """A pause naming a business key: bind the key to the run in the key's
        group, write the record in the run's, then settle the binding. See
        "Business keys" in the package docstring."""
        run_id = paused.run_id
        current = paused.current_resume
        consume = current is None or current.status != "pending"
        deadline = ""
        if paused.on_timeout == "expire" and paused.expires_at is not None:
            deadline = str(us(paused.expires_at))  # too late then for any answer
        for _ in range(KEY_ATTEMPTS):
            bound = self._bind(key, run_id, consume, deadline)
            if bound is None:
                continue  # a binding was settled first: bind again
            nonce, since, early, prev = bound
            answer = None
            if early is not None:
                try:
                    answer = ResumeRequest.model_validate_json(early).model_copy(
                        update={"pause_seq": paused.pause_seq, "status": "pending", "error": None}
                    )
                except (ValidationError, ValueError) as exc:
                    self._settle_quietly(key, run_id, nonce, prev or "")
                    raise CorruptCheckpoint(run_id, f"early answer of key {key!r}: {exc}") from exc
            resume = paused.resume if answer is None else answer
            binding = (key, nonce, since, answer is not None)
            try:
                result = self._run(
                    "save", "save", *save_args(paused, token, create, resume, binding)
                )
            except StoreUnavailable:
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)
                raise
            if result[0] == "fenced":
                if prev is not None:
                    self._verify_key(key, run_id, nonce, prev)
                continue  # the binding was found stale meanwhile: bind again
            if result[0] != "ok":
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)  # undo the binding
                self._save_refused(run_id, token, result)
            if prev is not None:
                self._settle_written(key, run_id, nonce)
            self._release_replaced(run_id, result, key, (nonce, prev))
            return answer
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: save of run {run_id!r}: key {key!r} "
            f"stayed contended through {KEY_ATTEMPTS} attempts; nothing was saved"
        )

    def _bind(
        self, key: str, run_id: str, consume: bool, deadline: str
    ) -> tuple[str, int, bytes | None, str | None] | None:
        """Bind ``key`` to the run (step one of a keyed save): (nonce, the binding's
        time, the early answer reserved, the previous nonce -- None if the run
        held the key already and takes nothing, so there is nothing to settle).
        None: another binding was checked and settled first; call again.
        ``CheckpointExists`` if another live run holds the key."""
        nonce = uuid.uuid4().hex
        result = self._key_run(
            "key_bind", "save", key, run_id, nonce, "1" if consume else "", deadline
        )
        if result[0] == "keep":
            return text(result[1]), int(result[2]), None, None
        if result[0] == "bound":
            early: bytes | None = result[2]
            return nonce, int(result[1]), early, text(result[3])
        holder, nonce, prev = text(result[1]), text(result[2]), text(result[3])
        verdict = self._verify_key(key, holder, nonce, prev)
        if holder != run_id and verdict in ("current", "prev"):
            raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
        return None

    def _settle_written(self, key: str, run_id: str, nonce: str) -> None:
        """The record carrying ``nonce`` is written: the binding is settled. Not
        raised if it fails (the save is done): the next look at the key settles it."""
        try:
            self._settle(key, run_id, nonce, "current", "1")
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to settle later: %s", run_id, key, exc)

    def _settle_quietly(self, key: str, run_id: str, nonce: str, prev: str) -> None:
        """:meth:`_verify_key` on the way out of a failed save: not raised (the
        caller raises its own error); the next look at the key settles it."""
        try:
            self._verify_key(key, run_id, nonce, prev)
        except StoreUnavailable as exc:
            logger.warning("run %s: key %r left to settle later: %s", run_id, key, exc)

    def _release_replaced(
        self,
        run_id: str,
        result: builtins.list[Any],
        key: str | None,
        nonces: tuple[str, str | None] | None,
    ) -> None:
        """After a save: the key the replaced record named is released if the new
        record does not hold it under the same binding."""
        if len(result) < 3 or result[1] is None:
            return
        old_key, old_nonce = text(result[1]), text(result[2] or b"")
        if old_key == key and nonces is not None and old_nonce in nonces:
            return  # the same key, the same binding (or its predecessor, now settled)
        self._release_key(run_id, old_key, old_nonce)

    def _find_key(self, key: str) -> str | None:
        group = self._groups[group_of(key)]
        binding = self._conn.read(
            "find_key",
            "*",
            lambda: self._conn.client.hmget(f"{group}key:{key}", "run", "nonce", "prev"),
        )
        if binding[0] is None:
            return None
        run_id = text(binding[0])
        nonces = {text(n) for n in binding[1:] if n is not None}
        named = self._conn.read(
            "find_key",
            run_id,
            lambda: self._conn.client.hmget(self._key(run_id), "key", "key_nonce"),
        )
        if named[0] is None or text(named[0]) != key or text(named[1] or b"") not in nonces:
            return None  # a binding not settled yet, or left by a run that moved on
        return run_id

    def _answer_key(
        self, key: str, request: ResumeRequest, ttl: float
    ) -> tuple[str | None, ResumeRequest]:
        for _ in range(KEY_ATTEMPTS):
            result = self._key_run(
                "key_answer",
                "answer_key",
                key,
                request.request_id,
                request.model_dump_json(),
                round(ttl * 1_000_000),
            )
            status = result[0]
            if status == "stored":
                return None, request
            if status == "already":
                raise AlreadyResumed(key, text(result[1]), key=True)
            if status == "kept":
                try:
                    return None, ResumeRequest.model_validate_json(result[1])
                except (ValidationError, ValueError) as exc:
                    raise CorruptCheckpoint(key, f"early answer: {exc}") from exc
            run_id, nonce, prev, unsettled = (
                text(result[1]),
                text(result[2]),
                text(result[3]),
                result[4],
            )
            if int(unsettled):
                # A save of the key between its two steps (or killed there): settle it
                # by the run's record first; a save still running binds again.
                self._verify_key(key, run_id, nonce, prev)
                continue
            accepted = self._resume(run_id, request, None, (key, nonce))
            if accepted is not None:
                return run_id, accepted
            # The run no longer holds the key (it ended; its release is still to come).
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: answer_key of key {key!r} stayed "
            f"contended through {KEY_ATTEMPTS} attempts; no answer was recorded"
        )

    def _prune_keys(self) -> None:
        """Expired early answers go; bindings left unsettled for a minute (a save
        killed between its steps) are settled; then the nonces recorded by the key
        checks are forgotten after a day. In that order: a nonce is forgotten only
        once no binding can still ask about it."""
        for group in self._groups:
            offset = 0  # past the answers a batch left (reserved by a save)
            while True:
                with self._conn.io("prune_ended", "*"):
                    examined, left = self._conn.scripts["prune_early"](
                        keys=[group + "early"], args=[_PRUNE_BATCH, group + "key:", offset]
                    )
                offset += int(left)
                if int(examined) < _PRUNE_BATCH:
                    break
        for group in self._groups:
            with self._conn.io("prune_ended", "*"):
                stuck = self._conn.scripts["older"](
                    keys=[group + "unsettled"], args=[_UNSETTLED_MS, "list"]
                )
            for raw in stuck:
                self._settle_stuck(text(raw))
        for group in self._groups:
            with self._conn.io("prune_ended", "*"):
                self._conn.scripts["older"](keys=[group + "nonces"], args=[_NONCES_MS, "remove"])

    def _settle_stuck(self, key: str) -> None:
        group = self._groups[group_of(key)]
        binding = self._conn.read(
            "prune_ended",
            "*",
            lambda: self._conn.client.hmget(f"{group}key:{key}", "run", "nonce", "prev", "since"),
        )
        run_id, nonce, prev, since = (None if v is None else text(v) for v in binding)
        if run_id is None or nonce is None or since is None:
            return  # settled meanwhile (which drops the index entry too)
        self._verify_key(key, run_id, nonce, prev or "")
