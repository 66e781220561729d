"""Moving runs between stores, in the file store: a run restored as it was, and
every tombstone read back."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from ...exceptions import CheckpointExists, CorruptCheckpoint
from ...model import RunRecord, utcnow, validate_run_id
from ._fs import key_name
from ._records import Records

__all__ = ["Moving"]

logger = logging.getLogger("celery_checkpoint.store.file")


class Moving(Records):
    """``restore`` and ``iter_ended``: what ``celery checkpoint migrate`` moves runs with."""

    def _restore(self, run: RunRecord) -> bool:
        if run.lease is not None:
            raise ValueError(f"run {run.run_id!r} is in flight: only paused and ended runs move")
        run_id, fs = run.run_id, self._fs
        key = None if run.ended else run.key
        with self._io("restore", run_id), fs.locked_all((run_id,), () if key is None else (key,)):
            if fs.exists("paused", run_id) or fs.exists("ended", run_id):
                return False
            record = run.model_copy()
            fs.unlink("inflight", run_id, sync=False)  # a marker with no record is dead
            if record.ended:
                ended_at = record.ended_at or utcnow()
                record.ended_at = ended_at
                # Dated when it ended: prune_ended goes by the file's time.
                fs.write("ended", run_id, record.to_json(), mtime=ended_at.timestamp())
                return True
            if key is not None:
                holder = self._key_holder(key)
                if holder is not None and holder != run_id and self._holds(holder, key):
                    raise CheckpointExists(run_id, f"key {key!r} is held by run {holder!r}")
                if holder != run_id:
                    fs.write("keys", key_name(key), run_id.encode())
            self._indexes_before(record)
            fs.write("paused", run_id, record.to_json())
            self._indexes_after(record)
            return True

    def _iter_ended(self) -> Iterator[RunRecord]:
        with self._io("iter_ended", "*"):
            for run_id in self._fs.names("ended"):
                try:
                    run = self._read_ended(validate_run_id(run_id))
                except ValueError:
                    continue  # not one of ours
                except CorruptCheckpoint as exc:
                    logger.warning("skipping corrupt tombstone: %s", exc)
                    continue
                if run is not None:
                    yield run
