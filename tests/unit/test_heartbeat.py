"""The shared heartbeat thread keeps leases alive, and lets them lapse once stopped."""

from __future__ import annotations

import time
from pathlib import Path

from celery_checkpoint import CheckpointStore, PausedWorkflow
from celery_checkpoint._heartbeat import heartbeats


def test_heartbeats_keep_many_leases_alive_and_stop_per_lease(tmp_path: Path) -> None:
    store = CheckpointStore.open(tmp_path / "store")
    beats = {}
    for name in ("a", "b", "c"):
        store.save(PausedWorkflow(run_id=name, task_name="t", step="s"))
        run = store.claim(name, lease_seconds=0.6)
        assert run is not None and run.lease is not None
        beats[name] = heartbeats.start(
            store, name, run.lease.token, lease_seconds=0.6, interval=0.1
        )
    time.sleep(1.5)  # well past the lease: only heartbeats keep them alive
    assert store.recover_orphaned() == []
    beats["b"].stop()
    time.sleep(1.0)
    assert [run.run_id for run in store.recover_orphaned()] == ["b"]
    for beat in beats.values():
        beat.stop()


def test_a_lost_lease_is_reported_and_no_longer_renewed(tmp_path: Path) -> None:
    store = CheckpointStore.open(tmp_path / "store")
    store.save(PausedWorkflow(run_id="gone", task_name="t", step="s"))
    run = store.claim("gone", lease_seconds=5)
    assert run is not None and run.lease is not None
    beat = heartbeats.start(store, "gone", run.lease.token, lease_seconds=5, interval=0.05)
    store.cancel("gone")
    deadline = time.monotonic() + 5
    while beat.lost is None:
        assert time.monotonic() < deadline, "the lost lease was never noticed"
        time.sleep(0.02)
    beat.stop()
