"""The JSON API under ``/api``, described by ``/api/openapi.json``.

=================================  ======================================================
``GET  /api/runs``                 paused and in-flight runs: ``task``, ``step``,
                                   ``older_than`` (seconds), ``order`` (oldest, newest,
                                   deadline), ``limit`` (up to 500) and ``cursor``
``GET  /api/runs/{run_id}``        one run, the JSON Schema of its answer, who answered
``POST /api/runs/{run_id}/resume`` ``{"input", "request_id", "pause_seq"}``: 202
                                   accepted, 200 the same request again, 422 the answer
                                   does not validate, 409 another answer won, 404
                                   unknown, 410 ended
``POST /api/runs/{run_id}/cancel`` ``{"reason"}``: 200 with the cancelled run
``POST /api/keys/{key}/resume``    ``{"input", "request_id"}``: the run paused with this
                                   business key, as resume; or, when no pause holds the
                                   key yet, the answer is kept for the one that will
                                   (202, ``"status": "kept"``); 409 another answer won
=================================  ======================================================

Every error has one body, ``{"error": {"code", "message", "details"}}``
(:mod:`.errors`), 401, 404, 405 and malformed JSON included. Each answer is
recorded with ``via="api"`` and the actor the bearer token (or the
``authenticate`` hook) names.

A webhook handler answers by business key: the provider's event or delivery
id is the natural ``request_id``, so a delivery repeated by the provider is one
answer.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..exceptions import InvalidRunId
from ..model import validate_key
from ..pause import expects_schema
from ..store import Order
from .auth import actor_of
from .errors import Problem, clean_details
from .openapi import (
    MAX_LIMIT,
    CancelBody,
    KeyResumeBody,
    KeyResumeResult,
    ResumeBody,
    ResumeResult,
    RunPage,
    document,
    run_detail,
    run_summary,
)
from .pages import href, web_of
from .runs import ORDERS, BadCursor, answer, answer_key, find, page

__all__ = ["ApiError", "json_error", "routes"]


class ApiError(Exception):
    """Raised by a handler to answer with ``problem``."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def json_error(problem: Problem) -> Response:
    return JSONResponse(problem.body(), problem.status, headers=dict(problem.headers or {}))


