"""``celery -A proj checkpoint serve``: a real uvicorn process, closed until configured."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import ROOT

pytestmark = [pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(tmp_path: Path, config: str) -> tuple[subprocess.Popen[str], int]:
    (tmp_path / "servedapp.py").write_text(
        textwrap.dedent(
            f"""
            from celery import Celery
            from celery_checkpoint import Checkpoints

            app = Celery("servedapp", broker="memory://")
            app.conf.checkpoint_store = {str(tmp_path / "store")!r}
            {config}
            checkpoints = Checkpoints(app)
            """
        )
    )
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "servedapp",
            "checkpoint",
            "serve",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return proc, port


def wait_up(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("serve did not start listening")


def stop(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    return output


def test_serve_is_closed_by_default_and_says_how_to_open_it(tmp_path: Path) -> None:
    proc, port = serve(tmp_path, "")
    try:
        wait_up(proc, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/").status_code == 401
            assert client.get("/api/runs").status_code == 401
            assert client.get("/metrics").status_code == 401
    finally:
        output = stop(proc)
    assert f"inbox    http://127.0.0.1:{port}/" in output
    assert "CLOSED: no authentication is configured" in output
    assert "checkpoint_web_tokens" in output and "--authenticate" in output


def test_serve_opens_the_api_to_a_configured_token(tmp_path: Path) -> None:
    token = "serve-token-0123456789abcdef"
    proc, port = serve(tmp_path, f"app.conf.checkpoint_web_tokens = {{{token!r}: 'ops'}}")
    try:
        wait_up(proc, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            response = client.get("/api/runs", headers={"authorization": f"Bearer {token}"})
            assert response.status_code == 200 and response.json()["runs"] == []
            assert client.get("/api/runs").status_code == 401
    finally:
        output = stop(proc)
    assert "CLOSED" not in output
