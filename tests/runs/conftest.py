"""Fixtures of the batch run tests: a portal with two process sites."""

from __future__ import annotations

import pytest

from labgate.config import Settings, SiteConfig


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests' settings with two local process sites: ``alpha`` (``tier=a``), ``beta``."""
    return settings.model_copy(
        update={
            "sites": [
                SiteConfig(name="alpha", backend="process", labels={"tier": "a"}),
                SiteConfig(name="beta", backend="process", labels={"tier": "b"}),
            ]
        }
    )
