"""Fixtures for tests against real ``celery worker`` processes and real brokers.

Each test gets a fresh :class:`~tests.integration.proj.Settings`: its own queue,
its own Redis key prefix (broker, results and the Redis store all live under
it in database 15), its own marker directory and store. ``broker`` runs every
test on the Redis broker and on RabbitMQ; ``store_kind`` on the file store,
the SQLite store, the Redis store and the PostgreSQL store (a schema of its own
in the session's database). Teardown stops the workers (SIGTERM, then SIGKILL of the
whole process group), deletes the queue and every key under the prefix.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from celery import Celery

from celery_checkpoint import Checkpoints
from tests.conftest import require_server
from tests.integration.helpers import Worker, delete_redis_keys, remove_queue
from tests.integration.proj import Settings, make_app

REDIS_URL = "redis://127.0.0.1:6379/15"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def redis_store_missing() -> str | None:
    """Why the Redis checkpoint store cannot be tested, or None if it imports."""
    try:
        importlib.import_module("celery_checkpoint.store.redis")
    except ModuleNotFoundError as exc:
        if exc.name == "celery_checkpoint.store.redis":
            return "celery_checkpoint/store/redis.py does not exist yet"
        return f"celery_checkpoint.store.redis does not import: {exc}"
    except Exception as exc:
        return f"celery_checkpoint.store.redis does not import: {exc!r}"
    return None


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.redis]),
    ]
)
def broker(request: pytest.FixtureRequest) -> str:
    """The broker URL; the result backend is Redis in both cases."""
    require_server("Redis", "127.0.0.1", 6379)
    if request.param == "rabbitmq":
        require_server("RabbitMQ", "127.0.0.1", 5672)
        return AMQP_URL
    return REDIS_URL


@pytest.fixture(
    params=[
        "file",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        request.getfixturevalue("postgres_database")  # skips, or fails under CI, if absent
    if request.param == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        missing = redis_store_missing()
        if missing:
            pytest.skip(f"Redis checkpoint store not tested: {missing}")
    return str(request.param)


#: The stores the RabbitMQ broker runs with: the broker matters to message flow,
#: which every store sees alike; the full store matrix runs on the Redis broker.
RABBITMQ_STORES = frozenset({"sqlite"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep RabbitMQ x store combinations to ``RABBITMQ_STORES``."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("broker") == "rabbitmq" and params.get("store_kind", "sqlite") not in (
            RABBITMQ_STORES
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def make_settings(
    broker: str,
    store_kind: str,
    tmp_path: Path,
    *,
    redis_store_url: str = REDIS_URL,
    postgres_database: str | None = None,
    **options: Any,
) -> Settings:
    """``store_kind`` "file", "sqlite", a Redis store at ``redis_store_url`` (a cluster
    node too), or "postgres": a schema of its own in ``postgres_database``."""
    prefix = f"cc-it-{uuid4().hex[:12]}"
    markers = tmp_path / "markers"
    markers.mkdir()
    if store_kind == "file":
        store = str(tmp_path / "store")
    elif store_kind == "sqlite":
        store = f"sqlite:///{tmp_path / 'store.db'}"
    elif store_kind == "postgres":
        assert postgres_database is not None
        store = f"{postgres_database}?schema={prefix.replace('-', '_')}"
    else:
        store = f"{redis_store_url}?prefix={prefix}:store:"
    return Settings(
        broker=broker,
        backend=REDIS_URL,
        store=store,
        markers=str(markers),
        queue=prefix,
        prefix=prefix,
        **options,
    )


@pytest.fixture
def settings(
    broker: str, store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    database = request.getfixturevalue("postgres_database") if store_kind == "postgres" else None
    settings = make_settings(broker, store_kind, tmp_path, postgres_database=database)
    yield settings
    delete_redis_keys(REDIS_URL, settings.prefix)


@pytest.fixture
def app(settings: Settings) -> Iterator[Celery]:
    """The test process's side of the app: sends tasks, resumes, reads results."""
    app = make_app(settings)
    yield app
    Checkpoints.for_app(app).store.close()
    app.close()


@pytest.fixture
def checkpoints(app: Celery) -> Checkpoints:
    return Checkpoints.for_app(app)


class Workers:
    """Starts workers for one test and stops every one of them at teardown."""

    def __init__(self, app: Celery, settings: Settings, log_dir: Path) -> None:
        self.app = app
        self.settings = settings
        self.log_dir = log_dir
        self.started: list[Worker] = []

    def start(
        self,
        name: str = "w",
        *,
        concurrency: int = 2,
        ready: bool = True,
        pool: str = "prefork",
        options: tuple[str, ...] = (),
        **overrides: Any,
    ) -> Worker:
        """A new worker; ``overrides`` replace worker-side settings (lease, recovery...),
        ``options`` are added to its command line."""
        settings = replace(self.settings, **overrides)
        worker = Worker(
            self.app,
            settings,
            self.log_dir,
            name=name,
            concurrency=concurrency,
            pool=pool,
            options=options,
        )
        self.started.append(worker)
        return worker.wait_ready() if ready else worker

    def stop_all(self) -> None:
        # The test is over: no need to wait for a warm shutdown (seconds on RabbitMQ).
        for worker in self.started:
            worker.kill()


@pytest.fixture
def workers(app: Celery, settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    pool = Workers(app, settings, log_dir)
    try:
        yield pool
    finally:
        pool.stop_all()
        remove_queue(app, settings.queue)
