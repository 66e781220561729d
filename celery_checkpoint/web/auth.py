"""Who is asking: bearer tokens, the host application's ``authenticate`` hook, CSRF.

**Closed by default.** Every request but a signed link (and the stylesheet its
page uses) needs an actor: a bearer token from ``checkpoint_web_tokens``
(``Authorization: Bearer <token>``, the actor is the name the token maps to)
or the ``authenticate(request)`` hook returning one (a user name, an e-mail).
With neither configured nothing else answers but 401.

Forms carry a CSRF token: a random value in an HTTP-only, ``SameSite=Lax``
cookie, and the same value signed with the app's secret key in a hidden field;
a POST whose two do not match changes nothing. API calls need
``Content-Type: application/json``, which a cross-site form cannot send.
"""

from __future__ import annotations

import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._links import _itsdangerous

__all__ = [
    "OPEN_PATHS",
    "Authenticate",
    "Authentication",
    "Csrf",
    "Identity",
    "actor_of",
    "app_root",
    "route_path",
]

#: ``authenticate(request) -> actor | None``, plain or ``async``.
Authenticate = Callable[[Request], str | Awaitable[str | None] | None]

#: Paths that answer without an actor: a signed link is its own credential.
OPEN_PATHS = ("/links/", "/static/")


_ROOT = "celery_checkpoint.root_path"


def app_root(scope: Scope) -> str:
    """Where this app is mounted (``root_path`` as the app saw it, before its own
    mounts such as ``/api`` extended it)."""
    root: str = scope.get(_ROOT, scope.get("root_path", ""))
    return root


def route_path(scope: Scope) -> str:
    """The path inside this app, wherever it is mounted."""
    path: str = scope["path"]
    root = app_root(scope)
    return path[len(root) :] if root and path.startswith(root) else path


def actor_of(request: Request) -> str | None:
    """The actor the middleware found for ``request`` (None on open paths)."""
    actor = getattr(request.state, "actor", None)
    return actor if isinstance(actor, str) else None


class Identity:
    """Finds who a request comes from: a bearer token, else the hook."""

    def __init__(self, authenticate: Authenticate | None, tokens: Mapping[str, str]) -> None:
        self.authenticate = authenticate
        self.tokens = [(token.encode(), actor) for token, actor in tokens.items()]

    @property
    def closed(self) -> bool:
        """No way in: neither a hook nor a token is configured."""
        return self.authenticate is None and not self.tokens

    async def identify(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            given = credentials.strip().encode()
            found = None
            for token, actor in self.tokens:  # every token compared: no timing hint
                if hmac.compare_digest(token, given):
                    found = actor
            if found is not None:
                return found
        if self.authenticate is None:
            return None
        named: Any = self.authenticate(request)
        if inspect.isawaitable(named):
            named = await named
        return str(named) if named else None


class Authentication:
    """ASGI middleware: find the request's actor or answer 401 with ``refuse``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        identity: Identity,
        refuse: Callable[[Request, str], Response],
    ) -> None:
        self.app = app
        self.identity = identity
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault(_ROOT, scope.get("root_path", ""))
        if scope["type"] != "http" or route_path(scope).startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        actor = await self.identity.identify(request)
        if actor is None:
            if self.identity.closed:
                why = (
                    "no authentication is configured: set checkpoint_web_tokens for the API, "
                    "or pass authenticate= to create_app"
                )
            else:
                why = "authentication required"
            await self.refuse(request, why)(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = actor
        await self.app(scope, receive, send)


class Csrf:
    """Double-submit CSRF tokens: a cookie and its signed copy in the form."""

    cookie = "checkpoint_csrf"
    field = "csrf_token"

    def __init__(self, secret_keys: tuple[str, ...]) -> None:
        itsdangerous = _itsdangerous()
        # itsdangerous signs with the last key of a list and verifies with all.
        keys = list(reversed(secret_keys)) or [secrets.token_urlsafe(32)]
        self._serializer = itsdangerous.URLSafeSerializer(keys, salt="celery-checkpoint.csrf")
        self._bad: type[Exception] = itsdangerous.BadData

    def issue(self, request: Request) -> tuple[str, str | None]:
        """The form's token, and the cookie to set (None: the request has one already)."""
        value = request.cookies.get(self.cookie)
        fresh = None
        if not value or len(value) > 100:
            value = fresh = secrets.token_urlsafe(18)
        token: str = self._serializer.dumps(value)
        return token, fresh

    def valid(self, request: Request, token: object) -> bool:
        value = request.cookies.get(self.cookie)
        if not value or not isinstance(token, str):
            return False
        try:
            signed = self._serializer.loads(token)
        except self._bad:
            return False
        return isinstance(signed, str) and hmac.compare_digest(signed, value)

    def set_cookie(self, request: Request, response: Response, value: str | None) -> None:
        if value is None:
            return
        root = app_root(request.scope)
        response.set_cookie(
            self.cookie,
            value,
            path=f"{root}/",
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
