"""A person in a real browser: the inbox, the generated form, an error, then the answer."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_checkpoint import Checkpoints
from tests.integration.helpers import Worker, get
from tests.web.browser import chromium, require_chromium
from tests.web.conftest import pause
from tests.web.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.browser]


def test_a_person_answers_a_pause_in_the_inbox_with_a_real_browser(
    app: Celery, checkpoints: Checkpoints, worker: Worker, server: Server
) -> None:
    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    result = pause(app, worker, "proj.review", "order-41")
    with chromium() as driver:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{server.url}/static/checkpoint.css")  # the site, before signing in
        driver.add_cookie({"name": "test_user", "value": "ana"})

        driver.get(f"{server.url}/")
        assert "Paused runs" in driver.title
        driver.find_element(By.CSS_SELECTOR, f'a[href$="/runs/{result.id}"]').click()
        wait.until(until.presence_of_element_located((By.ID, "f-approver")))
        assert "await_review" in driver.find_element(By.TAG_NAME, "h1").text

        def field(name: str) -> Any:
            return driver.find_element(By.NAME, name)

        label = driver.find_element(By.CSS_SELECTOR, 'label[for="f-approver"]')
        assert label.text.startswith("Approver")
        field("approved").click()
        field("approver").send_keys("Ana Silva")  # upper case and a space: refused
        quantity = field("quantity")
        quantity.clear()
        quantity.send_keys("3")
        driver.find_element(By.CSS_SELECTOR, 'input[name="priority"][value=\'"high"\']').click()
        field("tags").send_keys("fragile\ngift")
        field("shipping.city").send_keys("Porto")
        driver.find_element(By.CSS_SELECTOR, "form button.primary").click()

        error = wait.until(until.presence_of_element_located((By.ID, "f-approver-error")))
        assert "pattern" in error.text
        approver = field("approver")
        assert "f-approver-error" in (approver.get_attribute("aria-describedby") or "")
        assert approver.get_attribute("value") == "Ana Silva"  # values kept
        assert field("shipping.city").get_attribute("value") == "Porto"
        assert field("approved").is_selected()
        assert checkpoints.store.load(result.id).resume is None  # type: ignore[union-attr]

        approver.clear()
        approver.send_keys("ana")
        driver.find_element(By.CSS_SELECTOR, "form button.primary").click()
        notice = wait.until(until.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
        assert "Answer recorded" in notice.text

    assert get(result, worker) == {
        "order": "order-41",
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
