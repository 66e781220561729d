"""Signed one-time links through a live server and a real worker.

GET only shows; POST answers once; tampered, expired, rotated-out and
superseded links are refused with a page saying so, and change nothing.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from celery import Celery

from celery_checkpoint import (
    CheckpointNotFound,
    Checkpoints,
    ImproperlyConfigured,
    ResumeRejected,
    RunRecord,
)
from celery_checkpoint._links import LinkSigner
from celery_checkpoint.model import utcnow
from tests.integration.helpers import Worker, get, wait_until
from tests.integration.proj import read_marks
from tests.web.conftest import KEYS, pause
from tests.web.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def snapshot(checkpoints: Checkpoints, run_id: str) -> bytes:
    run = checkpoints.store.load(run_id)
    assert run is not None, "the run should still be paused"
    assert checkpoints.store.lease(run_id) is None
    return run.to_json()


def browse(url: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
    """Open a link as a browser (or a mail scanner) would: no token, no sign-in."""
    with httpx.Client(timeout=30) as client:
        return client.request(method, url, **kwargs)


def token_url(server: Server, token: str) -> str:
    return f"{server.url}/links/{token}"


def test_opening_a_link_changes_nothing_and_posting_it_answers_once(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server, settings: Any
) -> None:
    result = pause(app, worker, "proj.approve", "order-21")
    link = checkpoints.resume_link(
        result.id, {"approved": True, "approver": "ana"}, actor="ana@shop.example"
    )
    assert link.startswith(f"{server.url}/links/")
    before = snapshot(checkpoints, result.id)
    for _ in range(3):  # a mail scanner, a chat unfurler, the person
        page = browse(link)
        assert page.status_code == 200
        assert "Confirm this answer" in page.text and "order order-21" in page.text
    assert browse(link, "HEAD").status_code in (200, 405)
    assert snapshot(checkpoints, result.id) == before
    assert read_marks(settings.markers, "body", result.id) == []

    answered = browse(link, "POST")
    assert answered.status_code == 200 and "answer recorded" in answered.text
    again = browse(link, "POST")
    assert again.status_code == 200 and "Already answered" in again.text

    assert get(result, worker) == "order-21 approved by ana"
    assert len(read_marks(settings.markers, "body", result.id)) == 1
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.resume is not None
    assert ended.resume.via == "link" and ended.resume.actor == "ana@shop.example"
    assert ended.resume.request_id.startswith("link-")
    later = browse(link, "POST")
    assert later.status_code == 200 and "Already answered" in later.text
    assert len(read_marks(settings.markers, "body", result.id)) == 1


def test_a_link_without_input_shows_the_form_and_answers_with_it(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    result = pause(app, worker, "proj.wait_for", 1)
    link = checkpoints.resume_link(result.id)
    page = browse(link)
    assert page.status_code == 200
    assert 'name="value"' in page.text and 'type="number"' in page.text
    before = snapshot(checkpoints, result.id)
    wrong = browse(link, "POST", data={"value": "lots"})
    assert wrong.status_code == 422
    assert 'aria-invalid="true"' in wrong.text and "valid integer" in wrong.text
    assert 'value="lots"' in wrong.text  # kept for correcting
    assert snapshot(checkpoints, result.id) == before
    assert browse(link, "POST", data={"value": "41"}).status_code == 200
    assert get(result, worker) == 42
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.resume is not None and ended.resume.actor is None


def test_tampered_expired_and_rotated_out_links_are_refused_and_change_nothing(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    result = pause(app, worker, "proj.approve", "order-22")
    good = checkpoints.resume_link(result.id, {"approved": True, "approver": "ana"})
    token = good.rsplit("/", 1)[1]
    payload, signature = token.rsplit(".", 1)
    flipped = payload[:-3] + ("A" if payload[-3] != "A" else "B") + payload[-2:]
    claims = {"r": result.id, "p": 1, "n": "fixed-nonce", "i": {"approved": True, "approver": "x"}}
    past = int(time.time()) - 60
    cases = {
        "payload changed": (token_url(server, f"{flipped}.{signature}"), 400, "not a valid"),
        "signature changed": (token_url(server, f"{payload}.{signature[::-1]}"), 400, "altered"),
        "made up": (token_url(server, "not-a-link"), 400, "not a valid"),
        "expired": (
            token_url(server, LinkSigner(tuple(KEYS)).sign({**claims, "e": past})),
            410,
            "expired",
        ),
        "rotated out": (
            token_url(
                server, LinkSigner(("retired-key-0123456789",)).sign({**claims, "e": past + 3600})
            ),
            410,
            "no longer accepted",
        ),
    }
    before = snapshot(checkpoints, result.id)
    for name, (url, status, words) in cases.items():
        for method in ("GET", "POST"):
            response = browse(url, method)
            assert response.status_code == status, (name, method, response.text)
            assert words in response.text, name
            assert "Nothing was changed" in response.text
    assert snapshot(checkpoints, result.id) == before
    checkpoints.cancel(result.id)


def test_a_link_survives_key_rotation_while_its_key_is_still_listed(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    result = pause(app, worker, "proj.approve", "order-23")
    old_signer = LinkSigner((KEYS[1],))  # signed before "new-key" was put first
    token = old_signer.sign(
        {
            "r": result.id,
            "p": 1,
            "e": int(time.time()) + 3600,
            "n": "rotated-nonce",
            "i": {"approved": False, "approver": "ben"},
        }
    )
    assert browse(token_url(server, token)).status_code == 200
    assert browse(token_url(server, token), "POST").status_code == 200
    assert get(result, worker) == "order-23 refused by ben"


def test_a_link_to_an_earlier_pause_is_superseded(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    result = pause(app, worker, "proj.two_pauses", 5)
    link = checkpoints.resume_link(result.id, "from-the-link")
    checkpoints.resume(result.id, "from-code", request_id="code-1")
    wait_until(
        lambda: (run := checkpoints.store.load(result.id)) is not None and run.pause_seq == 2,
        "the second pause",
        60,
        worker,
    )
    before = snapshot(checkpoints, result.id)
    for method in ("GET", "POST"):
        response = browse(link, method)
        assert response.status_code == 410 and "superseded" in response.text
    assert snapshot(checkpoints, result.id) == before
    checkpoints.resume(result.id, "second")
    assert get(result, worker) == {"x": 5, "first": "from-code", "second": "second"}


def test_a_link_to_a_cancelled_run_says_it_no_longer_waits(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    result = pause(app, worker, "proj.approve", "order-24")
    link = checkpoints.resume_link(result.id, {"approved": True, "approver": "ana"})
    checkpoints.cancel(result.id, "customer left")
    for method in ("GET", "POST"):
        response = browse(link, method)
        assert response.status_code == 410 and "cancelled" in response.text
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.status == "cancelled" and ended.resume is None


def test_a_link_is_checked_when_made_and_never_outlives_the_pause(
    checkpoints: Checkpoints, server: Server
) -> None:
    with pytest.raises(CheckpointNotFound):
        checkpoints.resume_link("no-such-run")
    deadline = utcnow() + timedelta(hours=1)
    record = RunRecord(
        run_id="link-deadline-run",
        task_name="proj.approve",
        step="await_approval",
        expects="tests.integration.proj:Approval",
        expires_at=deadline,
    )
    checkpoints.store.save(record)
    try:
        with pytest.raises(ResumeRejected):
            checkpoints.resume_link(record.run_id, {"approved": "perhaps"})
        link = checkpoints.resume_link(record.run_id, expires_in=timedelta(days=30))
        claims = LinkSigner(tuple(KEYS)).verify(link.rsplit("/", 1)[1])
        assert claims.expires_at <= deadline.timestamp()
        assert claims.run_id == record.run_id and claims.pause_seq == 1
        assert not claims.has_input
    finally:
        checkpoints.store.end(record.run_id, "cancelled")


def test_links_need_a_key_and_an_address(tmp_path: Any) -> None:
    app = Celery("nolinks", broker="memory://")
    app.conf.checkpoint_store = str(tmp_path / "store")
    bare = Checkpoints(app)
    bare.store.save(RunRecord(run_id="r1", task_name="t", step="s"))
    with pytest.raises(ImproperlyConfigured, match="checkpoint_web_secret_keys"):
        bare.resume_link("r1")
    app.conf.checkpoint_web_secret_keys = ["a-key-of-sixteen-chars"]
    bare.reset()
    with pytest.raises(ImproperlyConfigured, match="checkpoint_web_base_url"):
        bare.resume_link("r1")
    app.conf.checkpoint_web_base_url = "https://shop.example/approvals/"
    bare.reset()
    assert bare.resume_link("r1").startswith("https://shop.example/approvals/links/")
