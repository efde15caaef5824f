"""A warm JupyterLab taken by a user: it serves the user's workspace, nothing of the pool's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import needs_pool_sandbox, tool_client, tool_headers, wait_for_pool
from labgate.config import PoolConfig
from labgate.db.models import Instance

pytestmark = [pytest.mark.e2e, needs_pool_sandbox]


@pytest.fixture
def settings(settings):
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    settings.pools = [PoolConfig(tool="jupyterlab", size=1)]
    settings.pool_check_interval = 0.2
    return settings


async def contents(app: Any, instance: Instance, path: str = "") -> httpx.Response:
    """JupyterLab's contents API, asked with the instance token (as the router would)."""
    async with tool_client(instance.endpoint, timeout=30) as tool:
        return await tool.get(
            f"/i/{instance.id}/api/contents/{path}",
            headers=tool_headers(app, instance),
        )


async def save(app: Any, instance: Instance, name: str, text: str) -> httpx.Response:
    """Save a text file through JupyterLab's contents API."""
    async with tool_client(instance.endpoint, timeout=30) as tool:
        return await tool.put(
            f"/i/{instance.id}/api/contents/{name}",
            json={"type": "file", "format": "text", "content": text},
            headers=tool_headers(app, instance),
        )


async def test_a_claimed_jupyterlab_serves_the_users_workspace(
    app, client, make_user, pools, settings
):
    bea = await make_user("bea")
    workspace: Path = settings.workspaces_dir / "bea"
    workspace.mkdir(parents=True)
    (workspace / "analysis.py").write_text("print('bea')\n")
    warm = await wait_for_pool(app, "jupyterlab", timeout=120)

    # Whatever the pool instance wrote while it waited stays the pool's.
    left = await save(app, warm, "pool-left.txt", "from the pool")
    assert left.status_code == 201, left.text
    before = {item["name"] for item in (await contents(app, warm)).json()["content"]}
    assert "pool-left.txt" in before and "analysis.py" not in before

    launched = await client.post("/api/v1/instances", json={"tool": "jupyterlab"}, headers=bea)
    assert launched.status_code == 202, launched.text
    assert launched.json()["id"] == warm.id and launched.json()["state"] == "running"

    listed = await contents(app, warm)
    assert listed.status_code == 200, listed.text
    assert {item["name"] for item in listed.json()["content"]} == {"analysis.py"}
    assert (await contents(app, warm, "analysis.py")).json()["content"] == "print('bea')\n"
    saved = await save(app, warm, "result.txt", "42")
    assert saved.status_code == 201, saved.text
    assert (workspace / "result.txt").read_text() == "42"
    assert not (workspace / "pool-left.txt").exists()
