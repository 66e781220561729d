"""Moving runs between stores, in the Redis store: a run restored as it was (a
paused one naming a key binds it as a save does), and every tombstone read back."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator
from typing import Any, cast

from ...exceptions import CorruptCheckpoint, StoreUnavailable
from ...model import RunRecord
from ._codec import not_a_hash, restore_args, split, text, valid, wrong_type
from ._keys import KEY_ATTEMPTS, Keys
from ._sweeps import PAGE

__all__ = ["Moving"]

logger = logging.getLogger("celery_checkpoint.store.redis")


class Moving(Keys):
    """``restore`` and ``iter_ended``: what ``celery checkpoint migrate`` moves runs with."""

    def _restore(self, run: RunRecord) -> bool:
        if run.lease is not None:
            raise ValueError(f"run {run.run_id!r} is in flight: only paused and ended runs move")
        run_id = run.run_id
        if run.ended or run.key is None:
            result = self._run("restore", "restore", *restore_args(run, None))
            return bool(result[0] == "ok")
        key = run.key
        if self._exists(run_id):
            return False
        for _ in range(KEY_ATTEMPTS):
            bound = self._bind(key, run_id, False, "")
            if bound is None:
                continue
            nonce, since, _, prev = bound
            try:
                result = self._run("restore", "restore", *restore_args(run, (key, nonce, since)))
            except StoreUnavailable:
                if prev is not None:
                    self._settle_quietly(key, run_id, nonce, prev)
                raise
            if result[0] == "fenced":
                if prev is not None:
                    self._verify_key(key, run_id, nonce, prev)
                continue
            if prev is not None:
                if result[0] == "ok":
                    self._settle_written(key, run_id, nonce)
                else:
                    self._settle_quietly(key, run_id, nonce, prev)
            return bool(result[0] == "ok")
        raise StoreUnavailable(
            f"checkpoint store {self._conn.display}: restore of run {run_id!r}: key {key!r} "
            f"stayed contended through {KEY_ATTEMPTS} attempts; nothing was restored"
        )

    def _iter_ended(self) -> Iterator[RunRecord]:
        """Each group's ended index, paged with ``ZSCAN``; the tombstones read in a
        pipeline per page."""
        for group in self._groups:
            seen: set[str] = set()
            cursor = 0

            def scan() -> tuple[int, builtins.list[tuple[bytes, float]]]:
                page: tuple[int, builtins.list[tuple[bytes, float]]]
                page = self._conn.client.zscan(group + "ended", cursor, count=PAGE)  # noqa: B023
                return page

            while True:
                cursor, page = self._conn.read("iter_ended", "*", scan)
                batch = {
                    text(m): score for m, score in page if valid(text(m)) and text(m) not in seen
                }
                seen.update(batch)
                if batch:
                    yield from self._ended_batch(group, batch)
                if int(cursor) == 0:
                    break

    def _ended_batch(self, group: str, batch: dict[str, float]) -> Iterator[RunRecord]:
        """The tombstones of ``batch`` (run id -> when it ended, server ms)."""

        def do() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for run_id in batch:
                pipe.hgetall(f"{group}run:{run_id}/ended")
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        for run_id, raw in zip(list(batch), self._conn.read("iter_ended", "*", do), strict=True):
            if isinstance(raw, Exception):
                if wrong_type(raw):
                    logger.warning("skipping corrupt tombstone: %s", not_a_hash(run_id))
                    continue
                raise self._conn.unavailable("iter_ended", run_id, raw)
            body, ctl = split(cast("dict[Any, Any]", raw).items())
            if body is None:
                continue  # pruned, or replaced by a new run, while we read
            if "ended_at" not in ctl:  # ended under an older version: the index says when
                ctl["ended_at"] = str(round(batch[run_id]) * 1000)
            try:
                yield self._record(run_id, body, ctl)
            except CorruptCheckpoint as exc:
                logger.warning("skipping corrupt tombstone: %s", exc)
