"""A pool its site cannot hand over is not kept: launches start cold, and the API says why."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from helpers import wait_for_state
from labgate.config import PoolConfig
from labgate.db.models import Instance, User


@pytest.fixture
def settings(settings):
    settings.sandbox = "none"
    settings.pools = [PoolConfig(tool="demo", size=2)]
    settings.pool_check_interval = 0.1
    return settings


async def test_without_the_sandbox_the_pool_is_off_and_launches_start_cold(
    app, client, make_user, admin_headers, settings
):
    assert settings.sandbox == "none"
    pools = (await client.get("/api/v1/pools", headers=admin_headers)).json()
    assert pools == [
        {
            "tool": "demo",
            "site": "local",
            "size": 2,
            "ready": 0,
            "starting": 0,
            "disabled": "without the bubblewrap sandbox a running process cannot change workspace",
        }
    ]
    await asyncio.sleep(0.5)  # several refill intervals: still nothing started ahead
    started = await app.state.portal.run_db(
        lambda s: s.scalar(select(func.count()).select_from(Instance))
    )
    assert started == 0

    ada = await make_user("ada")
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=ada)
    assert launched.status_code == 202, launched.text
    assert launched.json()["state"] == "pending"  # a cold start, not a claim
    body = await wait_for_state(client, ada, launched.json()["id"], {"running", "failed"})
    assert body["state"] == "running", body
    assert (await client.get("/api/v1/pools", headers=ada)).status_code == 403


async def test_the_reserved_pool_account_cannot_be_touched(app, client, admin_headers):
    exists = await app.state.portal.run_db(
        lambda s: s.scalar(select(func.count()).select_from(User).where(User.name == "_pool"))
    )
    assert exists == 1
    await client.post("/api/v1/groups", json={"name": "lab"}, headers=admin_headers)
    for method, path, body in [
        ("GET", "/api/v1/users/_pool", None),
        ("DELETE", "/api/v1/users/_pool", None),
        ("PATCH", "/api/v1/users/_pool", {"disabled": False}),
        ("PUT", "/api/v1/users/_pool/password", {"password": "a-new-password"}),
        ("PUT", "/api/v1/users/_pool/limits", {"instances": 1}),
        ("PUT", "/api/v1/groups/lab/members/_pool", None),
    ]:
        answer = await client.request(method, path, json=body, headers=admin_headers)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"] == "unknown_user"
    still = await app.state.portal.run_db(
        lambda s: s.scalar(select(User).where(User.name == "_pool"))
    )
    assert still is not None and still.disabled