def _ok(model: BaseModel, status: int = 200) -> Response:
    return Response(
        model.model_dump_json(),
        status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


def _bad(message: str, details: list[dict[str, Any]] | None = None) -> ApiError:
    return ApiError(Problem(400, "bad_request", message, details or []))


def _only_query(request: Request, *allowed: str) -> None:
    """A parameter the operation does not take is a mistake (``olderthan=``), not noise."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        raise _bad(
            f"unknown query parameter {unknown[0]!r}; this operation takes {allowed or 'none'}"
        )


def _query_number(request: Request, name: str, *, integer: bool) -> float | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        number = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise _bad(f"{name} must be {kind}, not {text!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise _bad(f"{name} must be a finite number")
    return number


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body as ``model``: 415 not JSON, 400 malformed, 422 the wrong shape."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Required even for an empty body: a cross-site HTML form cannot send it, so a
    # host's session cookie cannot be used to answer or cancel from another site.
    if content_type != "application/json":
        raise ApiError(Problem(415, "unsupported_media_type", "send the body as application/json"))
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = clean_details(exc.errors(include_url=False))
        raise ApiError(
            Problem(422, "invalid_body", "the request body does not validate", details)
        ) from None


async def list_runs(request: Request) -> Response:
    web = web_of(request)
    _only_query(request, "task", "step", "older_than", "order", "limit", "cursor")
    params = request.query_params
    order = cast(Order, params.get("order", "oldest"))
    if order not in ORDERS:
        raise _bad(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    limit = _query_number(request, "limit", integer=True)
    limit = 50 if limit is None else int(limit)
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"limit must be from 1 to {MAX_LIMIT}, not {limit}")
    older_than = _query_number(request, "older_than", integer=False)
    if older_than is not None and not 0 <= older_than <= 3.2e9:
        raise _bad("older_than must be a number of seconds from 0 to 3.2e9")
    try:
        found = await run_in_threadpool(
            lambda: page(
                web.checkpoints,
                task=params.get("task"),
                step=params.get("step"),
                older_than=older_than,
                order=order,
                limit=limit,
                cursor=params.get("cursor"),
            )
        )
    except BadCursor as exc:
        raise ApiError(Problem(400, "invalid_cursor", str(exc))) from None
    return _ok(
        RunPage(runs=[run_summary(info) for info in found.rows], next_cursor=found.next_cursor)
    )


async def get_run(request: Request) -> Response:
    web = web_of(request)
    _only_query(request)
    info = await run_in_threadpool(find, web.checkpoints, request.path_params["run_id"])
    schema = await run_in_threadpool(expects_schema, info.run)
    return _ok(run_detail(info, schema))


async def resume(request: Request) -> Response:
    web = web_of(request)
    _only_query(request)
    body = cast(ResumeBody, await _body(request, ResumeBody))
    request_id = body.request_id or uuid.uuid4().hex
    answered = await run_in_threadpool(
        lambda: answer(
            web.checkpoints,
            request.path_params["run_id"],
            body.input,
            request_id=request_id,
            pause_seq=body.pause_seq,
            actor=actor_of(request),
            via="api",
        )
    )
    if answered.again:
        message = "already answered: this request_id was accepted before; nothing changed"
    else:
        message = answered.note or "accepted: a worker continues the run"
    result = ResumeResult(
        run_id=answered.run_id,
        request_id=answered.request_id,
        pause_seq=answered.pause_seq,
        status="already answered" if answered.again else "accepted",
        message=message,
    )
    return _ok(result, 200 if answered.again else 202)


async def resume_by_key(request: Request) -> Response:
    web = web_of(request)
    _only_query(request)
    body = cast(KeyResumeBody, await _body(request, KeyResumeBody))
    request_id = body.request_id or uuid.uuid4().hex
    key = request.path_params["key"]
    try:
        validate_key(key)
    except InvalidRunId as exc:
        raise _bad(str(exc)) from None
    answered = await run_in_threadpool(
        lambda: answer_key(
            web.checkpoints,
            key,
            body.input,
            request_id=request_id,
            actor=actor_of(request),
            via="webhook",
        )
    )
    messages = {
        "accepted": "accepted: a worker continues the run",
        "already answered": "already answered: this request_id was accepted before",
        "kept": "no pause holds the key yet: the answer is kept for the one that will",
    }
    result = KeyResumeResult(
        key=answered.key,
        run_id=answered.run_id,
        request_id=answered.request_id,
        status=answered.status,
        message=messages[answered.status],
    )
    return _ok(result, 200 if answered.status == "already answered" else 202)


async def cancel(request: Request) -> Response:
    web = web_of(request)
    _only_query(request)
    body = cast(CancelBody, await _body(request, CancelBody))
    run_id = request.path_params["run_id"]
    actor = actor_of(request)
    reason = body.reason
    if actor:
        reason = f"{reason} (by {actor})" if reason else f"cancelled by {actor} through the API"
    await run_in_threadpool(web.checkpoints.cancel, run_id, reason)
    info = await run_in_threadpool(find, web.checkpoints, run_id)
    schema = await run_in_threadpool(expects_schema, info.run)
    return _ok(run_detail(info, schema))


async def openapi(request: Request) -> Response:
    doc = document(web_of(request).site + " API", __version__)
    doc["servers"] = [{"url": href(request, "/api")}]
    return JSONResponse(doc)


routes = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/runs", list_runs, methods=["GET"]),
    Route("/runs/{run_id}", get_run, methods=["GET"]),
    Route("/runs/{run_id}/resume", resume, methods=["POST"]),
    Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
    Route("/keys/{key:path}/resume", resume_by_key, methods=["POST"]),
]
