"""Fixtures of the batch run tests: a portal with two process sites."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def shelf() -> Iterator[Path]:
    """A folder anyone may read, for wheel files a run names (a site reads them with the
    owner's rights; pytest's own ``tmp_path`` is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="labgate-wheels-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
