"""Fixtures for the web tests: a real worker, a real HTTP server, one per module.

The worker is ``celery -A tests.integration.proj worker`` on the Redis broker
with a file store in a temporary directory; the server is uvicorn on
loopback serving :func:`celery_checkpoint.web.create_app` for the same app.
Both live for a module, so the tests of a module share their start-up; each
test pauses runs of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from celery import Celery
from celery.result import AsyncResult

from celery_checkpoint import PAUSED, Checkpoints
from celery_checkpoint.web import create_app
from tests.conftest import require_server
from tests.integration.conftest import REDIS_URL, make_settings
from tests.integration.helpers import Worker, delete_redis_keys, remove_queue, wait_for_state
from tests.integration.proj import Settings, make_app
from tests.web.server import Server

#: The API token the tests use, and the actor it names.
TOKEN = "test-token-billing-0123456789"
TOKEN_ACTOR = "billing-service"
#: Link keys: the first signs, both verify.
KEYS = ["new-key-0123456789abcdef", "old-key-0123456789abcdef"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    require_server("Redis", "127.0.0.1", 6379)
    settings = make_settings(REDIS_URL, "sqlite", tmp_path_factory.mktemp("web"))
    yield settings
    delete_redis_keys(REDIS_URL, settings.prefix)


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[Celery]:
    app = make_app(settings)
    yield app
    Checkpoints.for_app(app).store.close()
    app.close()


@pytest.fixture(scope="module")
def checkpoints(app: Celery) -> Checkpoints:
    return Checkpoints.for_app(app)


@pytest.fixture(scope="module")
def worker(
    app: Celery, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    worker = Worker(app, settings, tmp_path_factory.mktemp("logs"), name="web")
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()
        remove_queue(app, settings.queue)


def user_header(request: Any) -> str | None:
    """The tests' ``authenticate`` hook: the user a front proxy names in ``x-user``,
    or (for the browser) a ``test_user`` cookie standing in for a session."""
    user = request.headers.get("x-user") or request.cookies.get("test_user")
    return str(user) if user else None


@pytest.fixture(scope="module")
def server(checkpoints: Checkpoints) -> Iterator[Server]:
    server = Server()
    web = create_app(
        checkpoints,
        secret_keys=KEYS,
        tokens={TOKEN: TOKEN_ACTOR},
        authenticate=user_header,
        base_url=server.url,
    )
    server.start(web)
    yield server
    server.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    """A client of the live server, authenticated with the API token."""
    with httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as client:
        yield client


@pytest.fixture
def anonymous(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def pause(app: Celery, worker: Worker, task: str, *args: Any) -> AsyncResult:
    """Send ``task`` and wait until its run is paused."""
    result = app.tasks[task].delay(*args)
    return wait_for_state(result, PAUSED, worker)
