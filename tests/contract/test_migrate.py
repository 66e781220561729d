"""Moving runs between stores: every backend as target (from SQLite, or from the file
store when the target is SQLite) and as source (to SQLite)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner

from celery_checkpoint import CheckpointStore, Owner, RunRecord
from celery_checkpoint.cli import checkpoint
from celery_checkpoint.migrate import migrate
from celery_checkpoint.model import utcnow
from tests.contract.helpers import StoreFactory, make_run


def _fill(store: CheckpointStore) -> dict[str, RunRecord]:
    """Paused runs of every kind, one in flight, and two ended ones."""
    soon = utcnow() + timedelta(hours=1)
    store.save(make_run("plain"))
    store.save(make_run("deadline", expires_at=soon, on_timeout="resume"))
    store.save(make_run("answered"))
    store.request_resume("answered", {"ok": True}, "req-1", actor="ana", via="api")
    store.save(make_run("keyed", key="stripe:pi_9"))
    store.save(make_run("running"))
    assert store.claim("running", owner=Owner.current()) is not None
    store.save(make_run("done"))
    done = store.claim("done")
    assert done is not None and done.lease is not None
    store.complete("done", token=done.lease.token, result='{"total": 3}')
    store.save(make_run("dropped"))
    store.end("dropped", "cancelled", reason="customer asked")
    records = {run_id: store.load(run_id) for run_id in ("plain", "deadline", "answered", "keyed")}
    records.update({run_id: store.ended(run_id) for run_id in ("done", "dropped")})
    assert all(records.values())
    return {k: v for k, v in records.items() if v is not None}


def _same(a: RunRecord | None, b: RunRecord) -> bool:
    assert a is not None
    return json.loads(a.model_dump_json(exclude={"lease"})) == json.loads(
        b.model_dump_json(exclude={"lease"})
    )


def _moves(source: CheckpointStore, target: CheckpointStore) -> None:
    before = _fill(source)
    dry = migrate(source, target, dry_run=True)
    assert (dry.paused, dry.ended, dry.already_there) == (4, 2, 0)
    assert [run_id for run_id, _ in dry.refused] == ["running"]
    assert target.count() == 0 and list(target.iter_ended()) == []

    report = migrate(source, target)
    assert (report.paused, report.ended, report.already_there) == (4, 2, 0), report
    [(refused, why)] = report.refused
    assert refused == "running" and "in flight" in why
    for run_id in ("plain", "deadline", "answered", "keyed"):
        assert _same(target.load(run_id), before[run_id]), run_id
    for run_id in ("done", "dropped"):
        assert _same(target.ended(run_id), before[run_id]), run_id
    assert target.load("running") is None and not target.exists("running")

    # The copies behave as the originals: indexes, keys, tokens.
    assert target.next_deadline() == before["deadline"].expires_at
    assert target.find_key("stripe:pi_9") == "keyed"
    assert "answered" in target.due_resumes(0)
    claimed = target.claim("plain")
    assert claimed is not None and claimed.lease is not None
    assert claimed.lease.token == before["plain"].last_token + 1

    # Run again (as after a crash half-way): everything is already there.
    again = migrate(source, target)
    assert (again.paused, again.ended, again.already_there) == (0, 0, 6)


def test_runs_move_into_each_store(store_factory: StoreFactory, tmp_path: Path) -> None:
    target = store_factory()
    kind = "file" if store_factory.backend == "sqlite" else "sqlite"
    source = CheckpointStore.open(
        str(tmp_path / "src") if kind == "file" else f"sqlite:///{tmp_path / 'src.db'}"
    )
    try:
        _moves(source, target)
    finally:
        source.close()


def test_runs_move_out_of_each_store(store_factory: StoreFactory, tmp_path: Path) -> None:
    source = store_factory()
    target = CheckpointStore.open(f"sqlite:///{tmp_path / 'target.db'}")
    try:
        _moves(source, target)
    finally:
        target.close()


def test_the_command_moves_runs_and_says_which_it_refused(tmp_path: Path) -> None:
    source_url, target_url = f"sqlite:///{tmp_path / 'a.db'}", f"file://{tmp_path / 'b'}"
    source = CheckpointStore.open(source_url)
    _fill(source)
    source.close()
    runner = CliRunner(catch_exceptions=False)
    dry = runner.invoke(checkpoint, ["migrate", source_url, target_url, "--dry-run", "--json"])
    assert json.loads(dry.stdout.splitlines()[-1])["paused"] == 4
    assert not (tmp_path / "b").exists()  # a dry run creates nothing
    result = runner.invoke(checkpoint, ["migrate", source_url, target_url])
    assert result.exit_code == 1, result.output  # one run was refused
    assert "copied 4 paused run(s) and 2 ended run(s)" in result.stdout
    assert "refused running: in flight" in result.stdout
    target = CheckpointStore.open(target_url)
    try:
        assert target.count() == 4
    finally:
        target.close()


def test_the_command_refuses_a_source_that_is_not_there_and_the_same_store_twice(
    tmp_path: Path,
) -> None:
    runner = CliRunner(catch_exceptions=False)
    target = f"sqlite:///{tmp_path / 'target.db'}"
    for typo in (f"sqlite:///{tmp_path / 'typo.db'}", f"file://{tmp_path / 'typo'}"):
        result = runner.invoke(checkpoint, ["migrate", typo, target])
        assert result.exit_code == 2, result.output
        assert "there is no store there" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made, on either side
    source = f"sqlite:///{tmp_path / 'a.db'}"
    CheckpointStore.open(source).close()
    for same_place in (source, str(tmp_path / "a.db")):  # the URL, or the file's path
        same = runner.invoke(checkpoint, ["migrate", source, same_place])
        assert same.exit_code == 2 and "the same store" in same.stderr, same.output


@pytest.mark.postgres
def test_a_dry_run_into_postgresql_creates_no_schema(
    postgres_database: str, tmp_path: Path
) -> None:
    import psycopg

    source_url = f"sqlite:///{tmp_path / 'a.db'}"
    source = CheckpointStore.open(source_url)
    _fill(source)
    source.close()
    schema = f"never_{uuid4().hex[:8]}"
    target_url = f"{postgres_database}?schema={schema}"
    dry = CliRunner(catch_exceptions=False).invoke(
        checkpoint, ["migrate", source_url, target_url, "--dry-run", "--json"]
    )
    assert json.loads(dry.stdout.splitlines()[-1])["paused"] == 4, dry.output
    with psycopg.connect(postgres_database) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        assert found.fetchone() is None
