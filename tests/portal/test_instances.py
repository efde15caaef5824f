"""Instances through the API: launch, visibility, events, logs, limits, failures."""

from __future__ import annotations

import json

import httpx

from helpers import wait_for_state


async def launch(client: httpx.AsyncClient, headers: dict[str, str], tool: str = "demo") -> str:
    r = await client.post("/api/v1/instances", json={"tool": tool}, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "pending"
    return str(r.json()["id"])


async def read_events(client, headers, instance_id, until: set[str]) -> list[dict]:
    events = []
    async with client.stream(
        "GET", f"/api/v1/instances/{instance_id}/events", headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                events.append(event)
                if event["kind"] == "state" and event["state"] in until:
                    break
    return events


async def test_launch_reaches_running_with_events(client, make_user, settings):
    alice = await make_user("alice")
    iid = await launch(client, alice)
    events = await read_events(client, alice, iid, {"running", "failed"})
    states = [e["state"] for e in events if e["kind"] == "state"]
    assert states == ["pending", "starting", "running"], events
    assert any(e["kind"] == "progress" for e in events)
    body = (await client.get(f"/api/v1/instances/{iid}", headers=alice)).json()
    assert body["url"] == f"{settings.effective_public_url}/i/{iid}/"
    assert body["endpoint"] is None  # the upstream address is for admins only
    assert body["ready_at"] is not None
    logs = (await client.get(f"/api/v1/instances/{iid}/logs", headers=alice)).json()
    assert "demo: listening" in logs["text"]


async def test_events_replay_after_last_event_id(client, make_user):
    bob = await make_user("bob")
    iid = await launch(client, bob)
    first = await read_events(client, bob, iid, {"running"})
    middle = first[1]["id"]
    r = await client.delete(f"/api/v1/instances/{iid}", headers=bob)
    assert r.status_code == 202
    rest = await read_events(client, {**bob, "Last-Event-ID": str(middle)}, iid, {"stopped"})
    assert rest[0]["id"] > middle
    assert [e["state"] for e in rest if e["kind"] == "state"][-2:] == ["stopping", "stopped"]


async def test_users_see_only_their_instances(client, make_user, admin_headers):
    alice = await make_user("alice")
    bob = await make_user("bob")
    iid = await launch(client, alice)
    await wait_for_state(client, alice, iid, {"running"})
    assert [i["id"] for i in (await client.get("/api/v1/instances", headers=alice)).json()] == [iid]
    assert (await client.get("/api/v1/instances", headers=bob)).json() == []
    for method, path in [
        ("GET", f"/api/v1/instances/{iid}"),
        ("DELETE", f"/api/v1/instances/{iid}"),
        ("GET", f"/api/v1/instances/{iid}/logs"),
        ("GET", f"/api/v1/instances/{iid}/events"),
    ]:
        r = await client.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path)
    everyone = (await client.get("/api/v1/instances", headers=admin_headers)).json()
    assert iid in [i["id"] for i in everyone]
    shown = (await client.get(f"/api/v1/instances/{iid}", headers=admin_headers)).json()
    assert shown["endpoint"].startswith(("unix:", "http://127.0.0.1:"))
    assert (await client.get("/api/v1/instances?user=alice", headers=bob)).status_code == 403


async def test_per_user_limit_refuses_and_starts_nothing(app, client, make_user):
    from sqlalchemy import func, select

    from labgate.db.models import Instance

    app.state.portal.instances.max_instances_per_user = 2
    carol = await make_user("carol")
    await launch(client, carol)
    await launch(client, carol)
    r = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=carol)
    assert r.status_code == 429
    body = r.json()
    assert body["error"] == "quota_exceeded"
    assert body["limit"] == 2 and body["current"] == 2
    count = await app.state.portal.run_db(
        lambda s: s.scalar(select(func.count()).select_from(Instance))
    )
    assert count == 2


async def test_crashing_tool_fails_with_reason_and_log_tail(client, make_user):
    dan = await make_user("dan")
    iid = await launch(client, dan, "crashing")
    events = await read_events(client, dan, iid, {"failed", "running"})
    failed = events[-1]
    assert failed["state"] == "failed"
    assert "exited with code 3" in failed["message"]
    assert "crashing on purpose" in failed["data"]["log_tail"]
    body = (await client.get(f"/api/v1/instances/{iid}", headers=dan)).json()
    assert body["state"] == "failed" and "code 3" in body["reason"]


async def test_start_timeout_fails_and_cleans_up(client, make_user, app):
    eve = await make_user("eve")
    iid = await launch(client, eve, "never-ready")
    body = await wait_for_state(client, eve, iid, {"failed", "running"}, timeout=30)
    assert body["state"] == "failed"
    assert "not ready within 2s" in body["reason"]
    assert "503" in body["reason"]
    pid = (await app.state.portal.run_db(lambda s: _backend_state(s, iid)))["pid"]
    assert not _alive(pid)


async def test_stop_while_starting(client, make_user, app):
    fay = await make_user("fay")
    iid = await launch(client, fay, "slow")
    await wait_for_state(client, fay, iid, {"starting"})
    r = await client.delete(f"/api/v1/instances/{iid}", headers=fay)
    assert r.status_code == 202
    body = await wait_for_state(client, fay, iid, {"stopped"})
    assert body["stopped_at"] is not None
    state = await app.state.portal.run_db(lambda s: _backend_state(s, iid))
    if state.get("pid"):
        assert not _alive(state["pid"])


async def test_stopping_twice_is_a_conflict(client, make_user):
    gus = await make_user("gus")
    iid = await launch(client, gus)
    await wait_for_state(client, gus, iid, {"running"})
    assert (await client.delete(f"/api/v1/instances/{iid}", headers=gus)).status_code == 202
    await wait_for_state(client, gus, iid, {"stopped"})
    again = await client.delete(f"/api/v1/instances/{iid}", headers=gus)
    assert again.status_code == 409 and again.json()["error"] == "invalid_state"


async def test_instance_that_dies_becomes_lost(client, make_user, app):
    import os
    import signal

    hal = await make_user("hal")
    iid = await launch(client, hal)
    await wait_for_state(client, hal, iid, {"running"})
    state = await app.state.portal.run_db(lambda s: _backend_state(s, iid))
    os.killpg(state["pid"], signal.SIGKILL)
    body = await wait_for_state(client, hal, iid, {"lost"}, timeout=20)
    assert body["reason"]


async def test_tools_and_sites(client, make_user):
    ida = await make_user("ida")
    tools = {t["name"]: t for t in (await client.get("/api/v1/tools", headers=ida)).json()}
    assert tools["demo"]["available"] is True
    assert "jupyterlab" in tools
    assert "broken" not in tools and "Broken Name" not in tools
    sites = (await client.get("/api/v1/sites", headers=ida)).json()
    assert [s["name"] for s in sites] == ["local"]
    assert sites[0]["backend"] == "process"


def _backend_state(session, iid):
    from labgate.db.models import Instance

    return dict(session.get(Instance, iid).backend_state)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
