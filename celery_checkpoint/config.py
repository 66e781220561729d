"""``checkpoint_*`` settings, read once from ``app.conf`` into one object.

=================================  =========  =====================================================
setting                            default    meaning
=================================  =========  =====================================================
``checkpoint_store``               see below  ``sqlite:////abs/app.db``, a directory,
                                              ``file:///dir``, ``redis://host:port/db``
``checkpoint_lease_seconds``       60         how long a claim lasts without a heartbeat
``checkpoint_heartbeat_interval``  lease / 3  seconds between heartbeats while a body runs
``checkpoint_recovery_interval``   30         seconds between recovery passes on each worker
``checkpoint_max_recoveries``      5          recoveries of one run before it is marked failed
``checkpoint_resend_after``        300        seconds a pending resume may wait before re-sent
``checkpoint_early_answer_ttl``    86400      seconds an answer to a key no pause holds yet is kept
``checkpoint_web_secret_keys``     none       signing keys, newest first: first signs, all verify
``checkpoint_web_base_url``        none       the web app's public address, for absolute links
``checkpoint_web_tokens``          none       API bearer tokens and the actor each names
=================================  =========  =====================================================

The default store is the SQLite database
``$XDG_DATA_HOME/celery-checkpoint/<app name>.db`` (``~/.local/share/...``), as
``sqlite:////`` + that absolute path: every process of one user on one machine
finds it. Its directory is created 0700 (records hold personal data).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .exceptions import ImproperlyConfigured
from .model import DEFAULT_LEASE_SECONDS

__all__ = [
    "CheckpointConfig",
    "base_url",
    "default_store",
    "default_store_dir",
    "secret_keys",
    "tokens",
]

logger = logging.getLogger("celery_checkpoint")


def _data_home() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(os.path.abspath(base), "celery-checkpoint")


def default_store(app_name: str | None) -> str:
    """The default store's URL: ``sqlite:////<data home>/celery-checkpoint/<app>.db``.

    Creates the directory (0700) so that the first process to start does not
    race the others to it. Where the former default, a file store directory
    beside it, holds runs and the database does not exist yet, that directory
    stays the default (with a warning): a new release must not lose sight of
    paused runs. ``celery checkpoint migrate`` moves them.
    """
    directory = _data_home()
    database = os.path.join(directory, f"{app_name or 'default'}.db")
    legacy = default_store_dir(app_name)
    if not os.path.exists(database) and _holds_runs(legacy):
        logger.warning(
            "checkpoint store: keeping the file store at %s, which holds runs; the default "
            "is now the SQLite database %s (set checkpoint_store to choose)",
            legacy,
            database,
        )
        return legacy
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"cannot create the default checkpoint store directory {directory} ({exc}); "
            "set checkpoint_store"
        ) from exc
    return "sqlite:///" + database


def _holds_runs(directory: str) -> bool:
    for kind in ("paused", "ended"):
        try:
            with os.scandir(os.path.join(directory, kind)) as entries:
                if any(entry.name.endswith(".json") for entry in entries):
                    return True
        except OSError:
            continue
    return False


def default_store_dir(app_name: str | None) -> str:
    """The file store directory that was the default before the SQLite store; kept for
    callers that name it (a file store left there is not read by the new default)."""
    return os.path.join(_data_home(), app_name or "default")


def _number(conf: Any, key: str, default: float, *, minimum: float) -> float:
    value = conf.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{key} must be a number of seconds, not {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{key} must be at least {minimum}, not {value!r}")
    return number


@dataclass(frozen=True)
class CheckpointConfig:
    store: str
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    heartbeat_interval: float = 20.0
    recovery_interval: float = 30.0
    max_recoveries: int = 5
    resend_after: float = 300.0
    early_answer_ttl: float = 86400.0
    #: Secrets stay out of ``repr``: a config object ends up in logs and tracebacks.
    web_secret_keys: tuple[str, ...] = field(default=(), repr=False)
    web_base_url: str | None = None
    web_tokens: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_app(cls, app: Any, store: str | None = None) -> CheckpointConfig:
        """Read and validate the ``checkpoint_*`` keys; raise ``ImproperlyConfigured``."""
        conf = app.conf
        target = store or conf.get("checkpoint_store") or default_store(app.main)
        lease = _number(conf, "checkpoint_lease_seconds", DEFAULT_LEASE_SECONDS, minimum=0.1)
        heartbeat = _number(conf, "checkpoint_heartbeat_interval", lease / 3, minimum=0.01)
        if heartbeat >= lease:
            raise ImproperlyConfigured(
                f"checkpoint_heartbeat_interval ({heartbeat}) must be shorter than "
                f"checkpoint_lease_seconds ({lease}), or leases expire while bodies run"
            )
        recoveries = conf.get("checkpoint_max_recoveries", 5)
        if not isinstance(recoveries, int) or isinstance(recoveries, bool) or recoveries < 0:
            raise ImproperlyConfigured(
                f"checkpoint_max_recoveries must be a whole number >= 0, not {recoveries!r}"
            )
        return cls(
            store=str(target),
            lease_seconds=lease,
            heartbeat_interval=heartbeat,
            recovery_interval=_number(conf, "checkpoint_recovery_interval", 30.0, minimum=0.05),
            max_recoveries=recoveries,
            resend_after=_number(conf, "checkpoint_resend_after", 300.0, minimum=0.0),
            early_answer_ttl=_number(conf, "checkpoint_early_answer_ttl", 86400.0, minimum=0.001),
            web_secret_keys=secret_keys(conf.get("checkpoint_web_secret_keys")),
            web_base_url=base_url(conf.get("checkpoint_web_base_url")),
            web_tokens=tokens(conf.get("checkpoint_web_tokens")),
        )


def secret_keys(value: Any, name: str = "checkpoint_web_secret_keys") -> tuple[str, ...]:
    """One key or a list of them, newest first; each at least 16 characters."""
    if value is None:
        return ()
    keys = [value] if isinstance(value, str | bytes) else value
    if not isinstance(keys, list | tuple):
        raise ImproperlyConfigured(f"{name} must be a key or a list of keys, not {value!r}")
    checked: list[str] = []
    for key in keys:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "surrogateescape")
        if not isinstance(key, str) or len(key) < 16:
            raise ImproperlyConfigured(
                f"{name}: every key must be a string of at least 16 characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        checked.append(key)
    return tuple(checked)


def base_url(value: Any, name: str = "checkpoint_web_base_url") -> str | None:
    """An absolute http(s) address, kept without its trailing slash."""
    if value is None or value == "":
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ImproperlyConfigured(
            f"{name} must be an absolute http(s) address such as "
            f"https://shop.example/approvals, not {value!r}"
        )
    if parts.query or parts.fragment:
        raise ImproperlyConfigured(f"{name} must not carry a query or fragment: {value!r}")
    return str(value).rstrip("/")


def tokens(value: Any, name: str = "checkpoint_web_tokens") -> dict[str, str]:
    """``{token: actor}``: each bearer token names who uses it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImproperlyConfigured(
            f'{name} must map each token to the actor it names, e.g. {{"s3cr3t...": "billing"}}'
        )
    for token, actor in value.items():
        if not isinstance(token, str) or len(token) < 16:
            raise ImproperlyConfigured(f"{name}: every token must be at least 16 characters")
        if not isinstance(actor, str) or not actor:
            raise ImproperlyConfigured(f"{name}: every token must name its actor (a string)")
    return dict(value)
