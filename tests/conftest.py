"""Shared fixtures: server and tool checks that skip locally and fail under CI."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING
from uuid import uuid4

import pytest

if TYPE_CHECKING:
    from tests.redis_cluster import RedisCluster

IN_CI = bool(os.environ.get("CI"))
#: The PostgreSQL server the tests use; each session makes a database of its own there.
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"


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


def require_tool(name: str, why: str) -> str:
    """The path of command ``name``; skip (locally) or fail (under CI) without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({why})"
    if IN_CI:
        pytest.fail(f"{message}; CI needs it: apt-get install -y {name}", pytrace=False)
    pytest.skip(f"{message}: apt-get install -y {name} to run this test")


def require(condition: bool, message: str) -> None:
    """Skip (locally) or fail (under CI) unless ``condition`` holds."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{message}; CI needs it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private three-primary Redis Cluster, started once per test session."""
    from tests.redis_cluster import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The URL of a database made for this test session, dropped at its end."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    psycopg = pytest.importorskip("psycopg")
    name = f"cc_test_{uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
