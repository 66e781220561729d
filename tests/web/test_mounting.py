"""The web app mounted under a path of a host application, behind the host's login.

FastAPI (ASGI) mounts it directly; Flask (WSGI) through a2wsgi's
``ASGIMiddleware``. In both the ``authenticate`` hook reads the host's own
session, links and pages carry the mount path, and the API answers under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.middleware.sessions import SessionMiddleware

from celery_checkpoint import Checkpoints, RunRecord
from celery_checkpoint.web import create_app

KEY = "mount-key-0123456789abcdef"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Iterator[Checkpoints]:
    app = Celery("mounted", broker="memory://", backend="cache+memory://")
    app.conf.checkpoint_store = str(tmp_path / "store")
    checkpoints = Checkpoints(app)
    checkpoints.store.save(
        RunRecord(
            run_id="order-51",
            task_name="shop.ship",
            step="await_approval",
            reason="order 51",
            expects="tests.integration.proj:Approval",
            expects_schema={
                "type": "object",
                "properties": {
                    "approved": {"type": "boolean", "title": "Approved"},
                    "approver": {"type": "string", "title": "Approver"},
                },
                "required": ["approved", "approver"],
            },
        )
    )
    yield checkpoints
    checkpoints.store.close()


def test_mounted_in_fastapi_behind_its_session_login(checkpoints: Checkpoints) -> None:
    host = FastAPI()
    host.add_middleware(SessionMiddleware, secret_key="host-session-key-0123456789")

    @host.post("/login")
    def login(request: Request) -> dict[str, str]:
        request.session["user"] = "ana"
        return {"ok": "yes"}

    web = create_app(
        checkpoints,
        secret_keys=[KEY],
        authenticate=lambda request: request.session.get("user"),
        base_url="http://testserver/approvals",
    )
    host.mount("/approvals", web)
    with TestClient(host) as client:
        assert client.get("/approvals/").status_code == 401
        assert client.get("/approvals/api/runs").status_code == 401
        assert client.post("/login").status_code == 200
        inbox = client.get("/approvals/")
        assert inbox.status_code == 200 and "ana" in inbox.text
        assert 'href="/approvals/runs/order-51"' in inbox.text
        assert 'href="/approvals/static/checkpoint.css"' in inbox.text
        assert client.get("/approvals/static/checkpoint.css").status_code == 200
        runs = client.get("/approvals/api/runs").json()["runs"]
        assert [run["run_id"] for run in runs] == ["order-51"]
        document = client.get("/approvals/api/openapi.json").json()
        assert document["servers"] == [{"url": "/approvals/api"}]
        page = client.get("/approvals/runs/order-51")
        assert 'action="/approvals/runs/order-51/resume"' in page.text
        assert "checkpoint_csrf" in page.headers["set-cookie"]
        assert "Path=/approvals/" in page.headers["set-cookie"]

        link = checkpoints.resume_link("order-51", {"approved": True, "approver": "ana"})
        assert link.startswith("http://testserver/approvals/links/")
        assert client.get(link).status_code == 200
        assert "No longer" not in client.get(link).text


def test_mounted_in_flask_through_a2wsgi_behind_its_session_login(
    checkpoints: Checkpoints,
) -> None:
    from a2wsgi import ASGIMiddleware
    from flask import Flask, session
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    host = Flask("host")
    host.secret_key = "host-session-key-0123456789"

    @host.post("/login")
    def login() -> str:
        session["user"] = "ben"
        return "ok"

    def flask_user(request: Any) -> str | None:
        """Read Flask's signed session cookie: who is signed in to the host app."""
        cookie = request.cookies.get(host.config["SESSION_COOKIE_NAME"])
        serializer = host.session_interface.get_signing_serializer(host)  # type: ignore[attr-defined]
        if not cookie or serializer is None:
            return None
        try:
            data = serializer.loads(cookie, max_age=86400)
        except Exception:
            return None
        user = data.get("user")
        return str(user) if user else None

    web = create_app(checkpoints, secret_keys=[KEY], authenticate=flask_user)
    host.wsgi_app = DispatcherMiddleware(host.wsgi_app, {"/approvals": ASGIMiddleware(web)})  # type: ignore[method-assign]
    client = host.test_client()
    assert client.get("/approvals/").status_code == 401
    client.post("/login")
    inbox = client.get("/approvals/")
    assert inbox.status_code == 200
    assert b"ben" in inbox.data and b'href="/approvals/runs/order-51"' in inbox.data
    detail = client.get("/approvals/api/runs/order-51")
    assert detail.status_code == 200 and detail.json["step"] == "await_approval"
    refused = client.post(
        "/approvals/api/runs/order-51/resume", json={"input": {"approved": 3, "approver": "ben"}}
    )
    assert refused.status_code == 422
    assert refused.json["error"]["details"][0]["loc"] == ["approved"]
