"""Checkpoint stores, chosen by URL scheme from one alias table."""

from __future__ import annotations

import importlib
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from ..exceptions import ImproperlyConfigured
from .base import DEFAULT_LEASE_SECONDS, CheckpointStore, RunInfo

__all__ = ["BACKENDS", "DEFAULT_LEASE_SECONDS", "CheckpointStore", "RunInfo", "open_store"]

_URL_WITHOUT_SLASHES = re.compile(r"(file|redis|rediss|unix):(?!//)", re.IGNORECASE)

#: scheme -> "module:Class"; a plain path means the file backend.
BACKENDS: dict[str, str] = {
    "file": "celery_checkpoint.store.file:FileStore",
    "redis": "celery_checkpoint.store.redis:RedisStore",
    "rediss": "celery_checkpoint.store.redis:RedisStore",
    "unix": "celery_checkpoint.store.redis:RedisStore",
}


def open_store(target: str | os.PathLike[str] | CheckpointStore, **options: Any) -> CheckpointStore:
    """See :meth:`CheckpointStore.open`."""
    if isinstance(target, CheckpointStore):
        return target
    text = os.fspath(target)
    if not text:
        raise ImproperlyConfigured("empty checkpoint store target: give a directory or a URL")
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if not scheme and _URL_WITHOUT_SLASHES.match(text):
        raise ImproperlyConfigured(
            f"checkpoint store target {text!r} looks like a URL without '//': write "
            "file:///absolute/dir or redis://host:port/db, or a plain directory path"
        )
    if not scheme:
        from .file import FileStore

        return FileStore(text, **options)
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise ImproperlyConfigured(
            f"unknown checkpoint store scheme {scheme!r} in {text!r}: use a directory path or "
            f"one of {known}"
        )
    module_name, _, cls_name = BACKENDS[scheme].partition(":")
    module = importlib.import_module(module_name)
    backend: Any = getattr(module, cls_name)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ImproperlyConfigured(
                f"file store URL {text!r} names host {parts.netloc!r}: the file store is local; "
                "use file:///absolute/dir (three slashes)"
            )
        file_store: CheckpointStore = backend(unquote(parts.path), **options)
        return file_store
    store: CheckpointStore = backend(text, **options)
    return store
