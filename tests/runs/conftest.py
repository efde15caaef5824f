"""Fixtures of the batch run tests: a portal with two process sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY
from labgate.config import Settings, SiteConfig


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Two local process sites, ``alpha`` (label ``tier=a``) and ``beta`` (``tier=b``)."""
    from tools_fixtures import write_test_tools

    return Settings(
        data_dir=tmp_path / "var",
        tools_dir=write_test_tools(tmp_path / "tools"),
        database_url=database_url,
        admin_password=ADMIN_PASSWORD,
        secret_key=TEST_SECRET_KEY,
        poll_interval=0.2,
        stop_grace_seconds=3,
        sites=[
            SiteConfig(name="alpha", backend="process", labels={"tier": "a"}),
            SiteConfig(name="beta", backend="process", labels={"tier": "b"}),
        ],
    )
