"""A real ``celery worker`` process refuses to start on a store it cannot open."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest

from tests.conftest import require_server

APP = """
import os
from celery import Celery
from celery_checkpoint import Checkpoints

app = Celery("bootapp", broker="filesystem://localhost//")
folder = os.environ["BOOT_DIR"]
app.conf.broker_transport_options = {
    "data_folder_in": folder, "data_folder_out": folder, "control_folder": folder,
}
Checkpoints(app)
"""


@pytest.mark.slow
def test_worker_exits_1_naming_the_store_it_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "bootapp.py").write_text(APP)
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / "a-file" / "store"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "celery", "-A", "bootapp", "worker", "--pool=solo"),
            *("--without-mingle", "--without-gossip", "--checkpoint-store", str(target)),
        ],
        cwd=tmp_path,
        env=dict(os.environ, BOOT_DIR=str(tmp_path), PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"cannot open the checkpoint store at {target}" in proc.stderr
    assert "Not a directory" in proc.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_that_cannot_open_its_store_never_logs_the_urls_password(tmp_path: Path) -> None:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    (tmp_path / "bootapp.py").write_text(APP)
    url = f"postgresql://postgres:S3cretPW@127.0.0.1:5432/cc_missing_{uuid4().hex[:8]}"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "celery", "-A", "bootapp", "worker", "--pool=solo"),
            *("--without-mingle", "--without-gossip", "--checkpoint-store", url),
        ],
        cwd=tmp_path,
        env=dict(os.environ, BOOT_DIR=str(tmp_path), PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot start the worker" in proc.stderr
    assert "postgres:***@127.0.0.1:5432" in proc.stderr
    assert "S3cretPW" not in proc.stderr + proc.stdout
