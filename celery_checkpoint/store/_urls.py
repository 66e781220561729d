"""Showing a store URL: its password never appears in a message or a log line."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact"]


def redact(url: str) -> str:
    """The URL with its password (in the user part or a ``password=`` query
    parameter) shown as ``***``; anything that is not such a URL unchanged."""
    base, sep, query = url.partition("?")
    try:
        parts = urlsplit(base)
        password = parts.password
    except ValueError:  # not a URL (a bad port, say): nothing to hide in it
        password = None
    if password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        base = urlunsplit(parts._replace(netloc=user + netloc))
        if "//" not in base:  # urlunsplit drops an empty authority's slashes
            base = base.replace(":", "://", 1)
    if sep:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs])
    return base + sep + query
