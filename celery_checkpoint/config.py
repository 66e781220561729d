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
=================================  =========  =====================================================

The default store is the SQLite database
``$XDG_DATA_HOME/celery-checkpoint/<app name>.db`` (``~/.local/share/...``), as
``sqlite:////`` + that absolute path: every process of one user on one machine
finds it. Its directory is created 0700 (records hold personal data).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .exceptions import ImproperlyConfigured

__all__ = ["CheckpointConfig", "default_store", "default_store_dir"]

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
    lease_seconds: float = 60.0
    heartbeat_interval: float = 20.0
    recovery_interval: float = 30.0
    max_recoveries: int = 5
    resend_after: float = 300.0

    @classmethod
    def from_app(cls, app: Any, store: str | None = None) -> CheckpointConfig:
        """Read and validate the ``checkpoint_*`` keys; raise ``ImproperlyConfigured``."""
        conf = app.conf
        target = store or conf.get("checkpoint_store") or default_store(app.main)
        lease = _number(conf, "checkpoint_lease_seconds", 60.0, minimum=0.1)
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
        )
