"""Commands for a network site whose agent is connected to another portal on the same database.

Replica A and replica B share one PostgreSQL database; the site's agent (a
real RemoteAgent with the process backend) is connected to B. Logs and stops
asked of A reach the agent through B. Needs PostgreSQL: LABGATE_TEST_DB_URL
(docs/development.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, select

from helpers import (
    ADMIN_PASSWORD,
    needs_postgres,
    replica,
    serving,
    stop_everything,
    token_for,
    wait_for_state,
)
from labgate.agent.network import SiteAway
from labgate.config import Settings
from labgate.db.listen import libpq_url
from labgate.db.models import InstanceEvent
from labgate.portal import site_relay
from site_agents import remote_agent

pytestmark = [
    pytest.mark.postgres,
    needs_postgres,
]


@contextlib.asynccontextmanager
async def overheard(database_url: str) -> AsyncIterator[list[tuple[str, str]]]:
    """Everything said on the relay's channels while the block runs: (channel, payload)."""
    heard: list[tuple[str, str]] = []
    conn = await psycopg.AsyncConnection.connect(libpq_url(database_url), autocommit=True)
    conn.add_notify_handler(lambda note: heard.append((note.channel, note.payload)))
    await conn.execute(f"LISTEN {site_relay.CALLS}")
    await conn.execute(f"LISTEN {site_relay.RESULTS}")
    try:
        yield heard
        await asyncio.sleep(0.2)
        await conn.execute("SELECT 1")  # takes in what arrived meanwhile
    finally:
        await conn.close()


async def events_of(client: httpx.AsyncClient, headers: dict[str, str], iid: str) -> list[str]:
    """An instance's events, for failure messages."""
    async with client.stream(
        "GET", f"/api/v1/instances/{iid}/events", headers=headers, timeout=10
    ) as response:
        return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def site_status(client: httpx.AsyncClient, headers: dict[str, str], status: str) -> None:
    async with asyncio.timeout(20):
        while (await client.get("/api/v1/sites/edge", headers=headers)).json()["status"] != status:
            await asyncio.sleep(0.05)


async def launch_on_edge(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    """A ``demo`` launched on the site ``edge`` through ``client``: its id."""
    launched = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=headers
    )
    assert launched.status_code == 202, launched.text
    return str(launched.json()["id"])


async def running_on_edge(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    """Once ``client``'s portal sees ``edge`` connected, a ``demo`` launched there and
    running: its id."""
    await site_status(client, headers, "connected")
    iid = await launch_on_edge(client, headers)
    body = await wait_for_state(client, headers, iid, {"running", "failed"})
    assert body["state"] == "running", await events_of(client, headers, iid)
    return iid


@contextlib.asynccontextmanager
async def portal_with_edge(
    settings: Settings, scopes: tuple[str, ...] = ("admin", "account")
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, dict[str, str], str]]:
    """Replica A, a client of it, an admin's headers and the token of its new site ``edge``."""
    async with replica(settings) as a, httpx.AsyncClient(base_url=a.state.test_url) as client:
        admin = await token_for(client, "admin", ADMIN_PASSWORD, list(scopes))
        created = await client.post(
            "/api/v1/sites", json={"name": "edge", "backend": "process"}, headers=admin
        )
        assert created.status_code == 201, created.text
        yield a, client, admin, str(created.json()["token"])


