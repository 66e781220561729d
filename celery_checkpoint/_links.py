"""Signed one-time resume links: what a link says, how it is signed and checked.

A link is ``<base_url>/links/<token>``. The token is a JSON payload signed
with ``itsdangerous`` under one of ``checkpoint_web_secret_keys``: the first
key signs, every listed key verifies, so keys rotate by putting a new one
first and dropping the old one once its links have expired. The payload,
all of it under the signature, binds the link to:

* the run and its ``pause_seq`` (a link to an earlier pause is superseded),
* the key id (a short fingerprint of the key) and an expiry no later than the
  pause's deadline,
* a random nonce, which is the resume's ``request_id``: a second click is the
  same answer, never a second resume,
* the preset input, if any (else the page shows the form), and the actor the
  link was made for.

Opening a link (GET) changes nothing; only a POST answers (see
:mod:`celery_checkpoint.web.links`). ``itsdangerous`` comes with the ``[web]``
extra and is imported only when a link is made or read.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import JsonValue

from ._bound import Bound
from .exceptions import CheckpointNotFound, ImproperlyConfigured, PauseExpired
from .model import validate_run_id
from .pause import validate_input

__all__ = [
    "DEFAULT_EXPIRES_IN",
    "LinkClaims",
    "LinkRefused",
    "LinkSettings",
    "LinkSigner",
    "register",
    "resume_link",
    "settings_for",
]

#: How long a link lasts when neither ``expires_in`` nor the pause's deadline is shorter.
DEFAULT_EXPIRES_IN = timedelta(days=7)
_SALT = "celery-checkpoint.resume-link"
_VERSION = 1


def _itsdangerous() -> Any:
    try:
        import itsdangerous
    except ImportError as exc:
        raise ImproperlyConfigured(
            "signed resume links need itsdangerous: pip install 'celery-checkpoint[web]'"
        ) from exc
    return itsdangerous


def key_id(key: str) -> str:
    """A short public fingerprint of ``key``: which key signed a link."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass(frozen=True)
class LinkSettings:
    """Keys (newest first) and the web app's public address."""

    secret_keys: tuple[str, ...]
    base_url: str | None

    def __repr__(self) -> str:
        return f"LinkSettings(keys={len(self.secret_keys)}, base_url={self.base_url!r})"


@dataclass(frozen=True)
class LinkClaims:
    """What a verified link says."""

    run_id: str
    pause_seq: int
    nonce: str
    expires_at: float  #: unix time
    key_id: str
    actor: str | None = None
    has_input: bool = False
    input: JsonValue = None

    @property
    def request_id(self) -> str:
        """The resume's request id: one link, one answer."""
        return f"link-{self.nonce}"


class LinkRefused(Exception):
    """A link that must not answer: ``reason`` is one of ``tampered``, ``expired``,
    ``rotated`` (signed with a key no longer listed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LinkSigner:
    """Signs and checks link tokens with a list of keys: the first signs, all verify."""

    def __init__(self, secret_keys: tuple[str, ...]) -> None:
        if not secret_keys:
            raise ImproperlyConfigured(
                "signed links need a secret key: set checkpoint_web_secret_keys "
                "(or pass secret_keys= to create_app)"
            )
        itsdangerous = _itsdangerous()
        self._serializers = {
            key_id(key): itsdangerous.URLSafeSerializer(key, salt=_SALT) for key in secret_keys
        }
        self._signing_kid = key_id(secret_keys[0])
        self._bad_signature: type[Exception] = itsdangerous.BadSignature

    def sign(self, claims: dict[str, Any]) -> str:
        payload = {"v": _VERSION, "k": self._signing_kid, **claims}
        token: str = self._serializers[self._signing_kid].dumps(payload)
        return token

    def verify(self, token: str, now: float | None = None) -> LinkClaims:
        """The link's claims; ``LinkRefused`` if it was altered, has expired or its
        key is no longer listed."""
        any_serializer = self._serializers[self._signing_kid]
        try:
            _, unverified = any_serializer.loads_unsafe(token)
        except Exception:  # not even a payload: cut short or made up
            unverified = None
        if not isinstance(unverified, dict):
            raise LinkRefused("tampered", "This link is not a valid resume link.")
        serializer = self._serializers.get(str(unverified.get("k")))
        if serializer is None:
            raise LinkRefused(
                "rotated",
                "This link was signed with a key that is no longer accepted; ask for a new link.",
            )
        try:
            payload = serializer.loads(token)
        except self._bad_signature:
            raise LinkRefused("tampered", "This link has been altered.") from None
        try:
            claims = LinkClaims(
                run_id=validate_run_id(payload["r"]),
                pause_seq=int(payload["p"]),
                nonce=str(payload["n"]),
                expires_at=float(payload["e"]),
                key_id=str(payload["k"]),
                actor=payload.get("a"),
                has_input="i" in payload,
                input=payload.get("i"),
            )
        except (KeyError, TypeError, ValueError):
            raise LinkRefused("tampered", "This link is not a valid resume link.") from None
        if (time.time() if now is None else now) >= claims.expires_at:
            raise LinkRefused("expired", "This link has expired; ask for a new link.")
        return claims


_REGISTERED: weakref.WeakKeyDictionary[Any, LinkSettings] = weakref.WeakKeyDictionary()


def register(bound: Bound, settings: LinkSettings) -> None:
    """Links made through ``bound`` in this process use ``settings`` (what
    ``create_app`` was given) over ``app.conf``."""
    _REGISTERED[bound] = settings


def settings_for(bound: Bound) -> LinkSettings:
    found = _REGISTERED.get(bound)
    if found is not None:
        return found
    config = bound.config
    return LinkSettings(config.web_secret_keys, config.web_base_url)


def _seconds(value: timedelta | float | None) -> float:
    if value is None:
        return DEFAULT_EXPIRES_IN.total_seconds()
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expires_in must be a positive duration, not {value!r}")
    return seconds


def resume_link(
    bound: Bound,
    run_id: str,
    input: Any = None,
    *,
    expires_in: timedelta | float | None = None,
    actor: str | None = None,
) -> str:
    """See :meth:`celery_checkpoint.Checkpoints.resume_link`."""
    settings = settings_for(bound)
    signer = LinkSigner(settings.secret_keys)
    if settings.base_url is None:
        raise ImproperlyConfigured(
            "resume links are absolute: set checkpoint_web_base_url to the web app's public "
            "address (or pass base_url= to create_app)"
        )
    run = bound.store.load(validate_run_id(run_id))
    if run is None:
        ended = bound.store.ended(run_id)
        if ended is not None:
            raise ended.ended_error()
        raise CheckpointNotFound(run_id)
    now = time.time()
    expires_at = now + _seconds(expires_in)
    if run.expires_at is not None:
        expires_at = min(expires_at, run.expires_at.timestamp())
        if expires_at <= now:
            raise PauseExpired(f"run {run_id!r} is past its deadline: no link can answer it")
    claims: dict[str, Any] = {
        "r": run.run_id,
        "p": run.pause_seq,
        "e": math.floor(expires_at),
        "n": secrets.token_urlsafe(12),
    }
    if actor is not None:
        claims["a"] = str(actor)
    if input is not None:
        _, stored = validate_input(run, input)  # a link that cannot answer is never sent
        claims["i"] = stored
    return f"{settings.base_url}/links/{signer.sign(claims)}"
