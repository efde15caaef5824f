"""The CLI's url and token, read without building all settings: same places, same order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labgate.config import Settings
from labgate.configfile import client_settings


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in [k for k in os.environ if k.upper().startswith("LABGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def full() -> dict[str, str]:
    settings = Settings()
    return {"url": settings.url, "token": settings.token.get_secret_value()}


def test_defaults_environment_and_file_agree_with_the_full_settings(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client_settings() == full() == {"url": "", "token": ""}
    (clean / "labgate.toml").write_text('url = "http://files.example:8000/"\ntoken = "lg_file"\n')
    assert client_settings() == full() == {"url": "http://files.example:8000", "token": "lg_file"}
    monkeypatch.setenv("labgate_url", "http://env.example:8000")  # any case, as pydantic reads
    assert client_settings() == full()
    assert client_settings() == {"url": "http://env.example:8000", "token": "lg_file"}
    monkeypatch.setenv("LABGATE_TOKEN", "lg_env")
    assert client_settings() == full() == {"url": "http://env.example:8000", "token": "lg_env"}


def test_what_only_the_full_settings_can_explain_falls_back(clean: Path) -> None:
    (clean / "labgate.toml").write_text("url = 5\n")
    assert client_settings() is None
    (clean / "labgate.toml").write_text("url = \n")
    assert client_settings() is None


def test_any_other_setting_means_the_full_settings(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So a bad one is still reported by every command (tests/test_startup.py).
    monkeypatch.setenv("LABGATE_PORT", "0x")
    assert client_settings() is None
    monkeypatch.delenv("LABGATE_PORT")
    (clean / "labgate.toml").write_text('url = "http://a.example"\nport = 8001\n')
    assert client_settings() is None
