"""Answer a paused run without writing Python: a JSON API, signed links, an inbox.

::

    from celery_checkpoint.web import create_app

    web = create_app(checkpoints, authenticate=lambda request: request.session.get("user"))
    fastapi_app.mount("/approvals", web)          # or alone: celery -A shop checkpoint serve

``create_app`` returns an ASGI app (Starlette; ``pip install
'celery-checkpoint[web]'``) that mounts under any path of a FastAPI or
Starlette app, of Flask or Django through an ASGI-to-WSGI adapter (a2wsgi),
or serves alone. Routes, all relative to where it is mounted:

==============================  ====================================================
``/``                           the inbox: paused runs, filtered and paged
``/runs/{run_id}``              one run, with the form drawn from its ``expects``
``/links/{token}``              a signed one-time link (GET shows, POST answers)
``/api/...``                    the JSON API (:mod:`.api`), ``/api/openapi.json``
``/metrics``                    Prometheus metrics by task and step (:mod:`.metrics`)
==============================  ====================================================

Settings come from ``app.conf`` (``checkpoint_web_secret_keys``,
``checkpoint_web_base_url``, ``checkpoint_web_tokens``); the arguments of
``create_app`` override them. Closed by default: see :mod:`.auth`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ImproperlyConfigured

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImproperlyConfigured(
        f"celery_checkpoint.web needs the web extra ({exc.name} is missing): "
        "pip install 'celery-checkpoint[web]'"
    ) from exc

from .. import config as _config
from .._links import LinkSettings, LinkSigner, register
from ..exceptions import CheckpointError
from . import api, inbox, links, metrics
from .auth import Authenticate, Authentication, Csrf, Identity, route_path
from .errors import Problem, problem_for
from .pages import HERE, Web, make_templates, problem_page

if TYPE_CHECKING:
    from ..checkpoints import Checkpoints

__all__ = ["create_app"]

logger = logging.getLogger("celery_checkpoint.web")


def _wants_json(request: Request) -> bool:
    path = route_path(request.scope)
    return path.startswith(("/api/", "/metrics")) or path == "/api"


def _problem(request: Request, problem: Problem) -> Response:
    return api.json_error(problem) if _wants_json(request) else problem_page(request, problem)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    message = {404: "no such path", 405: f"{request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail)
    )
    return _problem(
        request,
        Problem(
            exc.status_code, codes.get(exc.status_code, "http_error"), message, headers=exc.headers
        ),
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.ApiError)
    return _problem(request, exc.problem)


async def _checkpoint_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CheckpointError)
    return _problem(request, problem_for(exc))


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("web request %s %s failed", request.method, request.url.path, exc_info=exc)
    return _problem(request, Problem(500, "internal_error", "an internal error occurred"))


def _refuse(request: Request, why: str) -> Response:
    problem = Problem(401, "unauthenticated", why, headers={"www-authenticate": "Bearer"})
    if _wants_json(request):
        return api.json_error(problem)
    page = problem_page(request, problem)
    return page


def create_app(
    checkpoints: Checkpoints,
    *,
    secret_keys: str | Sequence[str] | None = None,
    authenticate: Authenticate | None = None,
    tokens: Mapping[str, str] | None = None,
    base_url: str | None = None,
    title: str = "Paused runs",
    debug: bool = False,
) -> Starlette:
    """The ASGI app answering ``checkpoints``' paused runs (see the module docstring).

    ``secret_keys`` sign links and forms (first signs, all verify),
    ``authenticate(request) -> actor | None`` lets the host application's
    login in (plain or ``async``), ``tokens`` maps API bearer tokens to the
    actor each names, ``base_url`` is the app's public address for absolute
    links. Each overrides its ``checkpoint_web_*`` setting. Links made with
    ``checkpoints.resume_link`` in this process use the same keys and address.
    Raises ``ImproperlyConfigured`` for a bad setting.
    """
    conf = checkpoints.config
    keys = (
        conf.web_secret_keys
        if secret_keys is None
        else _config.secret_keys(secret_keys, "secret_keys")
    )
    bearer = conf.web_tokens if tokens is None else _config.tokens(dict(tokens), "tokens")
    address = conf.web_base_url if base_url is None else _config.base_url(base_url, "base_url")
    if secret_keys is not None or base_url is not None:
        register(checkpoints, LinkSettings(keys, address))
    identity = Identity(authenticate, bearer)
    if identity.closed:
        logger.warning(
            "celery-checkpoint web: no authentication configured, everything but signed links "
            "answers 401 (set checkpoint_web_tokens, or pass authenticate= to create_app)"
        )
    web = Web(
        checkpoints=checkpoints,
        links=LinkSigner(keys) if keys else None,
        csrf=Csrf(keys),
        identity=identity,
        templates=make_templates(),
        site=title,
    )
    api_mount = Mount("/api", routes=api.routes)
    routes: list[Any] = [
        Route("/", inbox.index, methods=["GET"], name="inbox"),
        Route("/runs/{run_id}", inbox.run_page, methods=["GET"], name="run"),
        Route("/runs/{run_id}/resume", inbox.resume, methods=["POST"]),
        Route("/runs/{run_id}/cancel", inbox.cancel, methods=["POST"]),
        Route("/links/{token}", links.link_page, methods=["GET", "POST"], name="link"),
        Route("/metrics", metrics.metrics, methods=["GET"]),
        api_mount,
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        debug=debug,
        routes=routes,
        middleware=[Middleware(Authentication, identity=identity, refuse=_refuse)],
        exception_handlers={
            HTTPException: _http_error,
            api.ApiError: _api_error,
            CheckpointError: _checkpoint_error,
            Exception: _server_error,
        },
    )
    # "/api/runs/" is not "/api/runs": no redirect the API document does not describe.
    app.router.redirect_slashes = False
    api_router: Any = api_mount.app
    api_router.redirect_slashes = False
    app.state.web = web
    app.state.metrics = metrics.registry_for(lambda: checkpoints.store)
    return app
