"""Backend-parametrized fixtures for the store contract suite.

Every test that asks for ``store`` or ``store_factory`` runs once per backend:
``[file]`` on a fresh directory, ``[sqlite]`` on a fresh database file,
``[redis]`` under a fresh key prefix in database 15 of ``127.0.0.1:6379``,
``[redis-cluster]`` under a fresh key prefix on a private three-primary Redis
Cluster started once per session, and ``[postgres]`` in a fresh schema of a
database made for the session on ``127.0.0.1:5432``. A backend is done when
this suite passes unchanged.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from celery_checkpoint import CheckpointStore
from tests.conftest import require_server
from tests.contract.helpers import REDIS_URL, StoreFactory


def _redis_backend_built() -> bool:
    try:
        return importlib.util.find_spec("celery_checkpoint.store.redis") is not None
    except ImportError:
        return False


@pytest.fixture(
    params=[
        pytest.param("file", id="file"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", id="redis-cluster", marks=pytest.mark.redis),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens instances of one store under test; children of a test may call it too."""
    if request.param == "file":
        factory = StoreFactory("file", str(tmp_path / "store"))
        yield factory
        factory.close_all()
        return
    if request.param == "sqlite":
        factory = StoreFactory("sqlite", f"sqlite:///{tmp_path / 'store.db'}")
        yield factory
        factory.close_all()
        return

    if request.param == "postgres":
        database = request.getfixturevalue("postgres_database")
        factory = StoreFactory("postgres", f"{database}?schema=t_{uuid4().hex}")
        try:
            yield factory
        finally:
            factory.close_all()
            factory.drop_schema()
        return

    if not _redis_backend_built():
        pytest.skip("redis backend not built yet")
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        require_server("Redis", "127.0.0.1", 6379)
        url = REDIS_URL
    prefix = f"cc-test-{uuid4().hex}"
    factory = StoreFactory("redis", url, {"prefix": prefix})
    try:
        yield factory
    finally:
        factory.close_all()
        factory.delete_matching(prefix + "*")


@pytest.fixture
def store(store_factory: StoreFactory) -> CheckpointStore:
    """The store under test, one per backend; closed (redis: its keys deleted; postgres:
    its schema dropped) afterwards."""
    return store_factory()
