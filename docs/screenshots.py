"""Regenerate docs/inbox.png and docs/run-form.png: the inbox and a run's form.

Run it with ``python docs/screenshots.py`` (needs the ``[dev]`` extra and
Debian's ``chromium`` and ``chromium-driver``). It fills a file store in a
temporary directory with paused orders, serves the web app on loopback and
photographs it in headless chromium; no worker and no broker are involved.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Literal

from celery import Celery
from pydantic import BaseModel, Field
from selenium.webdriver.support.expected_conditions import presence_of_element_located
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_checkpoint import Checkpoints, RunRecord  # noqa: E402
from celery_checkpoint.model import utcnow  # noqa: E402
from celery_checkpoint.web import create_app  # noqa: E402
from tests.web.browser import chromium  # noqa: E402
from tests.web.server import Server  # noqa: E402


class Shipping(BaseModel):
    city: str
    express: bool = False


class Review(BaseModel):
    approved: bool
    approver: str = Field(pattern=r"^[a-z]+$", description="Your login, in lower case")
    quantity: int = Field(ge=1, le=10)
    priority: Literal["low", "normal", "high"] = "normal"
    ship_on: str | None = Field(None, json_schema_extra={"format": "date"})
    tags: list[str] = []
    shipping: Shipping
    note: str | None = None


ORDERS = [
    ("shop.fulfil", "await_approval", "order 1042: 3 pianos, over the limit", 26, 22),
    ("shop.refund", "await_review", "refund of 480 EUR to a new customer", 20, None),
    ("hr.onboard", "await_signature", "contract for J. Costa", 17, 40),
    ("shop.fulfil", "await_approval", "order 1057: express to Madeira", 9, -3),
    ("shop.fulfil", "await_approval", "order 1060: 12 desks", 5, 43),
    ("billing.charge", "await_payment", None, 3, 69),
    ("shop.refund", "await_review", "partial refund, damaged parcel", 1.5, None),
    ("hr.onboard", "await_signature", "contract for M. Reis", 0.4, 95),
]


def main() -> None:
    app = Celery("shop", broker="memory://")
    app.conf.checkpoint_store = tempfile.mkdtemp(prefix="cc-screens-")
    checkpoints = Checkpoints(app)
    now = utcnow()
    schema = Review.model_json_schema()
    for n, (task, step, reason, hours_ago, hours_left) in enumerate(ORDERS):
        paused = now - timedelta(hours=hours_ago)
        checkpoints.store.save(
            RunRecord(
                run_id=f"{task.split('.')[1]}-{1040 + n * 3}",
                task_name=task,
                step=step,
                reason=reason,
                expects=f"{__name__}:Review",
                expects_schema=schema,
                created_at=paused,
                paused_at=paused,
                expires_at=None if hours_left is None else now + timedelta(hours=hours_left),
                args=[1040 + n * 3],
            )
        )
    server = Server()
    server.start(
        create_app(
            checkpoints,
            secret_keys=["screens-key-0123456789"],
            authenticate=lambda request: "ana@shop.example",
        )
    )
    try:
        with chromium(1200, 680) as driver:
            driver.get(f"{server.url}/")
            driver.save_screenshot(str(ROOT / "docs" / "inbox.png"))
            driver.set_window_size(1200, 1180)
            driver.get(f"{server.url}/runs/fulfil-1040")
            driver.find_element("name", "approved").click()
            driver.find_element("name", "approver").send_keys("Ana Silva")
            driver.find_element("name", "quantity").send_keys("3")
            driver.find_element("name", "shipping.city").send_keys("Funchal")
            driver.find_element("css selector", "form button.primary").click()
            WebDriverWait(driver, 30).until(presence_of_element_located(("id", "f-approver-error")))
            driver.save_screenshot(str(ROOT / "docs" / "run-form.png"))
    finally:
        server.stop()
    print("wrote docs/inbox.png and docs/run-form.png")


if __name__ == "__main__":
    main()