@contextlib.asynccontextmanager
async def another_replica(
    settings: Settings, data_dir: Path
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """Replica B on the same database (a data directory of its own) and a client of it."""
    async with (
        replica(settings.model_copy(update={"data_dir": data_dir})) as b,
        httpx.AsyncClient(base_url=b.state.test_url, timeout=30) as client,
    ):
        yield b, client


async def test_commands_on_one_portal_reach_an_agent_connected_to_another(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scopes = ("admin", "account", "instances:access")
    async with portal_with_edge(settings, scopes) as (a, client_a, admin, token):
        async with (
            another_replica(settings, tmp_path / "var-b") as (b, client_b),
            remote_agent(b.state.test_url, token, tmp_path / "edge"),
        ):
            try:
                iid = await running_on_edge(client_b, admin)

                # Asked of A, which has no connection of the site: relayed through B.
                async with overheard(settings.database_url) as heard:
                    logs = await client_a.get(f"/api/v1/instances/{iid}/logs", headers=admin)
                    assert logs.status_code == 200, logs.text
                    assert "demo: listening" in logs.json()["text"]
                # What crossed the database was sealed: neither the command nor the logs show.
                assert heard and all(
                    iid not in p and "logs" not in p and "listening" not in p for _, p in heard
                )
                # Sent again by someone who can NOTIFY, the command is not run again;
                # one that does not open with the portals' key is not run at all.
                calls = [p for channel, p in heard if channel == site_relay.CALLS]
                forged = json.loads(calls[0]) | {"id": "f" * 32, "p": "lgs1_" + "A" * 60}
                await b.state.portal.run_db(
                    lambda s: [
                        s.execute(select(func.pg_notify(site_relay.CALLS, p)))
                        for p in [*calls, json.dumps(forged)]
                    ]
                )
                await asyncio.sleep(0.5)
                assert "refused a relayed command for site edge" in caplog.text
                assert "does not open with this portal's key" in caplog.text
                stopped = await client_a.delete(f"/api/v1/instances/{iid}", headers=admin)
                assert stopped.status_code == 202, stopped.text
                body = await wait_for_state(client_a, admin, iid, {"stopped", "lost"}, timeout=30)
                assert body["state"] == "stopped", body
            finally:
                await stop_everything(b)  # through B, while the agent is still connected

        # No portal holds the site now: A says so within the acknowledgement timeout.
        started = time.monotonic()
        relay = a.state.replicas.relay
        with pytest.raises(site_relay.SiteUnavailable, match="not connected"):
            await relay.call("edge", "logs", {"instance_id": iid, "backend_state": {}}, 30.0)
        assert time.monotonic() - started < site_relay.ACK_TIMEOUT + 1


async def test_a_launch_on_a_portal_without_the_agent_is_admitted_and_runs_there(
    settings: Settings, tmp_path: Path
) -> None:
    """Any portal admits a launch on a network site; its agent, on another, starts it."""
    settings = settings.model_copy(update={"site_heartbeat_interval": 0.5})
    async with portal_with_edge(settings) as (_a, client_a, admin, token):
        async with (
            another_replica(settings, tmp_path / "var-b") as (b, client_b),
            remote_agent(b.state.test_url, token, tmp_path / "edge"),
        ):
            try:
                await site_status(client_b, admin, "connected")
                await asyncio.sleep(2 * settings.site_heartbeat_interval)  # A reads the row
                iid = await launch_on_edge(client_a, admin)
                body = await wait_for_state(client_a, admin, iid, {"running", "failed"})
                assert body["state"] == "running", await events_of(client_a, admin, iid)
                stopped = await client_a.delete(f"/api/v1/instances/{iid}", headers=admin)
                assert stopped.status_code == 202, stopped.text
                body = await wait_for_state(client_a, admin, iid, {"stopped", "lost"}, timeout=30)
                assert body["state"] == "stopped", body
            finally:
                await stop_everything(b)
        # With the agent gone from every portal, A admits no launch there.
        await asyncio.sleep(2 * settings.site_heartbeat_interval)
        refused = await client_a.post(
            "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin
        )
        assert refused.status_code in (409, 503), refused.text
        assert refused.json()["error"] == "site_unavailable", refused.text


async def test_a_relayed_launch_whose_agent_goes_as_it_leaves_waits_for_the_agent(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's connection breaks as the relayed launch leaves: pending, not failed.

    As on the portal holding the agent, the launch waits for the agent to
    connect again and is sent again then.
    """
    settings = settings.model_copy(update={"site_heartbeat_interval": 0.5})
    async with (
        portal_with_edge(settings) as (a, client_a, admin, token),
        another_replica(settings, tmp_path / "var-b") as (b, client_b),
    ):
        try:
            link = b.state.portal.links["edge"]
            call = link.call
            broke: list[str] = []

            async def breaks_once(op: str, args: dict, wait: float | None = None) -> object:
                if op == "launch" and not broke:
                    broke.append(op)
                    raise SiteAway("site edge: the connection broke (as the launch left)")
                return await call(op, args, wait)

            async with remote_agent(b.state.test_url, token, tmp_path / "edge"):
                await site_status(client_b, admin, "connected")
                await asyncio.sleep(2 * settings.site_heartbeat_interval)  # A reads the row
                monkeypatch.setattr(link, "call", breaks_once)
                iid = await launch_on_edge(client_a, admin)
                async with asyncio.timeout(20):
                    while not broke:
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # what A makes of the relayed answer
                body = (await client_a.get(f"/api/v1/instances/{iid}", headers=admin)).json()
                assert body["state"] == "pending", body
                notes = await a.state.portal.run_db(
                    lambda s: list(
                        s.scalars(
                            select(InstanceEvent.message).where(InstanceEvent.instance_id == iid)
                        )
                    )
                )
                assert any("connect again" in note for note in notes), notes
            # The agent connects again (to B): the launch is sent again, and runs.
            async with remote_agent(b.state.test_url, token, tmp_path / "edge"):
                body = await wait_for_state(client_a, admin, iid, {"running", "failed"})
                assert body["state"] == "running", await events_of(client_a, admin, iid)
                await stop_everything(b)
        finally:
            await stop_everything(b)


async def test_an_agent_that_hops_to_another_portal_as_it_leaves_loses_nothing(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent leaves A and connects to B while A records its departure: running again.

    A marks the site's instances unreachable in the transaction that says the
    site is away; B, recording the connect, waits for that row and then brings
    them back. (Marked one by one afterwards, the last marks landed after B's
    reconcile, and the instances stayed unreachable.)
    """
    from labgate.scheduler.instances import InstanceManager

    settings = settings.model_copy(update={"site_heartbeat_interval": 0.5})
    held, release = asyncio.Event(), asyncio.Event()
    async with (
        portal_with_edge(settings) as (a, client_a, admin, token),
        another_replica(settings, tmp_path / "var-b") as (b, client_b),
    ):
        try:
            async with remote_agent(a.state.test_url, token, tmp_path / "edge"):
                iid = await running_on_edge(client_a, admin)
                apply = InstanceManager.apply

                async def held_apply(
                    self: InstanceManager, report: Any, *, site: str | None = None
                ) -> None:
                    if self is a.state.portal.instances and report.state == "unreachable":
                        held.set()
                        await release.wait()
                    await apply(self, report, site=site)

                monkeypatch.setattr(InstanceManager, "apply", held_apply)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.wait(), 3)  # where a departure once paused
            await site_status(client_a, admin, "disconnected")
            async with remote_agent(b.state.test_url, token, tmp_path / "edge"):
                await site_status(client_b, admin, "connected")
                await asyncio.sleep(1.0)  # B reconciles
                release.set()
                await asyncio.sleep(1.0)  # whatever A still does
                body = await wait_for_state(client_b, admin, iid, {"running"})
                assert body["state"] == "running", body
                now = (await client_b.get(f"/api/v1/instances/{iid}", headers=admin)).json()
                assert now["state"] == "running", now
                await stop_everything(b)
        finally:
            release.set()
            await stop_everything(b)


async def test_a_portal_that_starts_leaves_a_site_held_by_another_alone(
    settings: Settings, tmp_path: Path
) -> None:
    quick = {"site_heartbeat_interval": 0.5, "site_grace_period": 1.0}
    settings = settings.model_copy(update=quick)
    settings_c = settings.model_copy(update={"data_dir": tmp_path / "var-c"})
    async with (
        portal_with_edge(settings) as (_a, _client_a, admin, token),
        another_replica(settings, tmp_path / "var-b") as (b, client_b),
        remote_agent(b.state.test_url, token, tmp_path / "edge"),
    ):
        try:
            iid = await running_on_edge(client_b, admin)

            # Portal C starts while B holds the site's agent: past C's grace period
            # (and past the time a stale row would take), nothing changed.
            async with serving(settings_c) as c:  # not replica(): it would stop them all
                await asyncio.sleep(3 * 0.5 + 1.0 + 1.0)
                links = c.state.portal.links
                assert not links["edge"].live
            body = (await client_b.get(f"/api/v1/instances/{iid}", headers=admin)).json()
            assert body["state"] == "running", await events_of(client_b, admin, iid)
            site = (await client_b.get("/api/v1/sites/edge", headers=admin)).json()
            assert site["status"] == "connected", site
        finally:
            await stop_everything(b)
