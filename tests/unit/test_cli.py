"""``celery checkpoint`` through click's runner, invoked the way ``celery`` does it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result

from celery_checkpoint.cli import checkpoint, parse_duration
from celery_checkpoint.model import utcnow
from tests.unit.ops_harness import Ops, running


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    store = tmp_path_factory.mktemp("cli") / "store"
    with running(store, checkpoint_recovery_interval=3600) as ops:
        yield ops


def invoke(ops: Ops, *args: str, input: str | None = None) -> Result:
    """Run ``celery -A <app> checkpoint ARGS``: celery hands the app in ``ctx.obj``."""
    obj = CLIContext(app=ops.app, no_color=True, workdir=None, quiet=False)
    return CliRunner(catch_exceptions=False).invoke(checkpoint, list(args), obj=obj, input=input)


def failed(result: Result, code: int) -> str:
    """The one stderr line of a failed command; no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    return line


def paused(ops: Ops, order: int, **options: object) -> str:
    result = ops.tasks["approve"].apply_async((order,), options)
    ops.wait_state(result, "PAUSED")
    return str(result.id)


def test_list_prints_a_table_and_json_lines_with_filters(ops: Ops) -> None:
    run_id = paused(ops, 1, timeout=3600)
    other = ops.tasks["gated"].apply_async()
    ops.wait_state(other, "PAUSED")

    table = invoke(ops, "list")
    assert table.exit_code == 0, table.output
    header, *rows, footer = table.stdout.splitlines()
    assert header.split()[:4] == ["RUN", "ID", "TASK", "STEP"]
    mine = [row for row in rows if row.startswith(run_id)]
    assert len(mine) == 1
    assert mine[0].split()[1:5] == ["ops.approve", "await_approval", "1", "paused"]
    assert "in 59m" in mine[0] or "in 1h" in mine[0]
    assert footer == f"({len(rows)} runs)"

    lines = invoke(ops, "list", "--json", "--task", "ops.approve").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert run_id in {r["run_id"] for r in records}
    assert {r["task"] for r in records} == {"ops.approve"}
    mine_json = next(r for r in records if r["run_id"] == run_id)
    assert mine_json["step"] == "await_approval" and mine_json["state"] == "paused"
    assert mine_json["on_timeout"] == "expire" and mine_json["expires_at"]

    by_step = invoke(ops, "list", "--json", "--step", "await_go").stdout.splitlines()
    assert other.id in {json.loads(line)["run_id"] for line in by_step}
    assert run_id not in by_step
    assert invoke(ops, "list", "--json", "--older-than", "2h").stdout == ""
    old = invoke(ops, "list", "--json", "--older-than", "0s").stdout.splitlines()
    assert run_id in {json.loads(line)["run_id"] for line in old}


def test_show_prints_one_run_and_its_json(ops: Ops) -> None:
    run_id = paused(ops, 2)
    shown = invoke(ops, "show", run_id)
    assert shown.exit_code == 0, shown.output
    fields = dict(line.split(None, 1) for line in shown.stdout.splitlines() if " " in line)
    assert fields["task"].strip() == "ops.approve"
    assert "await_approval (pause 1)" in shown.stdout
    assert "tests.unit.ops_harness:Approval" in shown.stdout
    data = json.loads(invoke(ops, "show", run_id, "--json").stdout)
    assert data["run_id"] == run_id and data["state"] == "paused" and data["lease"] is None
    assert data["args"] == [2] and data["reason"] == "order 2"


def test_resume_from_the_command_line_continues_the_run(ops: Ops, tmp_path: Path) -> None:
    run_id = paused(ops, 3)
    rejected = invoke(ops, "resume", run_id, "--input", '{"approved": "perhaps"}')
    line = failed(rejected, 1)
    assert "rejected" in line and "approved" in line
    assert ops.checkpoints.store.load(run_id).resume is None  # type: ignore[union-attr]

    decision = tmp_path / "decision.json"
    decision.write_text('{"approved": true}')
    done = invoke(ops, "resume", run_id, "--input", f"@{decision}", "--request-id", "cli-1")
    assert done.exit_code == 0, done.output
    assert "cli-1" in done.stdout
    assert ops.wait_state(ops.tasks["approve"].AsyncResult(run_id), "SUCCESS").result == "approved"
    line = failed(invoke(ops, "resume", run_id, "--input", "true"), 1)
    assert "already completed" in line


