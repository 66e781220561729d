"""The JSON API's bodies as pydantic models, and its OpenAPI document built from them.

The handlers in :mod:`.api` answer with these models, so the document and the
responses cannot drift apart: the document's schemas are the models' own
JSON Schemas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.json_schema import models_json_schema

from ..model import RunRecord, Via
from ..store import RunInfo
from .runs import Status, status_of

__all__ = [
    "MAX_LIMIT",
    "Answer",
    "CancelBody",
    "ErrorBody",
    "ResumeBody",
    "ResumeResult",
    "RunDetail",
    "RunPage",
    "RunSummary",
    "document",
    "run_detail",
    "run_summary",
]

MAX_LIMIT = 500
RUN_ID_PATTERN = r"^[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,199}$"
KEY_PATTERN = r"^[A-Za-z0-9_:@+=/-][A-Za-z0-9_.:@+=/-]{0,199}$"


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorInfo(BaseModel):
    code: str = Field(description="A stable word for programs: not_found, invalid_input, ...")
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """Every error, whatever the status."""

    error: ErrorInfo


class Answer(BaseModel):
    """A resume request recorded on the run, and who made it."""

    request_id: str
    #: pending: not run yet (or running); failed: its body raised; applied: it
    #: resumed a pause the run has left (completed, or paused again)
    status: Literal["pending", "failed", "applied"]
    input: JsonValue = None
    actor: str | None
    via: Via
    requested_at: datetime
    timed_out: bool
    error: str | None


class Lease(BaseModel):
    """Where an in-flight run runs (the worker's node name) and until when its lease holds."""

    node: str
    expires_at: datetime


class RunSummary(BaseModel):
    run_id: str
    task: str
    step: str
    pause_seq: int
    status: Status
    reason: str | None
    created_at: datetime
    paused_at: datetime
    expires_at: datetime | None
    on_timeout: Literal["expire", "resume"] | None
    answer: Answer | None
    lease: Lease | None


class RunDetail(RunSummary):
    expects: str | None = Field(description="Import path of the type the answer must match")
    expects_schema: dict[str, JsonValue] | None = Field(
        description="JSON Schema of the answer; null means any JSON"
    )
    args: list[JsonValue]
    kwargs: dict[str, JsonValue]
    state: JsonValue = None
    metadata: dict[str, JsonValue]
    ended_at: datetime | None
    ended_reason: str | None
    recoveries: int


class RunPage(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None = Field(description="Pass as cursor= for the next page; null: last")


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: JsonValue = Field(default=None, description="The answer, checked against expects")
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Idempotency key: the same id again is the same answer",
    )
    pause_seq: int | None = Field(
        default=None, ge=1, description="Answer only if the run is still at this pause"
    )


class ResumeResult(BaseModel):
    run_id: str
    request_id: str
    pause_seq: int
    status: Literal["accepted", "already answered"]
    message: str


class KeyResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: JsonValue = Field(
        default=None, description="The answer, checked against the pause's expects"
    )
    request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Idempotency key, e.g. the webhook's delivery or event id",
    )


class KeyResumeResult(BaseModel):
    key: str
    run_id: str | None = Field(description="The run that waits on the key; null: answer kept")
    request_id: str
    status: Literal["accepted", "already answered", "kept"]
    message: str


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)


