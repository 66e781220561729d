"""What every HTML page shares: the app's context, templates, filters, error pages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from .._links import LinkSigner
from ..model import RunRecord, utcnow
from .auth import Csrf, Identity, actor_of, app_root
from .errors import Problem

if TYPE_CHECKING:
    from ..checkpoints import Checkpoints

__all__ = ["Web", "href", "message_page", "problem_page", "render", "web_of"]

HERE = Path(__file__).resolve().parent

_LABELS = {
    "paused": "waiting",
    "resuming": "answered",
    "timing_out": "timing out",
    "resume_failed": "resume failed",
    "in_flight": "running",
    "completed": "completed",
    "cancelled": "cancelled",
    "expired": "expired",
    "failed": "failed",
}


@dataclass(frozen=True)
class Web:
    """What the handlers of one app need: ``request.app.state.web``."""

    checkpoints: Checkpoints
    links: LinkSigner | None
    csrf: Csrf
    identity: Identity
    templates: Jinja2Templates
    site: str


def web_of(request: Request) -> Web:
    web: Web = request.app.state.web
    return web


def href(request: Request, path: str) -> str:
    """``path`` inside this app, wherever it is mounted (relative to the host)."""
    return f"{app_root(request.scope)}{path}"


def _span(seconds: float) -> str:
    """``1d 2h``, ``20h``, ``5m 10s``: the largest unit and the next one when it counts."""
    left = int(abs(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (unit, size) in enumerate(units):
        if left >= size or unit == "s":
            text = f"{left // size}{unit}"
            if index + 1 < len(units):
                smaller, small = units[index + 1]
                rest = (left % size) // small
                if rest:
                    text += f" {rest}{smaller}"
            return text
    return "0s"  # pragma: no cover - the loop always returns


def _age(when: datetime | None) -> str:
    return "-" if when is None else f"{_span((utcnow() - when).total_seconds())} ago"


def _deadline(when: datetime | None) -> str:
    if when is None:
        return "none"
    left = (when - utcnow()).total_seconds()
    return f"in {_span(left)}" if left > 0 else f"overdue by {_span(left)}"


def _when(when: datetime | float | None) -> str:
    if when is None:
        return "-"
    if isinstance(when, int | float):
        when = datetime.fromtimestamp(when, tz=utcnow().tzinfo)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _short(run_id: str) -> str:
    return run_id if len(run_id) <= 18 else f"{run_id[:8]}…{run_id[-6:]}"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def make_templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        age=_age,
        deadline=_deadline,
        when=_when,
        short=_short,
        pretty=_pretty,
        label=lambda status: _LABELS.get(status, status),
    )
    return Jinja2Templates(env=env)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    web = web_of(request)
    base = {
        "href": lambda path: href(request, path),
        "site": web.site,
        "title": web.site,
        "actor": actor_of(request),
        "nav": None,
    }
    response: Response = web.templates.TemplateResponse(
        request, template, {**base, **context}, status_code=status, headers=headers
    )
    # Answers and personal data: never kept by a shared cache; never framed.
    response.headers["cache-control"] = "no-store"
    response.headers["x-frame-options"] = "DENY"
    response.headers["x-content-type-options"] = "nosniff"
    return response


def message_page(
    request: Request,
    heading: str,
    message: str,
    *,
    status: int = 200,
    tone: str = "info",
    run: RunRecord | None = None,
    back: str | None = None,
    back_label: str | None = None,
) -> Response:
    return render(
        request,
        "message.html",
        {
            "heading": heading,
            "message": message,
            "tone": tone,
            "run": run,
            "back": back,
            "back_label": back_label,
        },
        status=status,
    )


_HEADINGS = {
    401: "Sign-in needed",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Already answered",
    410: "No longer waiting",
    422: "Not accepted",
    503: "Store unavailable",
}


def problem_page(request: Request, problem: Problem) -> Response:
    heading = _HEADINGS.get(problem.status, "Something went wrong")
    tone = "error" if problem.status >= 500 or problem.status in (400, 401, 403) else "warn"
    response = message_page(request, heading, problem.message, status=problem.status, tone=tone)
    for key, value in (problem.headers or {}).items():
        response.headers[key] = value
    return response
