"""The inbox: paused runs at ``/``, one run's page with its answer form.

The list reads one page of the store's ordered listing (oldest first by
default; newest or by deadline), filtered by task and step, and the task and
step choices from ``store.summary()``. A run's page shows its step, why it
waits and until when, and the form drawn from its ``expects`` schema. Posting
the form resumes the run (``via="inbox"``, the signed-in actor recorded) and
redirects back to the run's page; a rejected answer comes back with pydantic's
errors beside the fields and the values kept. Every form carries a CSRF token
and a request id, so a double submission is one answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..exceptions import CheckpointError, ResumeRejected
from ..model import RunRecord, utcnow
from ..pause import expects_schema
from ..store import Order, RunInfo
from .auth import actor_of
from .errors import Problem, problem_for
from .forms import build_form, initial_values, place_errors, read_answer
from .pages import href, message_page, problem_page, render, web_of
from .runs import ORDERS, BadCursor, answer, find, page, status_of

__all__ = ["cancel", "index", "resume", "run_page"]

PAGE_SIZE = 50
_ORDER_LABELS = {"oldest": "oldest first", "newest": "newest first", "deadline": "deadline soonest"}


@dataclass(frozen=True)
class Row:
    run_id: str
    task: str
    step: str
    pause_seq: int
    reason: str | None
    paused_at: datetime
    expires_at: datetime | None
    overdue: bool
    status: str


def _row(info: RunInfo, now: datetime) -> Row:
    run = info.run
    return Row(
        run_id=run.run_id,
        task=run.task_name,
        step=run.step,
        pause_seq=run.pause_seq,
        reason=run.reason,
        paused_at=run.paused_at,
        expires_at=run.expires_at,
        overdue=run.expires_at is not None and run.expires_at <= now,
        status=status_of(run, info.in_flight),
    )


async def index(request: Request) -> Response:
    web = web_of(request)
    params = request.query_params
    task = params.get("task") or None
    step = params.get("step") or None
    order = cast(Order, params.get("order") if params.get("order") in ORDERS else "oldest")
    cursor = params.get("cursor") or None

    def read() -> tuple[Any, list[Any]]:
        listing = page(
            web.checkpoints,
            task=task,
            step=step,
            older_than=None,
            order=order,
            limit=PAGE_SIZE,
            cursor=cursor,
        )
        return listing, web.checkpoints.store.summary()

    try:
        listing, groups = await run_in_threadpool(read)
    except BadCursor as exc:
        return problem_page(request, Problem(400, "invalid_cursor", str(exc)))
    now = utcnow()
    query = {k: v for k, v in (("task", task), ("step", step), ("order", order)) if v}
    next_page = None
    if listing.next_cursor:
        next_page = href(request, "/") + "?" + urlencode({**query, "cursor": listing.next_cursor})
    return render(
        request,
        "inbox.html",
        {
            "nav": "inbox",
            "rows": [_row(info, now) for info in listing.rows],
            "tasks": sorted({g["task"] for g in groups}),
            "steps": sorted({g["step"] for g in groups if task is None or g["task"] == task}),
            "task": task,
            "step": step,
            "order": order,
            "order_label": _ORDER_LABELS[order],
            "cursor": cursor,
            "next_page": next_page,
            "first_page": href(request, "/") + ("?" + urlencode(query) if query else ""),
            "total_paused": sum(g["paused"] for g in groups),
            "total_in_flight": sum(g["in_flight"] for g in groups),
            "total_overdue": sum(g["overdue"] for g in groups),
        },
    )


async def _show(
    request: Request,
    info: RunInfo,
    *,
    values: dict[str, list[str]] | None = None,
    errors: dict[str, list[str]] | None = None,
    loose: list[str] | None = None,
    notice: str | None = None,
    notice_tone: str = "ok",
    status: int = 200,
    request_id: str | None = None,
) -> Response:
    web = web_of(request)
    run = info.run
    state = status_of(run, info.in_flight)
    form = build_form(await run_in_threadpool(expects_schema, run))
    csrf_token, fresh_cookie = web.csrf.issue(request)
    response = render(
        request,
        "run.html",
        {
            "run": run,
            "lease": info.lease,
            "status": state,
            "answer": (shown := run.current_resume if run.status == "paused" else run.resume),
            "answer_status": None if shown is None else run.answer_status(shown),
            "answerable": state in ("paused", "resume_failed"),
            "cancellable": run.status == "paused",
            "form": form,
            "values": initial_values(form) if values is None else values,
            "errors": errors or {},
            "loose": loose or [],
            "csrf_token": csrf_token,
            "request_id": request_id or uuid.uuid4().hex,
            "notice": notice,
            "notice_tone": notice_tone,
        },
        status=status,
    )
    web.csrf.set_cookie(request, response, fresh_cookie)
    return response


async def run_page(request: Request) -> Response:
    web = web_of(request)
    try:
        info = await run_in_threadpool(find, web.checkpoints, request.path_params["run_id"])
    except CheckpointError as exc:
        return problem_page(request, problem_for(exc))
    notice = None
    done = request.query_params.get("done")
    if done == "answered":
        notice = "Answer recorded: a worker continues the run."
    elif done == "again":
        notice = "This answer had already been recorded; nothing changed."
    elif done == "cancelled":
        notice = "The run was cancelled."
    return await _show(request, info, notice=notice)


def _csrf_refused(request: Request) -> Response:
    return message_page(
        request,
        "Form expired",
        "The form was missing its security token or it did not match: reload the page "
        "and submit again. Nothing was changed.",
        status=403,
        tone="error",
        back=request.url.path.rsplit("/", 1)[0],
        back_label="Back to the run",
    )


async def resume(request: Request) -> Response:
    web = web_of(request)
    run_id = request.path_params["run_id"]
    data = await request.form()
    if not web.csrf.valid(request, data.get("csrf_token")):
        return _csrf_refused(request)
    try:
        info = await run_in_threadpool(find, web.checkpoints, run_id)
    except CheckpointError as exc:
        return problem_page(request, problem_for(exc))
    submitted = {key: [str(v) for v in data.getlist(key)] for key in data}
    form = build_form(await run_in_threadpool(expects_schema, info.run))
    value, unreadable = read_answer(form, submitted)
    request_id = str(data.get("request_id") or "") or uuid.uuid4().hex
    if unreadable:
        return await _show(
            request, info, errors=unreadable, status=422, values=submitted, request_id=request_id
        )
    pause_seq_text = str(data.get("pause_seq") or "")
    pause_seq = int(pause_seq_text) if pause_seq_text.isdigit() else None
    try:
        answered = await run_in_threadpool(
            lambda: answer(
                web.checkpoints,
                run_id,
                value,
                request_id=request_id,
                pause_seq=pause_seq,
                actor=actor_of(request),
                via="inbox",
            )
        )
    except ResumeRejected as exc:
        problem = problem_for(exc)
        if problem.status != 422:
            return await _refused(request, info.run, problem)
        placed, loose = place_errors(form, exc.errors)
        return await _show(
            request,
            info,
            errors=placed,
            loose=loose,
            status=422,
            values=submitted,
            request_id=request_id,
        )
    except CheckpointError as exc:
        return await _refused(request, info.run, problem_for(exc))
    done = "again" if answered.again else "answered"
    return RedirectResponse(href(request, f"/runs/{run_id}?done={done}"), status_code=303)


async def _refused(request: Request, run: RunRecord, problem: Problem) -> Response:
    """The run's page again, saying why the answer changed nothing."""
    web = web_of(request)
    try:
        info = await run_in_threadpool(find, web.checkpoints, run.run_id)
    except CheckpointError:
        return problem_page(request, problem)
    return await _show(
        request, info, notice=problem.message, notice_tone="warn", status=problem.status
    )


async def cancel(request: Request) -> Response:
    web = web_of(request)
    run_id = request.path_params["run_id"]
    data = await request.form()
    if not web.csrf.valid(request, data.get("csrf_token")):
        return _csrf_refused(request)
    reason = str(data.get("reason") or "").strip() or None
    actor = actor_of(request)
    if reason is not None and actor:
        reason = f"{reason} (by {actor})"
    elif actor:
        reason = f"cancelled by {actor} in the inbox"
    try:
        await run_in_threadpool(web.checkpoints.cancel, run_id, reason)
    except CheckpointError as exc:
        return problem_page(request, problem_for(exc))
    return RedirectResponse(href(request, f"/runs/{run_id}?done=cancelled"), status_code=303)
