from __future__ import annotations

import pytest

from celery_checkpoint import InvalidRunId, PausedWorkflow
from celery_checkpoint.model import validate_run_id


def test_record_round_trips_through_json() -> None:
    run = PausedWorkflow(run_id="r-1", task_name="t", step="s", state={"n": [1, 2]})
    again = PausedWorkflow.from_json(run.to_json())
    assert again == run


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "x\x00", "é", "x" * 201, "x.json"])
def test_hostile_run_id_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRunId):
        validate_run_id(bad)


def test_invalid_run_id_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_run_id("/etc/passwd")


def test_owner_death_is_proved_only_by_what_this_host_can_see() -> None:
    import subprocess
    import sys

    from celery_checkpoint import Owner

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = Owner.current()
    gone = me.model_copy(update={"pid": child.pid, "pid_start": None})
    assert not me.is_dead_here()  # alive
    assert gone.is_dead_here()  # same host, same boot, same namespace, process gone
    assert not gone.model_copy(update={"host": "elsewhere"}).is_dead_here()
    assert not gone.model_copy(update={"pid_ns": "pid:[1]"}).is_dead_here()  # another container


@pytest.mark.parametrize(
    "unproved",
    [
        {"boot_id": "another-boot"},  # another machine with our host name, or a reboot
        {"boot_id": None},  # written where the boot id was unknown
        {"pid_ns": None},  # written where the pid namespace was unknown
    ],
)
def test_owner_death_needs_our_boot_and_pid_namespace_known_on_both_sides(
    unproved: dict[str, str | None],
) -> None:
    import subprocess
    import sys

    from celery_checkpoint import Owner

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = Owner.current().model_copy(update={"pid": child.pid, "pid_start": None})
    assert gone.is_dead_here()
    assert not gone.model_copy(update=unproved).is_dead_here()


def test_a_request_that_answered_an_earlier_pause_is_recognised_by_the_pause_it_answered() -> None:
    from celery_checkpoint.model import EARLIER_ANSWERS_KEPT, ResumeRequest, RunRecord

    run = RunRecord(
        run_id="r", task_name="t", step="s", pause_seq=4, earlier_answers=["a", "b", "c"]
    )
    assert [run.answered_pause(r) for r in ("a", "b", "c", "d")] == [1, 2, 3, None]
    # A run whose record kept only the latest answers still counts from the end.
    kept = run.model_copy(update={"pause_seq": 100, "earlier_answers": ["x", "y"]})
    assert (kept.answered_pause("x"), kept.answered_pause("y")) == (98, 99)
    # The request pending for the current pause is not an earlier answer...
    pending = ResumeRequest(request_id="d", input=None, pause_seq=4)
    assert run.model_copy(update={"resume": pending}).answered_pause("d") is None
    # ...but once the run completed with it, it is.
    done = run.model_copy(update={"resume": pending, "status": "completed"})
    assert done.answered_pause("d") == 4
    assert EARLIER_ANSWERS_KEPT >= 10


def test_an_answer_is_pending_until_the_run_leaves_its_pause_then_applied() -> None:
    from celery_checkpoint.model import ResumeRequest, RunRecord

    request = ResumeRequest(request_id="a", input=None, pause_seq=2)
    run = RunRecord(run_id="r", task_name="t", step="s", pause_seq=2, resume=request)
    assert run.answer_status(request) == "pending"
    assert run.model_copy(update={"pause_seq": 3}).answer_status(request) == "applied"
    assert run.model_copy(update={"status": "completed"}).answer_status(request) == "applied"
    failed = request.model_copy(update={"status": "failed"})
    assert run.answer_status(failed) == "failed"
