"""Warm pools: a matching launch claims a pre-started instance, bound to the user."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from helpers import (
    needs_pool_sandbox,
    pool_instances,
    tool_client,
    tool_headers,
    wait_for_pool,
    wait_for_state,
)
from labgate.config import PoolConfig
from labgate.db.models import Instance, InstanceEvent, UsageRecord

pytestmark = needs_pool_sandbox

BAD_HOOK_TOOL = """
name = "bad-hook"
title = "Demo whose claim hook is missing"
health_path = "/api/health"
start_timeout = 30
claim_path = "/no-such-hook"

[process]
command = ["{python}", "-m", "labgate.tools.demo", "--port", "{port}", "--base-url", "{base_url}"]
"""


@pytest.fixture
def settings(settings):
    (settings.tools_dir / "bad-hook.toml").write_text(BAD_HOOK_TOOL)
    settings.pools = [PoolConfig(tool="demo", size=1), PoolConfig(tool="bad-hook", size=1)]
    settings.pool_check_interval = 0.2
    return settings


async def tool_info(app: Any, instance_id: str) -> dict[str, Any]:
    """Ask the tool itself (behind the router's back, with its token) what it sees."""
    instance = await app.state.portal.run_db(lambda s: s.get(Instance, instance_id))
    async with tool_client(instance.endpoint, timeout=10) as tool:
        response = await tool.get(
            f"/i/{instance_id}/api/info",
            headers=tool_headers(app, instance),
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_launch_claims_a_warm_instance_with_the_users_workspace(
    app, client, make_user, pools, settings
):
    alice = await make_user("alice")
    workspace: Path = settings.workspaces_dir / "alice"
    workspace.mkdir(parents=True)
    (workspace / "notes.txt").write_text("alice's notes")
    warm = await wait_for_pool(app, "demo")
    before = await tool_info(app, warm.id)
    assert before["user"] == "_pool" and "notes.txt" not in before["cwd_files"]

    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert launched.status_code == 202, launched.text
    body = launched.json()
    assert body["id"] == warm.id and body["state"] == "running"
    assert body["owner"] == "alice" and body["pool"] is None

    after = await tool_info(app, warm.id)
    assert after["user"] == "alice"
    assert after["cwd_files"] == ["notes.txt"]  # the user's files, none of the pool's
    # Writes land in the user's own workspace on the host.
    instance = await app.state.portal.run_db(lambda s: s.get(Instance, warm.id))
    async with tool_client(instance.endpoint, timeout=10) as tool:
        put = await tool.put(
            f"/i/{warm.id}/api/file",
            params={"path": f"{after['home']}/written.txt"},
            content=b"hello",
            headers=tool_headers(app, instance),
        )
    assert put.status_code == 200, put.text
    assert (workspace / "written.txt").read_bytes() == b"hello"
    assert instance.backend_state["workspace"] == str(workspace.resolve())

    # Accounting: the pool's record ended "claimed", alice's runs from the claim.
    records = await app.state.portal.run_db(
        lambda s: list(s.scalars(select(UsageRecord).where(UsageRecord.instance_id == warm.id)))
    )
    assert [(r.user_name, r.reason, r.stopped_at is None) for r in records] == [
        ("_pool", "claimed", False),
        ("alice", "", True),
    ]
    messages = await app.state.portal.run_db(
        lambda s: [
            e.message for e in s.scalars(select(InstanceEvent).filter_by(instance_id=warm.id))
        ]
    )
    assert any("from the warm pool" in m for m in messages)

    # The pool refills, and other launches start cold.
    refilled = await wait_for_pool(app, "demo")
    assert refilled.id != warm.id
    cold = await client.post(
        "/api/v1/instances", json={"tool": "demo", "resources": {"cpu": 1}}, headers=alice
    )
    assert cold.json()["state"] == "pending"
    await wait_for_state(client, alice, cold.json()["id"], {"running"})

    # Stopping keeps the workspace and removes the pool's scratch directory.
    await client.delete(f"/api/v1/instances/{warm.id}", headers=alice)
    await wait_for_state(client, alice, warm.id, {"stopped"})
    assert (workspace / "notes.txt").exists()
    assert not (settings.workspaces_dir / "_pool" / warm.id).exists()


async def test_a_failed_claim_stops_the_instance_and_starts_cold(app, client, make_user, pools):
    bob = await make_user("bob")
    warm = await wait_for_pool(app, "bad-hook")
    launched = await client.post("/api/v1/instances", json={"tool": "bad-hook"}, headers=bob)
    assert launched.status_code == 202, launched.text
    body = launched.json()
    assert body["id"] != warm.id and body["state"] == "pending"
    await wait_for_state(client, bob, body["id"], {"running"})
    ended = await app.state.portal.run_db(lambda s: s.get(Instance, warm.id))
    assert ended.state.value in ("stopping", "stopped")
    reasons = await app.state.portal.run_db(
        lambda s: [
            r.reason
            for r in s.scalars(select(UsageRecord).where(UsageRecord.instance_id == warm.id))
        ]
    )
    assert "claim_failed" in reasons


async def test_pool_status_and_quota_still_apply(app, client, make_user, admin_headers, pools):
    await wait_for_pool(app, "demo")
    listed = (await client.get("/api/v1/pools", headers=admin_headers)).json()
    demo = next(p for p in listed if p["tool"] == "demo")
    assert demo == {
        "tool": "demo",
        "site": "local",
        "size": 1,
        "ready": 1,
        "starting": 0,
        "disabled": None,
    }
    carol = await make_user("carol")
    await client.put("/api/v1/users/carol/limits", json={"instances": 0}, headers=admin_headers)
    refused = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=carol)
    assert refused.status_code == 429
    assert len(await pool_instances(app, "demo")) == 1  # nothing was taken