def _json(value: Any) -> Any:
    """Task arguments as JSON (kombu's JSON may have given dates, decimals, bytes)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return str(value)


def run_summary(info: RunInfo) -> RunSummary:
    return RunSummary(**_summary_fields(info))


def _summary_fields(info: RunInfo) -> dict[str, Any]:
    run: RunRecord = info.run
    request = run.current_resume if run.status == "paused" else run.resume
    return {
        "run_id": run.run_id,
        "task": run.task_name,
        "step": run.step,
        "pause_seq": run.pause_seq,
        "status": status_of(run, info.in_flight),
        "reason": run.reason,
        "created_at": run.created_at,
        "paused_at": run.paused_at,
        "expires_at": run.expires_at,
        "on_timeout": run.on_timeout if run.expires_at is not None else None,
        "answer": None
        if request is None
        else Answer(
            request_id=request.request_id,
            status=run.answer_status(request),
            input=request.input,
            actor=request.actor,
            via=request.via,
            requested_at=request.requested_at,
            timed_out=request.timed_out,
            error=request.error,
        ),
        "lease": None
        if info.lease is None
        else Lease(node=info.lease.owner.node, expires_at=info.lease.expires_at),
    }


def run_detail(info: RunInfo, schema: dict[str, Any] | None) -> RunDetail:
    run = info.run
    return RunDetail(
        **_summary_fields(info),
        expects=run.expects,
        expects_schema=schema,
        args=_json(run.args),
        kwargs=_json(run.kwargs),
        state=run.state,
        metadata=run.metadata,
        ended_at=run.ended_at,
        ended_reason=run.ended_reason,
        recoveries=run.recoveries,
    )


# -- the document --------------------------------------------------------------------

_ERRORS = {
    "400": "Malformed request: JSON that does not parse, an unknown or bad query parameter",
    "401": "No valid bearer token, and the authenticate hook named nobody",
    "404": "No such run (or no such path)",
    "405": "Method not allowed on this path",
    "409": "Another answer won, or the answer aims at an earlier pause",
    "410": "The run ended: completed, cancelled, expired or failed",
    "415": "The body must be application/json",
    "422": "The body or the answer does not validate (pydantic's errors in details)",
    "503": "The checkpoint store is unavailable",
}


def _error_responses(*codes: str) -> dict[str, Any]:
    return {
        code: {
            "description": _ERRORS[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for code in codes
    }


def _ok(description: str, model: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
    }


def _body(model: str) -> dict[str, Any]:
    return {
        "required": False,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
    }


_RUN_ID = {
    "name": "run_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": RUN_ID_PATTERN},
}


def document(title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``/api`` (paths relative to its server ``/api``)."""
    _, top = models_json_schema(
        [
            (RunPage, "serialization"),
            (RunDetail, "serialization"),
            (ResumeResult, "serialization"),
            (ErrorBody, "serialization"),
            (KeyResumeResult, "serialization"),
            (ResumeBody, "validation"),
            (KeyResumeBody, "validation"),
            (CancelBody, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    schemas = top.get("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "servers": [{"url": "/api"}],
        "security": [{"bearer": []}],
        "paths": {
            "/runs": {
                "get": {
                    "operationId": "listRuns",
                    "summary": "Paused and in-flight runs, a page at a time",
                    "parameters": [
                        {"name": "task", "in": "query", "schema": {"type": "string"}},
                        {"name": "step", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "older_than",
                            "in": "query",
                            "description": "Only runs paused at least this many seconds ago",
                            "schema": {"type": "number", "minimum": 0, "maximum": 3.2e9},
                        },
                        {
                            "name": "order",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["oldest", "newest", "deadline"],
                                "default": "oldest",
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_LIMIT,
                                "default": 50,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "next_cursor of the previous page",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": _ok("One page of runs", "RunPage"),
                        **_error_responses("400", "401", "503"),
                    },
                }
            },
            "/runs/{run_id}": {
                "get": {
                    "operationId": "getRun",
                    "summary": "One run: its pause, the JSON Schema of its answer, who answered",
                    "parameters": [_RUN_ID],
                    "responses": {
                        "200": _ok("The run", "RunDetail"),
                        **_error_responses("400", "401", "404", "503"),
                    },
                }
            },
            "/runs/{run_id}/resume": {
                "post": {
                    "operationId": "resumeRun",
                    "summary": "Answer the run's pause; a repeated request_id is the same answer",
                    "parameters": [_RUN_ID],
                    "requestBody": _body("ResumeBody"),
                    "responses": {
                        "200": _ok("This request_id had already answered the run", "ResumeResult"),
                        "202": _ok("Answer accepted: a worker continues the run", "ResumeResult"),
                        **_error_responses("400", "401", "404", "409", "410", "415", "422", "503"),
                    },
                }
            },
            "/keys/{key}/resume": {
                "post": {
                    "operationId": "resumeKey",
                    "summary": "Answer the run paused with this business key, or keep the "
                    "answer for the pause that will name it (a webhook)",
                    "parameters": [
                        {
                            "name": "key",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": KEY_PATTERN},
                        }
                    ],
                    "requestBody": _body("KeyResumeBody"),
                    "responses": {
                        "200": _ok(
                            "This request_id had already answered the run", "KeyResumeResult"
                        ),
                        "202": _ok(
                            "Answer accepted, or kept until a pause names the key",
                            "KeyResumeResult",
                        ),
                        **_error_responses("400", "401", "409", "410", "415", "422", "503"),
                    },
                }
            },
            "/runs/{run_id}/cancel": {
                "post": {
                    "operationId": "cancelRun",
                    "summary": "Cancel the run for good (again: the same answer)",
                    "parameters": [_RUN_ID],
                    "requestBody": _body("CancelBody"),
                    "responses": {
                        "200": _ok("The cancelled run", "RunDetail"),
                        **_error_responses("400", "401", "404", "410", "415", "422", "503"),
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of checkpoint_web_tokens (or the host's own login)",
                }
            },
        },
    }
