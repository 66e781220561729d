"""Passes over many runs of the Redis store: recovery, listing, counts and the
index sweeps. Each reads its group indexes (16 groups, one hash tag each) and
never the keyspace (no ``KEYS``, no ``SCAN``)."""

from __future__ import annotations

import builtins
import functools
import logging
import socket
from collections.abc import Iterator
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError

from ...exceptions import CorruptCheckpoint
from ...model import Owner, RunRecord
from ..base import RunFilter, RunInfo, StoreStats, make_stats
from ._codec import (
    from_us,
    lease_from,
    not_a_hash,
    split,
    split_flat,
    text,
    us,
    valid,
    wrong_type,
)
from ._keys import Keys

__all__ = ["PAGE", "Sweeps"]

logger = logging.getLogger("celery_checkpoint.store.redis")

PAGE = 100  # runs read per round trip by list() and iter_ended()
_DUE_BATCH = 500  # index entries examined per script run by the due and prune passes


class Sweeps(Keys):
    """The store's passes over its group indexes; see the module docstring."""

    def _recover_orphaned(self) -> builtins.list[RunRecord]:
        recovered: builtins.list[RunRecord] = []
        host = socket.gethostname()
        for group in self._groups:
            self._recover_group(group, host, recovered)
        return recovered

    def _recover_group(self, group: str, host: str, recovered: builtins.list[RunRecord]) -> None:
        """Re-arm the group's runs whose lease expired or whose owner on this host died."""
        expired = self._conn.read(
            "recover_orphaned",
            "*",
            lambda: self._conn.scripts["due"](keys=[group + "inflight"], args=["", "ms"]),
        )
        seen: set[str] = set()
        for raw in expired:
            run_id = text(raw)
            seen.add(run_id)
            self._rearm(run_id, "expired", "", "", recovered)
        members: set[Any] = self._conn.read(
            "recover_orphaned", "*", lambda: self._conn.client.smembers(f"{group}owners:{host}")
        )
        ours = sorted(run_id for run_id in ({text(m) for m in members} - seen) if valid(run_id))
        if not ours:
            return

        def leases() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for run_id in ours:
                pipe.hmget(f"{group}run:{run_id}", "lease_token", "lease_owner")
            # A key of the wrong type is one corrupt run (_rearm moves it aside).
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        for run_id, reply in zip(
            ours, self._conn.read("recover_orphaned", "*", leases), strict=True
        ):
            if isinstance(reply, Exception):
                if not wrong_type(reply):
                    raise self._conn.unavailable("recover_orphaned", run_id, reply)
                self._rearm(run_id, "dead", "", host, recovered)
                continue
            token, owner_json = reply
            if token is None:
                self._rearm(run_id, "dead", "", host, recovered)  # drops the stale entry
                continue
            try:
                dead = Owner.model_validate_json(owner_json).is_dead_here()
            except (ValidationError, ValueError):
                dead = False
            if dead:
                self._rearm(run_id, "dead", int(token), host, recovered)

    def _rearm(
        self,
        run_id: str,
        mode: str,
        token: int | str,
        host: str,
        recovered: builtins.list[RunRecord],
    ) -> None:
        if not valid(run_id):
            return
        try:
            result = self._run("rearm", "recover_orphaned", run_id, mode, token, host)
        except CorruptCheckpoint as exc:  # its key is not a run hash
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, self._raw_value(run_id), exc)
            return
        if result[0] != "ok":
            return
        body, fields = split_flat(result[1])
        assert body is not None  # the script re-arms only a run with a record
        try:
            run = self._record(run_id, body, fields)
        except CorruptCheckpoint as exc:
            logger.warning("skipping corrupt checkpoint during recovery: %s", exc)
            self._quarantine(run_id, body, exc)
            return
        logger.info("re-armed orphaned run %s (recovery %d)", run_id, run.recoveries)
        recovered.append(run)

    def _list(self, where: RunFilter) -> Iterator[RunInfo]:
        cutoff = where.cutoff
        cutoff_us = None if cutoff is None else us(cutoff)
        for group in self._groups:
            seen: set[str] = set()  # ZSCAN may return a member twice while the set rehashes
            cursor = 0

            def scan() -> tuple[int, builtins.list[tuple[bytes, float]]]:
                page: tuple[int, builtins.list[tuple[bytes, float]]]
                page = self._conn.client.zscan(group + "paused", cursor, count=PAGE)  # noqa: B023
                return page

            while True:
                cursor, page = self._conn.read("list", "*", scan)
                batch: builtins.list[str] = []
                for member, score in page:
                    run_id = text(member)
                    if run_id in seen or not valid(run_id):
                        continue
                    seen.add(run_id)
                    if cutoff_us is not None and score > cutoff_us:
                        continue
                    batch.append(run_id)
                yield from self._list_batch(group, batch, where, cutoff)
                if int(cursor) == 0:
                    break

    def _list_batch(
        self,
        group: str,
        batch: builtins.list[str],
        where: RunFilter,
        cutoff: datetime | None,
    ) -> Iterator[RunInfo]:
        if not batch:
            return

        def do() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for run_id in batch:
                pipe.hgetall(f"{group}run:{run_id}")
            # A key of the wrong type is one corrupt run, not a failed listing.
            result: builtins.list[Any] = pipe.execute(raise_on_error=False)
            return result

        reply = self._conn.read("list", "*", do)
        for run_id, raw in zip(batch, reply, strict=True):
            if isinstance(raw, Exception) and wrong_type(raw):
                wrong = not_a_hash(run_id)
                logger.warning("skipping corrupt checkpoint while listing: %s", wrong)
                self._quarantine(run_id, self._raw_value(run_id), wrong)
                continue
            if isinstance(raw, Exception):
                raise self._conn.unavailable("list", run_id, raw)
            body, ctl = split(cast("dict[Any, Any]", raw).items())
            if body is None:
                continue  # completed or cancelled while we listed
            try:
                run = self._record(run_id, body, ctl)
                lease = None
                if "lease_token" in ctl and int(ctl["lease_token"]) > run.last_token:
                    lease = lease_from(ctl)
            except (CorruptCheckpoint, ValidationError, ValueError, KeyError) as exc:
                err = (
                    exc
                    if isinstance(exc, CorruptCheckpoint)
                    else CorruptCheckpoint(run_id, f"lease: {exc}")
                )
                logger.warning("skipping corrupt checkpoint while listing: %s", err)
                self._quarantine(run_id, body, err)
                continue
            if where.matches(run, cutoff):
                yield RunInfo(run=run, lease=lease)

    def _count(self) -> int:
        def do() -> int:
            pipe = self._conn.client.pipeline(transaction=False)
            for group in self._groups:
                pipe.zcard(group + "paused")
            return sum(int(n) for n in pipe.execute())

        return self._conn.read("count", "*", do)

    def _stats(self) -> StoreStats:
        """Counted from the indexes, one small script per group: cheap with any number of runs."""
        totals = [0, 0, 0, 0]
        for group in self._groups:
            keys = [group + name for name in ("paused", "inflight", "pending", "deadlines")]
            stats = functools.partial(self._conn.scripts["stats"], keys)
            counts = self._conn.read("stats", "*", stats)
            totals = [total + int(n) for total, n in zip(totals, counts, strict=True)]
        return make_stats(*totals)

    def _due_resumes(self, older_than: float) -> builtins.list[str]:
        return self._due_pass("due_resumes", "pending", older_than)

    def _due_deliveries(self, older_than: float) -> builtins.list[str]:
        return self._due_pass("due_deliveries", "undelivered", older_than)

    def _due_pass(self, script: str, index: str, older_than: float) -> builtins.list[str]:
        """Ids of each group's ``index`` last marked over ``older_than`` seconds ago,
        each marked now by ``script`` (batches of one script run each)."""
        due: builtins.list[str] = []
        for group in self._groups:
            bound: int | str = ""
            while True:
                with self._conn.io(script, "*"):
                    now, used, examined, ids = self._conn.scripts[script](
                        keys=[group + index],
                        args=[bound, round(older_than * 1_000_000), _DUE_BATCH, group + "run:"],
                    )
                due.extend(text(run_id) for run_id in ids)
                if int(examined) < _DUE_BATCH:
                    break
                if bound == "":
                    # Later batches stay below the first one's time (server us), so a
                    # request marked sent by this sweep is never examined again by it.
                    bound = min(int(used), int(now) - 1)
        return [run_id for run_id in due if valid(run_id)]

    def _prune_ended(self, older_than: float) -> int:
        pruned = 0
        for group in self._groups:
            while True:
                # Each batch is one script: a lost reply leaves it applied whole or
                # not at all, and running it again is harmless.
                with self._conn.io("prune_ended", "*"):
                    n = int(
                        self._conn.scripts["prune"](
                            keys=[group + "ended"],
                            args=[
                                round(older_than * 1000),
                                _DUE_BATCH,
                                group + "run:",
                                group + "undelivered",
                            ],
                        )
                    )
                pruned += n
                if n < _DUE_BATCH:
                    break
        self._prune_keys()
        return pruned

    def _due_timeouts(self, now: datetime | None) -> builtins.list[str]:
        bound = "" if now is None else us(now)
        ids: builtins.list[Any] = []
        for group in self._groups:
            due = functools.partial(self._conn.scripts["due"], [group + "deadlines"], [bound, "us"])
            ids += self._conn.read("due_timeouts", "*", due)
        return [run_id for run_id in (text(raw) for raw in ids) if valid(run_id)]

    def _next_deadline(self) -> datetime | None:
        """The lowest score of the groups' deadline indexes: one ``ZRANGE 0 0`` per
        group, in one pipeline."""

        def do() -> builtins.list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for group in self._groups:
                pipe.zrange(group + "deadlines", 0, 0, withscores=True)
            result: builtins.list[Any] = pipe.execute()
            return result

        firsts = self._conn.read("next_deadline", "*", do)
        scores = [int(score) for first in firsts for _, score in first]
        return from_us(min(scores)) if scores else None