def test_resume_reads_stdin_and_prints_json(ops: Ops) -> None:
    run_id = paused(ops, 4)
    done = invoke(ops, "resume", run_id, "--input", "@-", "--json", input='{"approved": false}')
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["run_id"] == run_id and data["accepted"] is True
    assert ops.wait_state(ops.tasks["approve"].AsyncResult(run_id), "SUCCESS").result == "refused"


def test_a_second_resume_is_refused_in_one_line(ops: Ops) -> None:
    ops.gate.clear()
    result = ops.tasks["gated"].apply_async()
    ops.wait_state(result, "PAUSED")
    assert invoke(ops, "resume", result.id, "--input", '"first"').exit_code == 0
    line = failed(invoke(ops, "resume", result.id, "--input", '"second"'), 1)
    assert "already" in line
    ops.gate.set()
    assert result.get(timeout=30) == "finished"


def test_cancel_from_the_command_line(ops: Ops) -> None:
    run_id = paused(ops, 5)
    done = invoke(ops, "cancel", run_id, "--reason", "out of stock")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(f"cancelled run {run_id} ")
    result = ops.wait_state(ops.tasks["approve"].AsyncResult(run_id), "REVOKED")
    assert "out of stock" in str(result.result)
    again = invoke(ops, "cancel", run_id, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["reason"] == "out of stock"
    shown = invoke(ops, "show", run_id)
    assert shown.exit_code == 0 and "cancelled: out of stock" in shown.stdout
    assert "cancelled" in failed(invoke(ops, "resume", run_id), 1)


def test_recover_and_stats(ops: Ops) -> None:
    run_id = paused(ops, 6, on_timeout="resume")
    store = ops.checkpoints.store
    run = store.load(run_id)
    assert run is not None
    store.save(run.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)}))
    counts = json.loads(invoke(ops, "stats", "--json").stdout)
    assert counts["due_timeouts"] >= 1 and counts["runs"] >= 1
    assert counts["runs"] == counts["paused"] + counts["in_flight"]
    report = invoke(ops, "recover", "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["timeouts"] == 1
    assert ops.tasks["approve"].AsyncResult(run_id).get(timeout=30) == "timed out"
    human = invoke(ops, "stats")
    assert human.exit_code == 0 and human.stdout.splitlines()[0].split()[0] == "runs"
    assert invoke(ops, "recover").stdout.startswith("recovery pass: ")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["show", "no-such-run"], 1, "no run 'no-such-run'"),
        (["resume", "no-such-run"], 1, "no paused run"),
        (["cancel", "no-such-run"], 1, "no paused run"),
        (["show", "../../etc/passwd"], 2, "invalid run id"),
        (["resume", "a/b", "--input", "1"], 2, "invalid run id"),
        (["cancel", ".hidden"], 2, "invalid run id"),
        (["resume", "some-run", "--input", "{not json"], 2, "--input is not valid JSON"),
        (["resume", "some-run", "--input", "@/no/such/file.json"], 2, "cannot read"),
        (["list", "--older-than", "soon"], 2, "--older-than: 'soon' is not a duration"),
        (["list", "--older-than", "99999999999"], 2, "from 0 to 100 years"),
    ],
)
def test_bad_input_is_one_clear_line_and_an_exit_status(
    ops: Ops, args: list[str], code: int, says: str
) -> None:
    assert says in failed(invoke(ops, *args), code)


