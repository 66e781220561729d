"""The page a signed link opens: ``/links/<token>``.

**GET only shows**: mail scanners and chat unfurlers fetch every link they
see, so opening one changes nothing. It shows the run and a confirm button
(the link carries its answer) or the form drawn from ``expects``. **POST
answers**, with the link's nonce as the request id: a second click is the
same answer, shown as "already answered". The link is its own credential
(no sign-in, no CSRF token: the signed token is the secret a forged request
would need); the ``authenticate`` hook, when it names someone, is recorded
as the actor over the name the link was made for.

Tampered, expired, rotated-out and superseded links (the run paused again,
or ended) get a page saying so and change nothing.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .._links import LinkClaims, LinkRefused
from ..exceptions import CheckpointError, ResumeRejected
from ..pause import expects_schema
from ..store import RunInfo
from .errors import problem_for
from .forms import build_form, initial_values, place_errors, read_answer
from .pages import href, message_page, problem_page, render, web_of
from .runs import answer, find

__all__ = ["link_page"]

_REFUSED = {
    "tampered": (400, "Link not valid"),
    "expired": (410, "Link expired"),
    "rotated": (410, "Link no longer valid"),
}


def _claims(request: Request) -> LinkClaims | Response:
    links = web_of(request).links
    if links is None:
        return message_page(
            request,
            "Link not valid",
            "Resume links are not enabled here.",
            status=404,
            tone="error",
        )
    try:
        return links.verify(request.path_params["token"])
    except LinkRefused as refused:
        status, heading = _REFUSED[refused.reason]
        return message_page(
            request, heading, f"{refused} Nothing was changed.", status=status, tone="error"
        )


def _answered_page(request: Request, info: RunInfo, first_time: bool) -> Response:
    heading = "Thank you: answer recorded" if first_time else "Already answered"
    text = (
        "Your answer was recorded; the run continues on its own."
        if first_time
        else "This link's answer was already recorded; nothing changed."
    )
    return message_page(request, heading, text, tone="ok", run=info.run)


def _not_waiting(request: Request, info: RunInfo, claims: LinkClaims) -> Response | None:
    """The page for a link whose pause is over, or None if the link may still answer."""
    run = info.run
    if run.status != "paused":
        done = run.resume
        if done is not None and done.request_id == claims.request_id:
            return _answered_page(request, info, first_time=False)
        return message_page(
            request,
            "No longer waiting",
            f"The run has {run.status}; this link can no longer answer it.",
            status=410,
            tone="warn",
            run=run,
        )
    current = run.current_resume
    if current is not None and current.request_id == claims.request_id:
        return _answered_page(request, info, first_time=False)
    if run.pause_seq != claims.pause_seq:
        return message_page(
            request,
            "Link superseded",
            "The run has moved on to a later pause since this link was made; "
            "it can no longer answer. Nothing was changed.",
            status=410,
            tone="warn",
            run=run,
        )
    if current is not None and (current.status == "pending" or info.in_flight):
        who = f" by {current.actor}" if current.actor else ""
        return message_page(
            request,
            "Already answered",
            f"Someone else answered{who} via {current.via}; this link changes nothing.",
            status=409,
            tone="warn",
            run=run,
        )
    return None


async def link_page(request: Request) -> Response:
    web = web_of(request)
    claims = _claims(request)
    if isinstance(claims, Response):
        return claims
    try:
        info = await run_in_threadpool(find, web.checkpoints, claims.run_id)
    except CheckpointError as exc:
        return problem_page(request, problem_for(exc))
    over = _not_waiting(request, info, claims)
    if over is not None:
        return over
    form = build_form(await run_in_threadpool(expects_schema, info.run))
    context = {
        "run": info.run,
        "claims": claims,
        "link_expires": claims.expires_at,
        "action": href(request, f"/links/{request.path_params['token']}"),
        "form": form,
        "values": initial_values(form),
        "errors": {},
        "loose": [],
    }
    if request.method != "POST":
        return render(request, "link.html", context)

    value = claims.input
    if not claims.has_input:
        data = await request.form()
        submitted = {key: [str(v) for v in data.getlist(key)] for key in data}
        value, unreadable = read_answer(form, submitted)
        context["values"] = submitted
        if unreadable:
            return render(request, "link.html", {**context, "errors": unreadable}, status=422)
    actor = await web.identity.identify(request) or claims.actor
    try:
        answered = await run_in_threadpool(
            lambda: answer(
                web.checkpoints,
                claims.run_id,
                value,
                request_id=claims.request_id,
                pause_seq=claims.pause_seq,
                actor=actor,
                via="link",
            )
        )
    except ResumeRejected as exc:
        if exc.errors and not claims.has_input:
            placed, loose = place_errors(form, exc.errors)
            return render(
                request, "link.html", {**context, "errors": placed, "loose": loose}, status=422
            )
        return problem_page(request, problem_for(exc))
    except CheckpointError as exc:
        return problem_page(request, problem_for(exc))
    return _answered_page(request, info, first_time=not answered.again)
