"""Fixtures of the scheduler tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture
async def pools(app: Any) -> AsyncIterator[Any]:
    """The pool manager, closed before the app stops everything (so nothing refills)."""
    yield app.state.pools
    await app.state.pools.close()
