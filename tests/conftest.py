"""Shared fixtures: server checks that skip locally and fail under CI."""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = bool(os.environ.get("CI"))


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI) when ``host:port`` does not answer."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc})"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
