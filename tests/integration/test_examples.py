"""Every example runs end to end as its docstring says, and ends by itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import require_server
from tests.integration.conftest import REDIS_URL
from tests.integration.helpers import ROOT, delete_redis_keys

pytestmark = [pytest.mark.slow]


def run_example(*args: str, **env: str) -> str:
    """Run ``python examples/<args>``; returns its output, failing with it on a non-zero exit."""
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done.stdout


@pytest.mark.timeout(300)
def test_the_approval_example_needs_no_server() -> None:
    out = run_example("examples/approval.py")
    assert "order 1: order 1 shipped (state SUCCESS)" in out
    assert "order 2: order 2 cancelled (state SUCCESS)" in out
    assert "paused runs left in the store: 0" in out


def test_the_store_walkthrough() -> None:
    out = run_example("examples/store_walkthrough.py")
    assert "second claim: None" in out and "late heartbeat:" in out


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_the_chain_example_on_redis() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    try:
        out = run_example("examples/chain.py", "--broker", "redis", CHAIN_REDIS_URL=REDIS_URL)
    finally:
        delete_redis_keys(REDIS_URL, "chain-example")
        delete_redis_keys(REDIS_URL, "_kombu.binding.chain-example")
        delete_redis_keys(REDIS_URL, "_kombu.binding_permanent.chain-example")
    assert "middle task: state PAUSED, waiting at 'await_approval'" in out
    assert "last task: state PENDING (the chain waits)" in out
    assert "the chain ends with: 'order 7: invoiced 229.5, approved by ana'" in out
    assert "paused runs left in the store: 0" in out


@pytest.mark.rabbitmq
@pytest.mark.timeout(300)
def test_the_chain_example_on_rabbitmq_with_rpc_results() -> None:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    out = run_example("examples/chain.py", "--broker", "rabbitmq")
    assert "results: rpc://" in out
    assert "middle task: state PAUSED, waiting at 'await_approval'" in out
    assert "the chain ends with: 'order 7: invoiced 229.5, approved by ana'" in out
    assert "paused runs left in the store: 0" in out


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_the_payment_webhook_example_answers_by_key_early_and_late() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    try:
        out = run_example("examples/payment_webhook.py", PAYMENT_REDIS_URL=REDIS_URL)
    finally:
        delete_redis_keys(REDIS_URL, "_kombu.binding.payment-example")
        delete_redis_keys(REDIS_URL, "_kombu.binding_permanent.payment-example")
    assert out.count("payment succeeded (1200 cents)") == 1, out  # two deliveries, one resume
    assert "order 1: order 1: paid 1200, shipped" in out
    assert "order 2: order 2: paid 800, shipped" in out
    assert "paused runs left in the store: 0" in out
