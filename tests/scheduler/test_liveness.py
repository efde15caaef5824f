"""Network sites coming and going: unreachable, back, lost after the grace period, late stops.

The portal is the real app on a loopback port; the site's agent is a real
RemoteAgent dialing its agent endpoint over a WebSocket, driving the process
backend in its own data dir.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from helpers import ADMIN_PASSWORD, serving, stop_everything, token_for, wait_for_state
from labgate.agent import site as site_module
from labgate.agent.site import SiteAgent
from labgate.backends.base import LaunchSpec, Started
from labgate.backends.registry import load_backend
from labgate.config import Settings
from labgate.db.models import Instance, InstanceEvent, InstanceState
from labgate.wire.site import Report
from servers import processes_with_env
from site_agents import remote_agent


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"site_heartbeat_interval": 1.0, "site_grace_period": 1.5})


async def add_site(
    client: httpx.AsyncClient, headers: dict[str, str], reach: str = "direct"
) -> str:
    created = await client.post(
        "/api/v1/sites",
        json={"name": "edge", "backend": "process", "reach": reach},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


async def wait_site(
    client: httpx.AsyncClient, headers: dict[str, str], status: str
) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            body: dict[str, Any] = (await client.get("/api/v1/sites/edge", headers=headers)).json()
            if body["status"] == status:
                return body
            await asyncio.sleep(0.05)


async def launch_on_edge(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    created = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=headers
    )
    assert created.status_code in (200, 201, 202), created.text
    return str(created.json()["id"])


async def running_on_edge_then_away(
    app: Any, client: httpx.AsyncClient, headers: dict[str, str], data_dir: Path
) -> tuple[str, str]:
    """A site ``edge`` whose agent ran a demo and went away: (site token, instance id)."""
    token = await add_site(client, headers)
    async with remote_agent(app.state.test_url, token, data_dir):
        await wait_site(client, headers, "connected")
        iid = await launch_on_edge(client, headers)
        await wait_for_state(client, headers, iid, {"running"})
    await wait_for_state(client, headers, iid, {"unreachable"})
    return token, iid


async def stop_and_wait(client: httpx.AsyncClient, headers: dict[str, str], iid: str) -> None:
    """Stop an instance through the API and wait until it is stopped."""
    stopped = await client.delete(f"/api/v1/instances/{iid}", headers=headers)
    assert stopped.status_code in (200, 202), stopped.text
    await wait_for_state(client, headers, iid, {"stopped"})


async def row(app: Any, iid: str) -> Instance:
    instance: Instance | None = await app.state.portal.run_db(lambda s: s.get(Instance, iid))
    assert instance is not None
    return instance


async def transitions(app: Any, iid: str) -> list[str]:
    """The states an instance went through, in order."""

    def query(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == iid, InstanceEvent.kind == "state")
            .order_by(InstanceEvent.id)
        )
        return [row.state.value for row in rows]

    result: list[str] = await app.state.portal.run_db(query)
    return result


async def kill_at_site(app: Any, iid: str) -> None:
    """Stop what the agent left running (an agent that is gone cannot)."""
    state = (await row(app, iid)).backend_state
    if state:
        backend = load_backend("process")(app.state.portal.settings, {})
        await backend.stop(state, 1)


async def test_an_agent_speaks_only_for_its_own_site(app, client, admin_headers, caplog):
    token = await add_site(client, admin_headers)
    created = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=admin_headers)
    iid = created.json()["id"]
    await wait_for_state(client, admin_headers, iid, {"running"})
    del token
    with caplog.at_level(logging.WARNING):
        await app.state.portal.instances.apply(
            Report(iid, "lost", message="a lie from another site"), site="edge"
        )
    assert (await row(app, iid)).state == InstanceState.running
    assert "refused" in caplog.text and iid in caplog.text


async def test_a_silent_site_makes_its_instances_unreachable_then_lost(
    app, client, admin_headers, tmp_path: Path
):
    token = await add_site(client, admin_headers)
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_site(client, admin_headers, "connected")
        iid = await launch_on_edge(client, admin_headers)
        await wait_for_state(client, admin_headers, iid, {"running"})
    try:
        site = await wait_site(client, admin_headers, "disconnected")
        assert site["live"] is False and site["disconnected_since"]
        await wait_for_state(client, admin_headers, iid, {"unreachable"})
        # New launches go elsewhere while the site is away.
        other = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=admin_headers)
        assert other.json()["site"] == "local"
        asked = await client.post(
            "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin_headers
        )
        assert asked.status_code in (409, 503) and "edge" in asked.json()["detail"]
        await wait_for_state(client, admin_headers, iid, {"lost"}, timeout=10)
        assert "did not come back within 1.5 s" in (await row(app, iid)).reason
    finally:
        await kill_at_site(app, iid)


async def test_a_site_going_away_is_never_taken_for_one_held_by_another_portal(
    app, client, admin_headers, tmp_path: Path, monkeypatch
):
    """The heartbeat's look at which sites other portals hold, while a departure is recorded.

    Until the row says the site is away it holds this portal's connection; a
    look in between that took it for another portal's would admit launches on
    the site and relay them to nobody.
    """
    from labgate.portal.site_relay import SiteRelay
    from labgate.scheduler import liveness as liveness_module

    portal = app.state.portal
    token = await add_site(client, admin_headers)
    link, liveness = portal.links["edge"], portal.site_hub.events
    if link.relay is None:  # one portal on SQLite: relaying is what PostgreSQL replicas do
        monkeypatch.setattr(link, "relay", SiteRelay(portal))
    entered, release = threading.Event(), threading.Event()
    record_away = liveness_module._record_away

    def held_up(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return record_away(*args)

    monkeypatch.setattr(liveness_module, "_record_away", held_up)
    try:
        async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
            await wait_site(client, admin_headers, "connected")
        assert await asyncio.to_thread(entered.wait, 10)
        await liveness.note_held_elsewhere()
        assert not link.held_elsewhere and not link.reachable
    finally:
        release.set()
    site = await wait_site(client, admin_headers, "disconnected")
    assert site["live"] is False
    asked = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin_headers
    )
    assert asked.status_code == 409 and asked.json()["error"] == "site_unavailable", asked.text


async def test_a_site_whose_agent_left_this_portal_is_not_taken_as_held_by_another(
    app, client, admin_headers, tmp_path: Path, monkeypatch
):
    """When this portal's connection ends, a stale "held by another portal" goes with it.

    A heartbeat's look that ran across a quick reconnect may have found the
    row fresh and not this portal's.
    """
    from labgate.portal.site_relay import SiteRelay

    portal = app.state.portal
    token = await add_site(client, admin_headers)
    link, liveness = portal.links["edge"], portal.site_hub.events
    if link.relay is None:  # one portal on SQLite: relaying is what PostgreSQL replicas do
        monkeypatch.setattr(link, "relay", SiteRelay(portal))
    liveness._flusher.cancel()  # no later heartbeat look puts the flag right meanwhile
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_site(client, admin_headers, "connected")
        link.held_elsewhere = True
    await wait_site(client, admin_headers, "disconnected")
    async with asyncio.timeout(10):
        while link.held_elsewhere:
            await asyncio.sleep(0.02)
    assert not link.reachable
    asked = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin_headers
    )
    assert asked.status_code == 409 and asked.json()["error"] == "site_unavailable", asked.text


async def test_an_agent_that_returns_brings_its_instances_back(
    app, client, admin_headers, tmp_path: Path
):
    token = await add_site(client, admin_headers)
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_site(client, admin_headers, "connected")
        iid = await launch_on_edge(client, admin_headers)
        ready = (await wait_for_state(client, admin_headers, iid, {"running"}))["ready_at"]
    away = await wait_for_state(client, admin_headers, iid, {"unreachable"})
    assert "site edge is not connected" in away["reason"]
    # A new agent process on the same machine: it holds nothing, the portal hands it back.
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_site(client, admin_headers, "connected")
        back = await wait_for_state(client, admin_headers, iid, {"running"})
        assert back["reason"] == "" and back["ready_at"] == ready
        assert await transitions(app, iid) == [
            "pending",
            "starting",
            "running",
            "unreachable",
            "running",
        ]
        await stop_and_wait(client, admin_headers, iid)


async def test_an_agent_back_as_the_grace_period_ends_loses_nothing(
    app, client, admin_headers, tmp_path: Path, monkeypatch
):
    """An agent back while the grace period's end is at work: its instances run on.

    The end of the grace period has read the site's instances, and the agent
    connects before it marks them lost; the reconcile waits its turn, and
    nothing is lost.
    """
    from labgate.scheduler import liveness as liveness_module

    token, iid = await running_on_edge_then_away(app, client, admin_headers, tmp_path / "edge")
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()
    unfinished_on = liveness_module._unfinished_on

    def read_then_wait(session: Any, name: str) -> Any:
        rows = unfinished_on(session, name)
        if armed.is_set():
            armed.clear()
            entered.set()
            release.wait(10)
        return rows

    monkeypatch.setattr(liveness_module, "_unfinished_on", read_then_wait)
    armed.set()
    try:
        assert await asyncio.to_thread(entered.wait, 10), "the grace period did not end"
        async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
            await wait_site(client, admin_headers, "connected")
            release.set()
            await wait_for_state(client, admin_headers, iid, {"running"})
            await asyncio.sleep(0.3)  # what the grace period's end would still do
            assert (await row(app, iid)).state == InstanceState.running
            assert "lost" not in await transitions(app, iid)
            await stop_and_wait(client, admin_headers, iid)
    finally:
        release.set()
        await kill_at_site(app, iid)


async def test_following_other_replicas_never_drops_a_site_added_here_meanwhile(
    app, client, admin_headers, monkeypatch
):
    """A replica's follow read the sites just before one was added here: the new one stays.

    Dropped, its agent would hear its token was revoked, and stop for good.
    """
    from labgate.agent.network import NetworkSiteLink
    from labgate.scheduler import liveness as liveness_module

    portal = app.state.portal
    liveness = portal.site_hub.events
    entered, release = threading.Event(), threading.Event()
    network_sites = liveness_module._network_sites

    def read_then_wait(session: Any) -> Any:
        rows = network_sites(session)
        entered.set()
        release.wait(10)
        return rows

    monkeypatch.setattr(liveness_module, "_network_sites", read_then_wait)
    following = asyncio.create_task(liveness.sync_sites())
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        adding = asyncio.create_task(add_site(client, admin_headers))
        async with asyncio.timeout(10):  # the row is written; the link waits for the follow
            while "edge" not in await portal.run_db(network_sites):
                await asyncio.sleep(0.02)
        release.set()
        await following
        await adding
    finally:
        release.set()
    assert isinstance(portal.links.get("edge"), NetworkSiteLink)


async def launch_as_the_agent_leaves(
    app: Any, client: httpx.AsyncClient, headers: dict[str, str], token: str, data_dir: Path
) -> str:
    """Admit a launch on edge while its agent is connected, and send it once it is gone.

    Returns once the send failed (a note says the launch waits) or the instance ended.
    """
    link = app.state.portal.links["edge"]
    admitted, gone = asyncio.Event(), asyncio.Event()
    send = link.launch

    async def send_once_gone(spec: LaunchSpec) -> None:
        admitted.set()
        await gone.wait()
        await send(spec)

    link.launch = send_once_gone
    try:
        async with remote_agent(app.state.test_url, token, data_dir):
            await wait_site(client, headers, "connected")
            iid = await launch_on_edge(client, headers)
            await admitted.wait()
        await wait_site(client, headers, "disconnected")
        gone.set()
        async with asyncio.timeout(20):
            while not await notes(app, iid) and (await row(app, iid)).state == "pending":
                await asyncio.sleep(0.05)
    finally:
        del link.launch  # the class's own again
    return iid


async def notes(app: Any, iid: str) -> list[str]:
    """The messages of an instance's progress events."""

    def query(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent.message)
            .where(InstanceEvent.instance_id == iid, InstanceEvent.kind == "progress")
            .order_by(InstanceEvent.id)
        )
        return list(rows)

    result: list[str] = await app.state.portal.run_db(query)
    return result


