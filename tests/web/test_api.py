"""The JSON API through a real HTTP server and a real worker: every status, one body shape."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from celery import Celery

from celery_checkpoint import Checkpoints
from celery_checkpoint.web import create_app
from tests.integration.helpers import Worker, get, wait_until
from tests.integration.proj import read_marks
from tests.web.conftest import TOKEN, TOKEN_ACTOR, pause
from tests.web.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The one error body shape, checked; returns its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def test_without_a_token_or_a_user_everything_but_links_answers_401(
    anonymous: httpx.Client,
) -> None:
    for path in ("/api/runs", "/api/runs/x", "/api/openapi.json", "/metrics", "/api/nowhere"):
        error = error_of(anonymous.get(path), 401)
        assert error["code"] == "unauthenticated"
    refused = anonymous.get("/api/runs", headers={"authorization": "Bearer not-the-token"})
    assert error_of(refused, 401)["code"] == "unauthenticated"
    assert refused.headers["www-authenticate"] == "Bearer"
    page = anonymous.get("/")
    assert page.status_code == 401 and "text/html" in page.headers["content-type"]
    assert anonymous.post("/api/runs/x/resume", json={}).status_code == 401


def test_an_app_with_no_authentication_configured_is_closed(checkpoints: Checkpoints) -> None:
    server = Server()
    server.start(create_app(checkpoints))
    try:
        with httpx.Client(base_url=server.url) as client:
            for path in ("/", "/api/runs", "/metrics"):
                response = client.get(path, headers={"authorization": f"Bearer {TOKEN}"})
                assert response.status_code == 401
            assert "no authentication is configured" in client.get("/api/runs").text
    finally:
        server.stop()


def test_resume_accepts_once_records_the_actor_and_the_run_completes(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client, settings: Any
) -> None:
    result = pause(app, worker, "proj.approve", "order-7")
    run_id = result.id
    detail = http.get(f"/api/runs/{run_id}").json()
    assert detail["status"] == "paused" and detail["step"] == "await_approval"
    assert detail["expects_schema"]["required"] == ["approved", "approver"]
    assert detail["reason"] == "order order-7"

    body = {"input": {"approved": True, "approver": "ana"}, "request_id": "req-7", "pause_seq": 1}
    accepted = http.post(f"/api/runs/{run_id}/resume", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "accepted"
    assert accepted.json()["request_id"] == "req-7"

    again = http.post(f"/api/runs/{run_id}/resume", json=body)
    assert again.status_code == 200 and again.json()["status"] == "already answered"

    other = dict(body, request_id="req-other")
    assert get(result, worker) == "order-7 approved by ana"
    ended = checkpoints.store.ended(run_id)
    assert ended is not None and ended.resume is not None
    assert (ended.resume.actor, ended.resume.via) == (TOKEN_ACTOR, "api")
    assert len(read_marks(settings.markers, "body", run_id)) == 1

    # After completion: the same request is the same answer; any other is refused.
    assert http.post(f"/api/runs/{run_id}/resume", json=body).status_code == 200
    assert error_of(http.post(f"/api/runs/{run_id}/resume", json=other), 410)["code"] == (
        "completed"
    )
    done = http.get(f"/api/runs/{run_id}").json()
    assert done["status"] == "completed"
    assert done["answer"]["actor"] == TOKEN_ACTOR and done["answer"]["via"] == "api"
    assert len(read_marks(settings.markers, "body", run_id)) == 1


def test_the_authenticate_hook_names_the_actor(
    app: Celery, checkpoints: Checkpoints, worker: Worker, anonymous: httpx.Client
) -> None:
    result = pause(app, worker, "proj.wait_for", 1)
    response = anonymous.post(
        f"/api/runs/{result.id}/resume", json={"input": 41}, headers={"x-user": "ana@shop"}
    )
    assert response.status_code == 202
    assert get(result, worker) == 42
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.resume is not None
    assert (ended.resume.actor, ended.resume.via) == ("ana@shop", "api")


def test_an_answer_that_does_not_validate_gets_422_with_pydantics_errors(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    result = pause(app, worker, "proj.approve", "order-8")
    refused = http.post(f"/api/runs/{result.id}/resume", json={"input": {"approved": "maybe"}})
    error = error_of(refused, 422)
    assert error["code"] == "invalid_input"
    by_field = {tuple(d["loc"]): d for d in error["details"]}
    assert by_field[("approved",)]["type"] == "bool_parsing"
    assert by_field[("approver",)]["msg"] == "Field required"
    run = checkpoints.store.load(result.id)
    assert run is not None and run.resume is None  # nothing changed
    checkpoints.cancel(result.id)


def test_a_second_answer_gets_409_and_a_later_pause_is_not_answered_by_an_old_one(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    result = pause(app, worker, "proj.two_pauses", 3)
    first = http.post(f"/api/runs/{result.id}/resume", json={"input": "a", "pause_seq": 1})
    assert first.status_code == 202
    wait_until(
        lambda: (run := checkpoints.store.load(result.id)) is not None and run.pause_seq == 2,
        "the second pause",
        60,
        worker,
    )
    stale = http.post(
        f"/api/runs/{result.id}/resume", json={"input": "b", "pause_seq": 1, "request_id": "late"}
    )
    assert error_of(stale, 409)["code"] == "superseded"
    second = http.post(f"/api/runs/{result.id}/resume", json={"input": "b", "pause_seq": 2})
    assert second.status_code == 202
    third = http.post(f"/api/runs/{result.id}/resume", json={"input": "c", "request_id": "x"})
    assert third.status_code in (409, 410)  # pending, or already completed
    assert get(result, worker) == {"x": 3, "first": "a", "second": "b"}
    # A completed run cannot be cancelled: the same answer as to a late resume.
    assert error_of(http.post(f"/api/runs/{result.id}/cancel", json={}), 410)["code"] == "completed"


def test_an_answer_delivered_again_after_the_run_paused_again_is_not_its_next_answer(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    result = pause(app, worker, "proj.two_pauses", 4)
    url = f"/api/runs/{result.id}/resume"
    assert http.post(url, json={"input": "a", "request_id": "evt-1"}).status_code == 202
    wait_until(
        lambda: (run := checkpoints.store.load(result.id)) is not None and run.pause_seq == 2,
        "the second pause",
        60,
        worker,
    )
    # The provider delivers evt-1 again: the answer it carries went to pause 1.
    again = http.post(url, json={"input": "z", "request_id": "evt-1"})
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "already answered" and again.json()["pause_seq"] == 1
    checkpoints.resume(result.id, "z", request_id="evt-1")  # from code: the same
    run = checkpoints.store.load(result.id)
    assert run is not None and run.pause_seq == 2 and run.current_resume is None
    assert run.earlier_answers == ["evt-1"]

    assert http.post(url, json={"input": "b", "request_id": "evt-2"}).status_code == 202
    assert get(result, worker) == {"x": 4, "first": "a", "second": "b"}
    for request_id, pause_seq in (("evt-1", 1), ("evt-2", 2)):
        late = http.post(url, json={"input": "q", "request_id": request_id})
        assert late.status_code == 200 and late.json()["pause_seq"] == pause_seq, late.text
    assert error_of(http.post(url, json={"input": "q", "request_id": "evt-3"}), 410)
    # The answer that completed the run is shown as applied, not as pending.
    answer = http.get(f"/api/runs/{result.id}").json()["answer"]
    assert (answer["request_id"], answer["status"]) == ("evt-2", "applied")


def test_unknown_runs_404_cancelled_runs_410_and_cancel_is_idempotent(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    assert error_of(http.get("/api/runs/no-such-run"), 404)["code"] == "not_found"
    assert error_of(http.get("/api/runs/bad%20id"), 404)["code"] == "not_found"
    error_of(http.post("/api/runs/no-such-run/resume", json={}), 404)
    error_of(http.post("/api/runs/no-such-run/cancel", json={}), 404)

    result = pause(app, worker, "proj.approve", "order-9")
    cancelled = http.post(f"/api/runs/{result.id}/cancel", json={"reason": "customer left"})
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert "customer left" in cancelled.json()["ended_reason"]
    assert http.post(f"/api/runs/{result.id}/cancel", json={}).status_code == 200
    answer = {"input": {"approved": True, "approver": "ana"}}
    refused = http.post(f"/api/runs/{result.id}/resume", json=answer)
    assert error_of(refused, 410)["code"] == "cancelled"


def test_malformed_requests_get_the_same_error_body(http: httpx.Client) -> None:
    broken = http.post(
        "/api/runs/r/resume", content=b'{"input": ', headers={"content-type": "application/json"}
    )
    assert error_of(broken, 400)["code"] == "bad_request"
    form = http.post("/api/runs/r/resume", content=b"input=1")
    assert error_of(form, 415)["code"] == "unsupported_media_type"
    # An empty cross-site form post (a session cookie riding along) changes nothing either.
    empty = http.post(
        "/api/runs/r/cancel", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert error_of(empty, 415)["code"] == "unsupported_media_type"
    wrong = http.post("/api/runs/r/resume", json={"pause_seq": "first", "surprise": 1})
    error = error_of(wrong, 422)
    assert error["code"] == "invalid_body"
    assert {tuple(d["loc"]) for d in error["details"]} == {("pause_seq",), ("surprise",)}
    not_allowed = http.delete("/api/runs/r")
    assert error_of(not_allowed, 405)["code"] == "method_not_allowed"
    assert "GET" in not_allowed.headers["allow"]
    assert error_of(http.get("/api/nothing/here"), 404)["code"] == "not_found"
    assert error_of(http.get("/api/runs", params={"limit": 0}), 400)["code"] == "bad_request"
    assert error_of(http.get("/api/runs", params={"limit": "many"}), 400)
    assert error_of(http.get("/api/runs", params={"order": "random"}), 400)
    cursor = http.get("/api/runs", params={"cursor": "not-a-cursor"})
    assert error_of(cursor, 400)["code"] == "invalid_cursor"


def test_listing_filters_orders_and_pages_with_a_cursor(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    runs = [pause(app, worker, "proj.gated", n).id for n in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"task": "proj.gated", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = http.get("/api/runs", params=params).json()
        assert len(page["runs"]) <= 2
        seen += [row["run_id"] for row in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == runs  # oldest first, each once
    newest = http.get("/api/runs", params={"task": "proj.gated", "order": "newest"}).json()
    assert [row["run_id"] for row in newest["runs"]] == runs[::-1]
    by_step = http.get("/api/runs", params={"step": "await_input"}).json()["runs"]
    assert {row["run_id"] for row in by_step} == set(runs)
    assert http.get("/api/runs", params={"step": "no-such-step"}).json()["runs"] == []
    young = http.get("/api/runs", params={"task": "proj.gated", "older_than": 86400}).json()
    assert young["runs"] == []
    newest_cursor = http.get(
        "/api/runs", params={"task": "proj.gated", "order": "newest", "limit": 1}
    ).json()["next_cursor"]
    mixed = http.get("/api/runs", params={"order": "oldest", "cursor": newest_cursor})
    assert error_of(mixed, 400)["code"] == "invalid_cursor"
    for run_id in runs:
        checkpoints.cancel(run_id)


def test_metrics_count_paused_runs_by_task_and_step(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client
) -> None:
    result = pause(app, worker, "proj.wait_for", 5)
    text = http.get("/metrics").text
    assert 'celery_checkpoint_paused_runs{step="await_number",task="proj.wait_for"}' in text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith('celery_checkpoint_paused_runs{step="await_number"')
    )
    assert float(line.split()[-1]) >= 1
    assert "celery_checkpoint_oldest_pause_age_seconds" in text
    assert "celery_checkpoint_overdue_runs" in text
    checkpoints.cancel(result.id)


def test_the_request_id_defaults_to_a_new_one_and_is_returned(
    app: Celery, worker: Worker, http: httpx.Client
) -> None:
    result = pause(app, worker, "proj.wait_for", 10)
    response = http.post(f"/api/runs/{result.id}/resume", json={"input": 1})
    assert response.status_code == 202
    request_id = response.json()["request_id"]
    uuid.UUID(request_id)
    assert get(result, worker) == 11


def test_a_webhook_answers_by_business_key_early_or_late_once(
    app: Celery, checkpoints: Checkpoints, worker: Worker, http: httpx.Client, settings: Any
) -> None:
    paid = {"status": "succeeded", "amount": 990}
    intent = f"pi_{uuid.uuid4().hex[:10]}"
    key = f"stripe:{intent}"
    # The payment succeeded before the task reached its pause: the answer is kept.
    kept = http.post(f"/api/keys/{key}/resume", json={"input": paid, "request_id": "evt_1"})
    assert kept.status_code == 202, kept.text
    assert kept.json()["status"] == "kept" and kept.json()["run_id"] is None
    assert (
        http.post(f"/api/keys/{key}/resume", json={"input": paid, "request_id": "evt_1"}).json()[
            "status"
        ]
        == "kept"
    )
    other = http.post(f"/api/keys/{key}/resume", json={"input": paid, "request_id": "evt_2"})
    assert error_of(other, 409)["code"] == "already_answered"

    result = app.tasks["proj.pay"].delay("order-9", intent)
    assert get(result, worker) == {"order": "order-9", "payment": paid}
    ended = checkpoints.store.ended(result.id)
    assert ended is not None and ended.resume is not None
    assert (ended.resume.actor, ended.resume.via) == (TOKEN_ACTOR, "webhook")
    assert len(read_marks(settings.markers, "body", result.id)) == 1

    # Late: the pause is there first; the provider delivers the event twice.
    late_intent = f"pi_{uuid.uuid4().hex[:10]}"
    late = pause(app, worker, "proj.pay", "order-10", late_intent)
    path = f"/api/keys/stripe:{late_intent}/resume"
    first = http.post(path, json={"input": paid, "request_id": "evt_3"})
    assert first.status_code == 202 and first.json()["run_id"] == late.id
    assert first.json()["status"] == "accepted"
    second = http.post(path, json={"input": paid, "request_id": "evt_3"})
    assert second.status_code == 200 and second.json()["status"] == "already answered"
    assert get(late, worker)["payment"] == paid
    bad = http.post("/api/keys/.hidden/resume", json={"input": paid})
    assert error_of(bad, 400)["code"] == "bad_request"
