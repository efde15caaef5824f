"""Idle culling, keep-alive and lifetimes, with real traffic through a real router."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import select

from helpers import tool_headers, wait_for_state
from labgate.db.models import Instance, InstanceEvent, UsageRecord
from tools_fixtures import DEMO_ARGV, QUICK_TOOL

SHORT = f"""
name = "short"
title = "Demo that lives 2 s"
health_path = "/api/health"
idle_timeout = 0
max_lifetime = 2
[process]
command = {DEMO_ARGV}
"""


@pytest.fixture
def settings(settings):
    (settings.tools_dir / "quick.toml").write_text(QUICK_TOOL)
    (settings.tools_dir / "short.toml").write_text(SHORT)
    settings.cull_interval = 0.2
    settings.cull_warning = 1.0
    settings.keep_alive_max = 30
    return settings


async def launch(client: httpx.AsyncClient, headers: dict[str, str], tool: str) -> str:
    response = await client.post("/api/v1/instances", json={"tool": tool}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def events(app: Any, instance_id: str) -> list[InstanceEvent]:
    return await app.state.portal.run_db(
        lambda s: list(
            s.scalars(
                select(InstanceEvent)
                .where(InstanceEvent.instance_id == instance_id)
                .order_by(InstanceEvent.id)
            )
        )
    )


async def usage_reason(app: Any, instance_id: str) -> str:
    return await app.state.portal.run_db(
        lambda s: s.scalar(select(UsageRecord.reason).where(UsageRecord.instance_id == instance_id))
    )


async def secret_of(app: Any, instance_id: str) -> str:
    instance = await app.state.portal.run_db(lambda s: s.get(Instance, instance_id))
    return tool_headers(app, instance)["Authorization"].removeprefix("token ")


async def state_of(client: httpx.AsyncClient, headers: dict[str, str], iid: str) -> str:
    return str((await client.get(f"/api/v1/instances/{iid}", headers=headers)).json()["state"])


async def every(seconds: float, action: Any) -> None:
    while True:
        await action()
        await asyncio.sleep(seconds)


async def test_idle_instances_stop_and_used_ones_stay(app, client, make_user, router_url, settings):
    alice = await make_user("alice")
    workspace = settings.workspaces_dir / "alice"
    workspace.mkdir(parents=True)
    (workspace / "keep.txt").write_text("data stays")
    names = ("http", "websocket", "busy", "kept", "idle")
    launched = await asyncio.gather(*(launch(client, alice, "quick") for _ in names))
    ids = dict(zip(names, launched, strict=True))
    router = httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10)
    ws_url = router_url.replace("http", "ws", 1) + f"/i/{ids['websocket']}/ws"
    secret = await secret_of(app, ids["busy"])
    # The idle timeout is 2 s and on a loaded machine one instance may run for longer than
    # that before another is seen running, so each one's use begins in its own task, as soon
    # as that instance runs.
    in_use = {name: asyncio.Event() for name in ("http", "websocket", "busy", "kept")}

    async def request() -> None:
        assert (await router.get(f"/i/{ids['http']}/api/info")).status_code == 200

    async def busy() -> None:
        response = await client.post(
            f"/api/v1/instances/{ids['busy']}/activity",
            headers={"Authorization": f"token {secret}"},
        )
        assert response.status_code == 204

    async def use(name: str, action: Any) -> None:
        await wait_for_state(client, alice, ids[name], {"running"})
        await action()
        in_use[name].set()
        await every(0.3, action)

    sockets: list[Any] = []

    async def chat() -> None:
        await wait_for_state(client, alice, ids["websocket"], {"running"})
        sockets.append(await websockets.connect(ws_url, additional_headers=alice))
        while True:
            await sockets[0].send("still here")
            assert await sockets[0].recv() == "still here"
            in_use["websocket"].set()
            await asyncio.sleep(0.3)

    async def keep() -> None:
        await wait_for_state(client, alice, ids["kept"], {"running"})
        kept = await client.put(
            f"/api/v1/instances/{ids['kept']}/keep-alive", json={"for": 5}, headers=alice
        )
        assert kept.status_code == 200 and kept.json()["cull_reason"] == "idle"
        in_use["kept"].set()

    users = [
        asyncio.create_task(use("http", request)),
        asyncio.create_task(chat()),
        asyncio.create_task(use("busy", busy)),
        asyncio.create_task(keep()),
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(e.is_set() for e in in_use.values()):
            for task in users:
                if task.done():
                    task.result()  # a failed use is told here, not as a timeout
            assert time.monotonic() < deadline, {name: e.is_set() for name, e in in_use.items()}
            await asyncio.sleep(0.05)
        await wait_for_state(client, alice, ids["idle"], {"stopped"}, timeout=30)
        for name in ("http", "websocket", "busy", "kept"):
            assert await state_of(client, alice, ids[name]) == "running", name
        await asyncio.sleep(1.5)  # well past the idle timeout since the start
        for name in ("http", "websocket", "busy", "kept"):
            assert await state_of(client, alice, ids[name]) == "running", name
    finally:
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    # Traffic ends; the WebSocket stays open but silent: that is not use.
    for name in ("http", "websocket", "busy", "kept"):
        await wait_for_state(client, alice, ids[name], {"stopped"}, timeout=30)
    await sockets[0].close()
    await router.aclose()

    culled = await events(app, ids["idle"])
    warnings = [e for e in culled if e.data.get("warning") == "idle"]
    stop = next(e for e in culled if e.state.value == "stopping")
    assert warnings and warnings[0].id < stop.id and warnings[0].data["cull_at"]
    assert "without use" in stop.message and stop.data["reason"] == "idle"
    kept_stop = next(e for e in await events(app, ids["kept"]) if e.state.value == "stopping")
    assert "keep-alive ended" in kept_stop.message
    for iid in ids.values():
        assert await usage_reason(app, iid) == "idle"
    assert (workspace / "keep.txt").read_text() == "data stays"


async def test_lifetime_limits_of_tools_and_groups(app, client, make_user, admin_headers):
    bob = await make_user("bob")
    short = await launch(client, bob, "short")
    await client.post(
        "/api/v1/groups", json={"name": "brief", "max_lifetime": 1.5}, headers=admin_headers
    )
    await client.put("/api/v1/groups/brief/members/bob", headers=admin_headers)
    grouped = await launch(client, bob, "demo")  # charged to "brief"
    for iid in (short, grouped):
        await wait_for_state(client, bob, iid, {"stopped"}, timeout=60)
        stream = await events(app, iid)
        warning = next(e for e in stream if e.data.get("warning") == "lifetime")
        stop = next(e for e in stream if e.state.value == "stopping")
        assert warning.id < stop.id and "maximum lifetime" in stop.message
        assert await usage_reason(app, iid) == "lifetime"


async def test_keep_alive_api_caps_shows_and_clears(app, client, make_user, settings):
    carol = await make_user("carol")
    dave = await make_user("dave")
    iid = await launch(client, carol, "demo")
    await wait_for_state(client, carol, iid, {"running"})
    path = f"/api/v1/instances/{iid}/keep-alive"
    shown = (await client.get(path, headers=carol)).json()
    assert shown["keep_alive_until"] is None and shown["cull_reason"] == "idle"
    assert 3500 < shown["cull_in"] <= 3600  # the demo's idle timeout
    capped = await client.put(path, json={"for": 7 * 86400}, headers=carol)
    assert capped.status_code == 200 and capped.json()["capped"] is True
    until = capped.json()["keep_alive_until"]
    listed = (await client.get(f"/api/v1/instances/{iid}", headers=carol)).json()
    assert listed["keep_alive_until"] == until
    assert (await client.put(path, json={}, headers=carol)).status_code == 400
    assert (await client.put(path, json={"for": 60}, headers=dave)).status_code == 404
    # Far beyond any date: capped like any other, not an overflow.
    huge = await client.put(path, json={"for": 1e15}, headers=carol)
    assert huge.status_code == 200 and huge.json()["capped"] is True, huge.text
    far = await client.put(path, json={"until": "9999-12-31T23:59:59Z"}, headers=carol)
    assert far.status_code == 200 and far.json()["capped"] is True, far.text
    app.state.portal.settings.keep_alive_max = 0
    off = await client.put(path, json={"for": 60}, headers=carol)
    assert off.status_code == 409 and off.json()["error"] == "keep_alive_off"
    cleared = await client.delete(path, headers=carol)
    assert cleared.json()["keep_alive_until"] is None


async def test_busy_reports_need_that_instances_token(app, client, make_user):
    erin = await make_user("erin")
    first, second = await launch(client, erin, "demo"), await launch(client, erin, "demo")
    for iid in (first, second):
        await wait_for_state(client, erin, iid, {"running"})
    url = f"/api/v1/instances/{first}/activity"
    for headers in (
        {},
        erin,  # an API token is not the instance token
        {"Authorization": f"token {await secret_of(app, second)}"},
        {"Authorization": "token nonsense"},
    ):
        response = await client.post(url, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "invalid_token"
    ok = await client.post(url, headers={"Authorization": f"token {await secret_of(app, first)}"})
    assert ok.status_code == 204
    row = await app.state.portal.run_db(lambda s: s.get(Instance, first))
    assert row.last_activity_at is not None
    assert time.time() - row.last_activity_at.timestamp() < 30
