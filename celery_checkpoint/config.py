"""``checkpoint_*`` settings, read once from ``app.conf`` into one object.

=================================  =========  =====================================================
setting                            default    meaning
=================================  =========  =====================================================
``checkpoint_store``               see below  directory, ``file:///dir``, ``redis://host:port/db``
``checkpoint_lease_seconds``       60         how long a claim lasts without a heartbeat
``checkpoint_heartbeat_interval``  lease / 3  seconds between heartbeats while a body runs
``checkpoint_recovery_interval``   30         seconds between recovery passes on each worker
``checkpoint_max_recoveries``      5          recoveries of one run before it is marked failed
``checkpoint_resend_after``        300        seconds a pending resume may wait before re-sent
=================================  =========  =====================================================

The default store is the directory ``$XDG_DATA_HOME/celery-checkpoint/<app name>``
(``~/.local/share/...``): every process of one user on one machine finds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .exceptions import ImproperlyConfigured
from .model import DEFAULT_LEASE_SECONDS

__all__ = ["CheckpointConfig", "default_store_dir"]


def default_store_dir(app_name: str | None) -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "celery-checkpoint", app_name or "default")


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

    @classmethod
    def from_app(cls, app: Any, store: str | None = None) -> CheckpointConfig:
        """Read and validate the ``checkpoint_*`` keys; raise ``ImproperlyConfigured``."""
        conf = app.conf
        target = store or conf.get("checkpoint_store") or default_store_dir(app.main)
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
        )