async def test_a_launch_sent_as_its_agent_leaves_waits_and_runs_when_it_is_back(
    app, client, admin_headers, tmp_path: Path
):
    app.state.portal.site_hub.events.grace = 60.0
    token = await add_site(client, admin_headers)
    iid = await launch_as_the_agent_leaves(app, client, admin_headers, token, tmp_path / "edge")
    assert (await row(app, iid)).state == InstanceState.pending
    assert any("waiting for the agent of site edge" in m for m in await notes(app, iid))
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_for_state(client, admin_headers, iid, {"running"})
        assert await transitions(app, iid) == ["pending", "starting", "running"]
        await stop_and_wait(client, admin_headers, iid)


async def test_a_launch_waiting_for_an_agent_that_stays_away_fails_at_the_grace_end(
    app, client, admin_headers, tmp_path: Path
):
    token = await add_site(client, admin_headers)
    iid = await launch_as_the_agent_leaves(app, client, admin_headers, token, tmp_path / "edge")
    failed = await wait_for_state(client, admin_headers, iid, {"failed"}, timeout=20)
    assert "never started: site edge did not come back within 1.5 s" in failed["reason"]


async def test_a_stop_while_the_site_is_away_is_done_when_it_returns(
    app, client, admin_headers, tmp_path: Path
):
    token, iid = await running_on_edge_then_away(app, client, admin_headers, tmp_path / "edge")
    stopped = await client.delete(f"/api/v1/instances/{iid}", headers=admin_headers)
    assert stopped.status_code in (200, 202)
    await asyncio.sleep(0.5)
    assert (await row(app, iid)).state == InstanceState.stopping
    pid = (await row(app, iid)).backend_state.get("pid")
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        await wait_for_state(client, admin_headers, iid, {"stopped"})
    if pid:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


