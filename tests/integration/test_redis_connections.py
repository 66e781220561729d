"""The Redis store over the other ways to reach a server: a unix socket, TLS and Sentinel.

Each test starts a private ``redis-server`` of its own (and, for Sentinel, a
``redis-server --sentinel`` watching it) on free loopback ports in a temporary
directory, and runs one whole cycle through the store: save, resume request,
claim, complete, and recovery of a lease whose owner died.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_checkpoint import CheckpointStore, PausedWorkflow, StoreUnavailable
from tests.conftest import IN_CI

pytestmark = pytest.mark.redis

START_TIMEOUT = 30.0  # guards against a hang, never asserted on


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``redis-server`` with the given arguments; every one is killed afterwards."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not on PATH"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"server-{len(started)}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(["redis-server", *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def _wait(ready: Callable[[], Any], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if ready():
                return
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up")
        time.sleep(0.05)


def _one_cycle(store: CheckpointStore) -> None:
    """Every kind of transition once, as a resumed run goes through them."""
    store.save(PausedWorkflow(run_id="order-1", task_name="shop.ship", step="approve"))
    store.request_resume("order-1", {"approved": True}, "req-1")
    run = store.claim("order-1")
    assert run is not None and run.lease is not None
    store.heartbeat("order-1", run.lease.token)
    store.complete("order-1", token=run.lease.token)
    ended = store.ended("order-1")
    assert ended is not None and ended.status == "completed"
    store.save(PausedWorkflow(run_id="order-2", task_name="shop.ship", step="approve"))
    assert store.claim("order-2", lease_seconds=0.1) is not None
    time.sleep(0.3)
    assert [r.run_id for r in store.recover_orphaned()] == ["order-2"]
    assert store.count() == 1


def test_a_unix_socket_url(spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = spawn(
        *("--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"),
        *("--dir", str(tmp_path), "--save", ""),
    )
    _wait(lambda: redis.Redis(unix_socket_path=str(path)).ping(), server, "redis on a socket")
    store = CheckpointStore.open(f"unix://{path}?db=3&prefix=cc-sock")
    try:
        _one_cycle(store)
    finally:
        store.close()


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        message = "openssl is not on PATH: cannot make TLS certificates"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt")
    )
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


def test_a_tls_url_verifies_the_server_and_a_plain_url_to_it_fails_clearly(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    ca, cert, key = _make_certs(tmp_path)
    port = _free_port()
    server = spawn(
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
        *("--dir", str(tmp_path), "--save", ""),
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"

    def ping() -> bool:
        client = redis.Redis.from_url(url)
        try:
            return bool(client.ping())
        finally:
            client.close()

    _wait(ping, server, "redis with TLS")
    store = CheckpointStore.open(url + "&prefix=cc-tls")
    try:
        _one_cycle(store)
    finally:
        store.close()
    with pytest.raises(StoreUnavailable) as caught:
        CheckpointStore.open(f"redis://127.0.0.1:{port}/0?socket_timeout=2")
    assert "open failed" in str(caught.value)


def test_a_client_from_sentinel_follows_the_primary_it_names(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    primary_port, sentinel_port = _free_port(), _free_port()
    primary = spawn(
        *("--port", str(primary_port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
        *("--save", ""),
    )
    _wait(lambda: redis.Redis(port=primary_port).ping(), primary, "the primary")
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor cc 127.0.0.1 {primary_port} 1\n"
    )
    sentinel_process = spawn(str(conf), "--sentinel")
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)
    _wait(
        lambda: sentinel.discover_master("cc") == ("127.0.0.1", primary_port),
        sentinel_process,
        "sentinel",
    )
    client = sentinel.master_for("cc", retry=Retry(NoBackoff(), 0))
    store = CheckpointStore.open("redis://sentinel/0", client=client, prefix="cc-sentinel")
    try:
        _one_cycle(store)
    finally:
        store.close()
        client.close()