def test_a_hostile_run_id_with_a_newline_stays_one_line(ops: Ops) -> None:
    line = failed(invoke(ops, "show", "x\nError: forged second line\x1b[2J"), 2)
    assert "invalid run id" in line and "\\n" in line and "\x1b" not in line


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("2h") == 7200
    assert parse_duration("3d") == 3 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ("", "h", "2x", "-5m", "1h-", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_prune_deletes_runs_that_ended_before_the_age_and_needs_the_age(ops: Ops) -> None:
    run_id = paused(ops, 90)
    cancelled = invoke(ops, "cancel", run_id)
    assert cancelled.exit_code == 0, cancelled.output
    store = ops.checkpoints.store
    assert store.ended(run_id) is not None

    kept = json.loads(invoke(ops, "prune", "--older-than", "1h", "--json").stdout)
    assert kept == {"pruned": 0, "older_than_seconds": 3600.0}
    assert store.ended(run_id) is not None
    done = invoke(ops, "prune", "--older-than", "0")
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("pruned ") and int(done.stdout.split()[1]) >= 1
    assert store.ended(run_id) is None
    assert "no paused run" in failed(invoke(ops, "resume", run_id), 1)

    missing = invoke(ops, "prune")
    assert missing.exit_code == 2 and "Missing option '--older-than'" in missing.stderr
    assert "not a duration" in failed(invoke(ops, "prune", "--older-than", "later"), 2)


def test_store_option_points_at_another_store(ops: Ops, tmp_path: Path) -> None:
    from celery_checkpoint import CheckpointStore, PausedWorkflow

    other = CheckpointStore.open(tmp_path / "other")
    other.save(PausedWorkflow(run_id="elsewhere-1", task_name="ops.approve", step="far"))
    lines = invoke(ops, "--store", str(tmp_path / "other"), "list", "--json").stdout.splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["elsewhere-1"]
    counts = json.loads(invoke(ops, "--store", str(tmp_path / "other"), "stats", "--json").stdout)
    assert counts["runs"] == 1


def test_resume_records_who_answered_and_show_prints_it(ops: Ops) -> None:
    run_id = paused(ops, 31)
    store = ("--store", str(ops.store_dir))  # the app's own, whatever an earlier test registered
    result = invoke(
        ops, *store, "resume", run_id, "--input", '{"approved": true}', "--actor", "ana@example.com"
    )
    assert result.exit_code == 0, result.output
    # The request is on the record from the moment it is accepted; read it before
    # or after the worker ran it (a completed run keeps it on its tombstone).
    record = ops.checkpoints.store.load(run_id) or ops.checkpoints.store.ended(run_id)
    assert record is not None and record.resume is not None
    assert (record.resume.actor, record.resume.via) == ("ana@example.com", "cli")
    shown = invoke(ops, *store, "show", run_id)
    assert "answered by  ana@example.com via cli at " in shown.stdout


def test_resume_by_key_answers_the_run_paused_with_it_or_keeps_the_answer(ops: Ops) -> None:
    store = ("--store", str(ops.store_dir))
    early = invoke(ops, *store, "resume", "--key", "carrier:TRK-1", "--input", '"delivered"')
    assert early.exit_code == 0, early.output
    assert "no run holds key carrier:TRK-1 yet" in early.stdout
    taken = ops.tasks["keyed"].delay("carrier:TRK-1")
    assert taken.get(timeout=30) == "delivered"

    late = ops.tasks["keyed"].delay("carrier:TRK-2")
    ops.wait(lambda: ops.checkpoints.store.find_key("carrier:TRK-2"), "the keyed pause")
    answered = invoke(
        ops, *store, "resume", "--key", "carrier:TRK-2", "--input", '"lost"', "--json"
    )
    assert answered.exit_code == 0, answered.output
    report = json.loads(answered.stdout)
    assert report["run_id"] == late.id and report["early"] is False
    assert late.get(timeout=30) == "lost"
    assert "not both" in failed(invoke(ops, "resume", "some-run", "--key", "k"), 2)
    assert "invalid key" in failed(invoke(ops, "resume", "--key", ".bad"), 2)


@pytest.mark.parametrize(
    "command", [["list"], ["show", "order-1"], ["stats"], ["prune", "--older-than", "1d"]]
)
def test_a_store_that_cannot_be_opened_is_one_line_for_every_command(
    ops: Ops, tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    line = failed(invoke(ops, "--store", str(tmp_path / "a-file" / "store"), *command), 1)
    assert "cannot open the checkpoint store" in line
