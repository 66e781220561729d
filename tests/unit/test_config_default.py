"""The default store: an SQLite database per app under the user's data home."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from celery import Celery

from celery_checkpoint import CheckpointStore
from celery_checkpoint.config import CheckpointConfig, default_store_dir
from celery_checkpoint.store.file import FileStore
from celery_checkpoint.store.sqlite import SqliteStore
from tests.contract.helpers import make_run


def test_the_default_store_is_an_sqlite_database_per_app_in_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    config = CheckpointConfig.from_app(Celery("shop", set_as_current=False))
    database = tmp_path / "data" / "celery-checkpoint" / "shop.db"
    assert config.store == f"sqlite:///{database}"
    assert config.store.startswith("sqlite:////"), "an absolute path: four slashes"
    assert stat.S_IMODE((tmp_path / "data" / "celery-checkpoint").stat().st_mode) == 0o700
    store = CheckpointStore.open(config.store)
    assert isinstance(store, SqliteStore)
    assert store.path == database
    store.close()


def test_a_file_store_left_at_the_former_default_keeps_being_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    legacy = Path(default_store_dir("shop"))
    assert legacy == tmp_path / "data" / "celery-checkpoint" / "shop"
    FileStore(legacy).save(make_run("waiting"))
    with caplog.at_level(logging.WARNING, logger="celery_checkpoint"):
        config = CheckpointConfig.from_app(Celery("shop", set_as_current=False))
    assert config.store == str(legacy), "paused runs are not left behind by an upgrade"
    assert "keeping the file store" in caplog.text
    store = CheckpointStore.open(config.store)
    assert store.load("waiting") is not None
