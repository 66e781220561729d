"""The JSON API fuzzed against its own OpenAPI document (schemathesis, bounded).

Every generated request, valid and invalid, must get a response the document
describes (status, content type, body schema), and never a 5xx.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from celery_checkpoint import Checkpoints, RunRecord
from tests.web.conftest import TOKEN
from tests.web.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.redis]

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def api_schema(server: Server, checkpoints: Checkpoints) -> Any:
    # Runs to find: the generated ids are mostly unknown ones, these answer 200.
    for n in range(3):
        checkpoints.store.save(
            RunRecord(
                run_id=f"fuzz-{n}",
                task_name="proj.approve",
                step="await_approval",
                expects="tests.integration.proj:Approval",
            )
        )
    schema = schemathesis.openapi.from_url(f"{server.url}/api/openapi.json", headers=AUTH)

    @schema.auth()
    class Bearer:
        """The API token, known to schemathesis as the credentials (not generated)."""

        def get(self, case: Any, context: Any) -> str:
            return TOKEN

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


def operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


# Not checked: that every schema-valid request is accepted. An ``input`` is any
# JSON to the document but must match the run's own ``expects`` (422), and a
# ``cursor`` is any string to it but must be one the listing handed out (400).
# Driven by hand rather than by schemathesis' pytest plugin, whose lazy schema
# does not run under pytest 9: one bounded hypothesis run per operation and mode.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_response_matches_the_openapi_document(api_schema: Any, mode: Any) -> None:
    ops = operations(api_schema)
    assert {f"{op.method.upper()} {op.path}" for op in ops} == {
        "GET /runs",
        "GET /runs/{run_id}",
        "POST /runs/{run_id}/resume",
        "POST /keys/{key}/resume",
        "POST /runs/{run_id}/cancel",
    }
    for operation in ops:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case: Any) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()
