"""The checkpoint_web_* settings: read once, a bad value named in one clear error."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_checkpoint import ImproperlyConfigured
from celery_checkpoint.config import CheckpointConfig


def config(**conf: Any) -> CheckpointConfig:
    app = Celery("webconf")
    app.conf.update(checkpoint_store="/tmp/unused", **conf)
    return CheckpointConfig.from_app(app)


def test_web_settings_are_read_and_kept_out_of_repr() -> None:
    read = config(
        checkpoint_web_secret_keys="one-key-0123456789abcdef",
        checkpoint_web_base_url="https://shop.example/approvals/",
        checkpoint_web_tokens={"token-0123456789abcdef": "billing"},
    )
    assert read.web_secret_keys == ("one-key-0123456789abcdef",)
    assert read.web_base_url == "https://shop.example/approvals"
    assert read.web_tokens == {"token-0123456789abcdef": "billing"}
    assert "0123456789abcdef" not in repr(read)
    assert config().web_secret_keys == () and config().web_base_url is None


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("checkpoint_web_secret_keys", "short", "at least 16"),
        ("checkpoint_web_secret_keys", 42, "a key or a list"),
        ("checkpoint_web_base_url", "shop.example/approvals", "absolute http(s)"),
        ("checkpoint_web_base_url", "https://shop.example/?x=1", "query"),
        ("checkpoint_web_tokens", ["token-0123456789abcdef"], "map each token"),
        ("checkpoint_web_tokens", {"short": "billing"}, "at least 16"),
        ("checkpoint_web_tokens", {"token-0123456789abcdef": ""}, "name its actor"),
    ],
)
def test_a_bad_web_setting_is_one_clear_error(key: str, value: Any, words: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=key) as caught:
        config(**{key: value})
    assert words in str(caught.value)


def test_serve_finds_the_authenticate_hook_in_the_current_directory_as_celery_finds_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_checkpoint._cli_admin import _import_hook

    name = f"authhook_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def who(request):\n    return 'ana'\n")
    monkeypatch.chdir(tmp_path)
    hook = _import_hook(f"{name}:who")
    assert hook(None) == "ana"