async def test_an_agent_killed_inside_a_start_leaves_nothing_running(
    app, client, admin_headers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The tool ran but its state never left the agent: failed, with its processes gone."""
    monkeypatch.setattr(site_module, "INTERRUPTED_START_WAIT", 0.1)
    started = asyncio.Event()

    def dies_inside_start(agent: SiteAgent) -> None:
        real_start = agent.backend.start

        async def start(spec: LaunchSpec) -> Started:
            await real_start(spec)  # the tool runs...
            started.set()
            await asyncio.Event().wait()  # ...and the agent is gone before it says so
            raise AssertionError("unreachable")

        agent.backend.start = start  # type: ignore[method-assign]

    token = await add_site(client, admin_headers)
    async with remote_agent(app.state.test_url, token, tmp_path / "edge", dies_inside_start):
        await wait_site(client, admin_headers, "connected")
        iid = await launch_on_edge(client, admin_headers)
        await asyncio.wait_for(started.wait(), 20)
    assert processes_with_env("LABGATE_INSTANCE_ID", iid)
    assert not (await row(app, iid)).backend_state
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        failed = await wait_for_state(client, admin_headers, iid, {"failed"})
        assert (
            "the agent of site edge restarted before the instance had started" in (failed["reason"])
        )
        async with asyncio.timeout(20):
            while processes_with_env("LABGATE_INSTANCE_ID", iid):
                await asyncio.sleep(0.1)


async def test_a_launch_sent_before_a_new_connections_reconcile_is_left_to_run(
    app, client, admin_headers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A launch that goes out over a new connection before its reconcile reads the rows.

    Starting, with no state saved and not in the hello (the hello came first):
    that is no start a restarted agent lost, and it runs.
    """
    from labgate.scheduler import liveness as liveness_module

    sent, gate = asyncio.Event(), asyncio.Event()

    def slow_start(agent: SiteAgent) -> None:
        real_start = agent.backend.start

        async def start(spec: LaunchSpec) -> Started:
            sent.set()
            await gate.wait()
            return await real_start(spec)

        agent.backend.start = start  # type: ignore[method-assign]

    token = await add_site(client, admin_headers)
    entered, release = threading.Event(), threading.Event()
    record_connected = liveness_module._record_connected

    def recorded_then_wait(*args: Any) -> Any:
        at = record_connected(*args)
        entered.set()
        release.wait(10)
        return at

    monkeypatch.setattr(liveness_module, "_record_connected", recorded_then_wait)
    iid = ""
    try:
        async with remote_agent(app.state.test_url, token, tmp_path / "edge", slow_start):
            assert await asyncio.to_thread(entered.wait, 10), "the agent did not connect"
            iid = await launch_on_edge(client, admin_headers)
            await asyncio.wait_for(sent.wait(), 20)
            await wait_for_state(client, admin_headers, iid, {"starting"})
            release.set()  # the reconcile reads the rows now
            await asyncio.sleep(0.5)
            assert (await row(app, iid)).state == InstanceState.starting
            gate.set()
            await wait_for_state(client, admin_headers, iid, {"running"})
            assert "failed" not in await transitions(app, iid)
            await stop_and_wait(client, admin_headers, iid)
    finally:
        release.set()
        gate.set()
        if iid:
            await kill_at_site(app, iid)


async def running_on_edge_then_portal_down(settings: Settings, tmp_path: Path) -> tuple[str, str]:
    """A portal, a connected site ``edge`` with a running demo; the portal stops first.

    Returns the site's token and the instance id; the agent stopped after the
    portal, so no portal saw the site leave.
    """
    async with (
        serving(settings) as first,
        httpx.AsyncClient(base_url=first.state.test_url, timeout=30) as client,
    ):
        headers = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        token = await add_site(client, headers)
        agent = remote_agent(first.state.test_url, token, tmp_path / "edge")
        await agent.__aenter__()
        try:
            await wait_site(client, headers, "connected")
            iid = await launch_on_edge(client, headers)
            await wait_for_state(client, headers, iid, {"running"})
        except BaseException:
            await agent.__aexit__(None, None, None)
            raise
    await agent.__aexit__(None, None, None)
    return token, iid


async def test_after_a_portal_restart_a_site_not_back_in_the_window_is_away(
    settings, tmp_path: Path
):
    settings = settings.model_copy(update={"site_reconnect_window": 1.0})
    _, iid = await running_on_edge_then_portal_down(settings, tmp_path)
    # Down longer than three heartbeats (1 s here): no portal can still hold the agent.
    await asyncio.sleep(3.5)
    async with (
        serving(settings) as second,
        httpx.AsyncClient(base_url=second.state.test_url, timeout=30) as client,
    ):
        try:
            headers = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
            # Within the window the instance keeps its state (and its route).
            assert (await row(second, iid)).state == InstanceState.running
            away = await wait_for_state(client, headers, iid, {"unreachable"})
            assert "did not reconnect after the portal started" in away["reason"]
            await wait_for_state(client, headers, iid, {"lost"})  # the grace period (1.5 s)
        finally:
            await kill_at_site(second, iid)
            await stop_everything(second)


async def test_an_agent_back_within_the_window_keeps_its_instances_running(
    settings, tmp_path: Path
):
    token, iid = await running_on_edge_then_portal_down(settings, tmp_path)
    async with (
        serving(settings) as second,
        httpx.AsyncClient(base_url=second.state.test_url, timeout=30) as client,
    ):
        try:
            headers = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
            async with remote_agent(second.state.test_url, token, tmp_path / "edge"):
                await wait_site(client, headers, "connected")
                await asyncio.sleep(0.5)  # the reconcile of what the agent holds
                assert (await row(second, iid)).state == InstanceState.running
                assert await transitions(second, iid) == ["pending", "starting", "running"]
                stopped = await client.delete(f"/api/v1/instances/{iid}", headers=headers)
                assert stopped.status_code in (200, 202)
                await wait_for_state(client, headers, iid, {"stopped"})
        finally:
            await kill_at_site(second, iid)
            await stop_everything(second)


async def test_what_a_network_site_can_run_reaches_the_portal_when_it_changes(
    app, client, admin_headers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A program installed on a site's machine after its agent connected: the heartbeat
    says so, and the tools API and the site's record follow without a reconnect."""
    from labgate.tools.catalog import Tool

    needs = "labgate-test-program-not-installed"
    app.state.portal.catalog.tools["needy"] = Tool(
        name="needy", title="Needy", process={"command": [needs], "requires": [needs]}
    )
    token = await add_site(client, admin_headers)
    async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
        site = await wait_site(client, admin_headers, "connected")
        assert needs in site["agent"]["tools"]["needy"]
        tool = (await client.get("/api/v1/tools/needy", headers=admin_headers)).json()
        assert tool["available"] is False
        # Each site says why, named: the portal's own site and the network one.
        reason = tool["unavailable_reason"]
        assert reason.startswith("site edge: requires") and "; site local: requires" in reason

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / needs).write_text("#!/bin/sh\n")
        (bin_dir / needs).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        async with asyncio.timeout(10):
            while True:
                site = (await client.get("/api/v1/sites/edge", headers=admin_headers)).json()
                if site["agent"]["tools"]["needy"] is None:
                    break
                await asyncio.sleep(0.1)
        tool = (await client.get("/api/v1/tools/needy", headers=admin_headers)).json()
        assert tool["available"] is True, tool
