"""The inbox over HTTP (no JavaScript): listing, the generated form, CSRF, cancel."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import httpx
import pytest
from celery import Celery

from celery_checkpoint import Checkpoints
from tests.integration.helpers import Worker, get
from tests.web.conftest import pause
from tests.web.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def browser(server: Server) -> Iterator[httpx.Client]:
    """A signed-in person's browser: the hook reads the user from ``x-user``; cookies kept."""
    with httpx.Client(base_url=server.url, headers={"x-user": "ana"}, timeout=30) as client:
        yield client


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no hidden {name} in the page"
    return html.unescape(match.group(1))


def test_the_inbox_lists_paused_runs_and_filters_them(
    app: Celery, checkpoints: Checkpoints, worker: Worker, browser: httpx.Client
) -> None:
    approve = pause(app, worker, "proj.approve", "order-31")
    number = pause(app, worker, "proj.wait_for", 2)
    page = browser.get("/")
    assert page.status_code == 200
    assert approve.id in page.text and number.id in page.text
    assert "order order-31" in page.text  # the reason
    assert page.text.index(approve.id) < page.text.index(number.id)  # oldest first
    newest = browser.get("/", params={"order": "newest"}).text
    assert newest.index(number.id) < newest.index(approve.id)
    only = browser.get("/", params={"task": "proj.approve"}).text
    assert approve.id in only and number.id not in only
    by_step = browser.get("/", params={"step": "await_number"}).text
    assert number.id in by_step and approve.id not in by_step
    checkpoints.cancel(approve.id)
    checkpoints.cancel(number.id)


def test_the_form_keeps_values_shows_errors_beside_fields_and_answers(
    app: Celery, checkpoints: Checkpoints, worker: Worker, browser: httpx.Client
) -> None:
    result = pause(app, worker, "proj.review", "order-32")
    page = browser.get(f"/runs/{result.id}")
    assert page.status_code == 200
    text = page.text
    for name in ("approved", "approver", "quantity", "priority", "tags", "shipping.city"):
        assert f'name="{name}"' in text
    assert '<label for="f-approver">' in text
    form = {
        "csrf_token": hidden(text, "csrf_token"),
        "request_id": hidden(text, "request_id"),
        "pause_seq": "1",
        "approved": "on",
        "approver": "Ana Silva",
        "quantity": "3",
        "priority": '"high"',
        "tags": "fragile\ngift",
        "shipping.city": "Porto",
        "note": "",
    }
    refused = browser.post(f"/runs/{result.id}/resume", data=form)
    assert refused.status_code == 422
    assert 'id="f-approver-error"' in refused.text
    assert re.search(r'id="f-approver"[^>]*aria-describedby="[^"]*f-approver-error', refused.text)
    assert "should match pattern" in refused.text
    assert 'value="Ana Silva"' in refused.text and "fragile\ngift" in refused.text
    run = checkpoints.store.load(result.id)
    assert run is not None and run.resume is None

    form["approver"] = "ana"
    accepted = browser.post(f"/runs/{result.id}/resume", data=form, follow_redirects=False)
    assert accepted.status_code == 303
    assert "Answer recorded" in browser.get(accepted.headers["location"]).text
    twice = browser.post(f"/runs/{result.id}/resume", data=form, follow_redirects=False)
    assert twice.status_code == 303 and twice.headers["location"].endswith("done=again")
    assert get(result, worker) == {
        "order": "order-32",
        "review": {
            "approved": True,
            "approver": "ana",
            "quantity": 3,
            "priority": "high",
            "tags": ["fragile", "gift"],
            "shipping": {"city": "Porto", "express": False},
            "note": None,
        },
    }
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.resume is not None
    assert (ended.resume.actor, ended.resume.via) == ("ana", "inbox")
    done = browser.get(f"/runs/{result.id}").text
    assert "completed" in done and "ana via inbox" in done


def test_a_form_post_without_its_csrf_token_changes_nothing(
    app: Celery, checkpoints: Checkpoints, worker: Worker, browser: httpx.Client, server: Server
) -> None:
    result = pause(app, worker, "proj.approve", "order-33")
    answer = {"approved": "on", "approver": "ana", "pause_seq": "1"}
    assert browser.post(f"/runs/{result.id}/resume", data=answer).status_code == 403
    # A token from another browser (another cookie) does not do either.
    with httpx.Client(base_url=server.url, headers={"x-user": "mallory"}) as other:
        token = hidden(other.get(f"/runs/{result.id}").text, "csrf_token")
    forged = browser.post(f"/runs/{result.id}/resume", data={**answer, "csrf_token": token})
    assert forged.status_code == 403
    assert browser.post(f"/runs/{result.id}/cancel", data={"reason": "x"}).status_code == 403
    run = checkpoints.store.load(result.id)
    assert run is not None and run.resume is None and run.status == "paused"
    checkpoints.cancel(result.id)


def test_the_cancel_button_cancels_the_run_with_its_reason(
    app: Celery, checkpoints: Checkpoints, worker: Worker, browser: httpx.Client
) -> None:
    result = pause(app, worker, "proj.approve", "order-34")
    token = hidden(browser.get(f"/runs/{result.id}").text, "csrf_token")
    response = browser.post(
        f"/runs/{result.id}/cancel",
        data={"csrf_token": token, "reason": "out of stock"},
        follow_redirects=True,
    )
    assert response.status_code == 200 and "The run was cancelled" in response.text
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.status == "cancelled"
    assert ended.ended_reason == "out of stock (by ana)"
    assert result.id not in browser.get("/").text
