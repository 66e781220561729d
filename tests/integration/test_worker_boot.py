"""A real ``celery worker`` process refuses to start on a store it cannot open."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
