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
