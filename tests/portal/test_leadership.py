"""Two portal replicas on one PostgreSQL database: one leads, and culling happens once.

Each replica here is a full portal app served by uvicorn, with the local
process site (so that real instances run) and a leader election of its own
with a short lease. ``labgate portal`` itself (no local sites) is tested in
``tests/test_portal_command.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from helpers import ADMIN_PASSWORD, PASSWORD, serving, stop_everything, token_for, wait_for_state
from labgate.config import Settings
from labgate.db.models import InstanceEvent, UsageRecord
from labgate.portal.app import build_portal
from labgate.scheduler.leader import LeaseElection
from servers import processes_with_env
from tools_fixtures import QUICK_TOOL

pytestmark = pytest.mark.skipif(
    not os.environ.get("LABGATE_TEST_DB_URL"),
    reason="portal replicas need PostgreSQL: set LABGATE_TEST_DB_URL (docs/development.md)",
)

LEASE = 3.0  # both replicas share one event loop here: a start of one blocks the other
METRICS_TOKEN = "scrape-me"
#: Idle for longer than a lease: a leader paused just after the launch has lost
#: its lease (and stopped believing it leads) before the instance is due.
IDLER = (
    QUICK_TOOL.replace('name = "quick"', 'name = "idler"')
    .replace("idle_timeout = 2", f"idle_timeout = {LEASE + 2:g}")
    .replace("culled after 2 s idle", "culled when idle")
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    (settings.tools_dir / "idler.toml").write_text(IDLER)
    settings.cull_interval = 0.2
    settings.cull_warning = 0.5
    settings.metrics_token = SecretStr(METRICS_TOKEN)
    settings.leader_lease_seconds = LEASE
    return settings


@contextlib.asynccontextmanager
async def replica(settings: Settings, name: str) -> AsyncIterator[Any]:
    """A portal app that elects its leader through the shared database."""
    portal = build_portal(settings)
    portal.leader = LeaseElection(portal.db, name, settings.leader_lease_seconds)
    async with serving(settings, portal=portal) as application:
        yield application


def other(settings: Settings, tmp_path: Any) -> Settings:
    """The second replica's settings: same database and key, its own data directory."""
    return settings.model_copy(update={"data_dir": tmp_path / "var-b"})


async def readiness(application: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=application.state.test_url) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def leader_gauge(application: Any) -> str:
    async with httpx.AsyncClient(base_url=application.state.test_url) as client:
        response = await client.get(
            "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
    assert response.status_code == 200, response.text
    return next(line for line in response.text.splitlines() if line.startswith("labgate_leader{"))


async def launch_idler(application: Any) -> tuple[str, httpx.AsyncClient, dict[str, str]]:
    """Alice launches the idler tool on ``application``; (instance id, client, her headers)."""
    client = httpx.AsyncClient(base_url=application.state.test_url, timeout=30)
    admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
    made = await client.post(
        "/api/v1/users", json={"name": "alice", "password": PASSWORD}, headers=admin
    )
    assert made.status_code == 201, made.text
    alice = await token_for(client, "alice", PASSWORD)
    launched = await client.post("/api/v1/instances", json={"tool": "idler"}, headers=alice)
    assert launched.status_code == 202, launched.text
    instance_id = str(launched.json()["id"])
    await wait_for_state(client, alice, instance_id, {"running"})
    return instance_id, client, alice


async def stops_of(application: Any, instance_id: str) -> list[InstanceEvent]:
    return await application.state.portal.run_db(
        lambda s: list(
            s.scalars(
                select(InstanceEvent).where(
                    InstanceEvent.instance_id == instance_id, InstanceEvent.state == "stopping"
                )
            )
        )
    )


def culls(application: Any) -> float:
    value = application.state.metrics.registry.get_sample_value(
        "labgate_culls_total", {"reason": "idle"}
    )
    return float(value or 0.0)


async def until_leads(application: Any, timeout: float) -> float:
    """Seconds until ``application``'s replica leads."""
    began = time.monotonic()
    while not application.state.portal.leader.leading:
        assert time.monotonic() - began < timeout, "the other replica did not take over"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_one_replica_leads_and_a_stopped_leaders_cull_still_happens_once(
    settings: Settings, tmp_path: Any
) -> None:
    first = contextlib.AsyncExitStack()
    a = await first.enter_async_context(replica(settings, "a"))
    async with replica(other(settings, tmp_path), "b") as b:
        try:
            ready_a, ready_b = await readiness(a), await readiness(b)
            assert (ready_a["replica"], ready_a["leading"], ready_a["leader"]) == ("a", True, "a")
            assert (ready_b["replica"], ready_b["leading"], ready_b["leader"]) == ("b", False, "a")
            assert await leader_gauge(a) == 'labgate_leader{replica="a"} 1.0'
            assert await leader_gauge(b) == 'labgate_leader{replica="b"} 0.0'

            instance_id, client, alice = await launch_idler(a)
            await client.aclose()
            await first.aclose()  # the leader stops; its instance keeps running
            assert await until_leads(b, LEASE) < LEASE
            assert (await readiness(b))["leader"] == "b"

            async with httpx.AsyncClient(base_url=b.state.test_url, timeout=30) as client_b:
                await wait_for_state(client_b, alice, instance_id, {"stopped"}, timeout=20)
            stops = await stops_of(b, instance_id)
            assert [e.data.get("reason") for e in stops] == ["idle"]
            assert culls(b) == 1
            reason = await b.state.portal.run_db(
                lambda s: s.scalar(
                    select(UsageRecord.reason).where(UsageRecord.instance_id == instance_id)
                )
            )
            assert reason == "idle"
        finally:
            await first.aclose()
            await stop_everything(b)


async def test_a_paused_leader_culls_nothing_after_losing_its_lease(
    settings: Settings, tmp_path: Any
) -> None:
    async with replica(settings, "a") as a, replica(other(settings, tmp_path), "b") as b:
        try:
            # Launched through b, so that b's own in-process site runs it (both
            # replicas here have a local site; `labgate portal` has none).
            instance_id, client, alice = await launch_idler(b)
            # a freezes as far as the election goes (its renewals stop), but its
            # culler, pools and reconciler keep running, as in a process paused
            # between two of their rounds.
            a.state.portal.leader.renewing = False
            await until_leads(b, LEASE * 2)
            assert not a.state.portal.leader.leading
            await wait_for_state(client, alice, instance_id, {"stopped"}, timeout=20)
            await client.aclose()
            await asyncio.sleep(0.5)  # a few more rounds of a's culler
            stops = await stops_of(a, instance_id)
            assert [e.data.get("reason") for e in stops] == ["idle"]
            assert (culls(a), culls(b)) == (0, 1)
            assert (await readiness(a))["leader"] == "b"
        finally:
            await stop_everything(b)


@contextlib.asynccontextmanager
async def portal_replica(settings: Settings) -> AsyncIterator[Any]:
    """A replica as ``labgate portal`` builds it: no sites of its own, elected leader."""
    async with serving(settings, portal=build_portal(settings, replicated=True)) as application:
        yield application


async def test_a_replica_started_later_leaves_a_site_another_replica_hears_alone(
    settings: Settings, tmp_path: Any
) -> None:
    from site_agents import remote_agent

    settings = settings.model_copy(
        update={"site_heartbeat_interval": 1.0, "site_grace_period": 1.0, "replica_id": "a"}
    )
    async with portal_replica(settings) as a:
        client = httpx.AsyncClient(base_url=a.state.test_url, timeout=30)
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        created = await client.post(
            "/api/v1/sites", json={"name": "edge", "backend": "process"}, headers=admin
        )
        assert created.status_code == 201, created.text
        agent_dir = tmp_path / "edge"
        async with remote_agent(a.state.test_url, created.json()["token"], agent_dir):
            async with asyncio.timeout(20):
                while (await client.get("/api/v1/sites/edge", headers=admin)).json()[
                    "status"
                ] != "connected":
                    await asyncio.sleep(0.05)
            launched = await client.post(
                "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin
            )
            assert launched.status_code == 202, launched.text
            instance_id = str(launched.json()["id"])
            try:
                await wait_for_state(client, admin, instance_id, {"running"})
                b_settings = other(settings, tmp_path).model_copy(update={"replica_id": "b"})
                async with portal_replica(b_settings) as b:
                    assert (await readiness(b))["leader"] == "a"
                    await asyncio.sleep(2.5)  # past the grace period b would have started
                    async with httpx.AsyncClient(base_url=b.state.test_url) as client_b:
                        seen = await client_b.get(f"/api/v1/instances/{instance_id}", headers=admin)
                    events = await a.state.portal.run_db(
                        lambda s: [
                            (e.state.value, e.message)
                            for e in s.scalars(
                                select(InstanceEvent).where(
                                    InstanceEvent.instance_id == instance_id
                                )
                            )
                        ]
                    )
                    assert seen.json()["state"] == "running", events
                states = await a.state.portal.run_db(
                    lambda s: [
                        e.state.value
                        for e in s.scalars(
                            select(InstanceEvent).where(InstanceEvent.instance_id == instance_id)
                        )
                    ]
                )
                assert "unreachable" not in states and "lost" not in states
            finally:
                await stop_everything(a)
                await client.aclose()


@contextlib.asynccontextmanager
async def edge_site(client: httpx.AsyncClient, admin: dict[str, str], agent_dir: Any) -> Any:
    """A network site ``edge`` whose agent dials the replica ``client`` talks to."""
    from site_agents import remote_agent

    created = await client.post(
        "/api/v1/sites", json={"name": "edge", "backend": "process"}, headers=admin
    )
    assert created.status_code == 201, created.text
    async with remote_agent(str(client.base_url), created.json()["token"], agent_dir) as agent:
        async with asyncio.timeout(20):
            while (await client.get("/api/v1/sites/edge", headers=admin)).json()[
                "status"
            ] != "connected":
                await asyncio.sleep(0.05)
        yield agent


async def test_a_leader_without_the_agent_culls_through_the_replica_that_has_it(
    settings: Settings, tmp_path: Any
) -> None:
    quick = {"site_heartbeat_interval": 1.0, "site_grace_period": 30.0}
    a_settings = settings.model_copy(update={**quick, "replica_id": "a"})
    b_settings = other(settings, tmp_path).model_copy(update={**quick, "replica_id": "b"})
    async with portal_replica(a_settings) as a, portal_replica(b_settings) as b:
        client = httpx.AsyncClient(base_url=a.state.test_url, timeout=30)
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        try:
            async with edge_site(client, admin, tmp_path / "edge"):
                launched = await client.post(
                    "/api/v1/instances", json={"tool": "idler", "site": "edge"}, headers=admin
                )
                assert launched.status_code == 202, launched.text
                instance_id = str(launched.json()["id"])
                await wait_for_state(client, admin, instance_id, {"running"})
                # b leads; the agent stays connected to a.
                a.state.portal.leader.renewing = False
                await until_leads(b, LEASE * 2)
                await wait_for_state(client, admin, instance_id, {"stopped"}, timeout=30)
                stops = await stops_of(a, instance_id)
                assert [e.data.get("reason") for e in stops] == ["idle"]
                assert (culls(a), culls(b)) == (0, 1)
                async with asyncio.timeout(10):  # the agent stopped it for real
                    while processes_with_env("LABGATE_INSTANCE_ID", instance_id):
                        await asyncio.sleep(0.1)
                await stop_everything(a)
        finally:
            await client.aclose()


async def test_activity_reported_to_a_replica_that_does_not_lead_keeps_an_instance(
    settings: Settings, tmp_path: Any
) -> None:
    from labgate.security import router_token

    quick = {"site_heartbeat_interval": 1.0, "site_grace_period": 30.0}
    a_settings = settings.model_copy(update={**quick, "replica_id": "a"})
    b_settings = other(settings, tmp_path).model_copy(update={**quick, "replica_id": "b"})
    router = {"Authorization": f"token {router_token(settings.signing_key())}"}
    async with portal_replica(a_settings) as a, portal_replica(b_settings) as b:
        client = httpx.AsyncClient(base_url=a.state.test_url, timeout=30)
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        try:
            async with (
                edge_site(client, admin, tmp_path / "edge"),
                httpx.AsyncClient(base_url=b.state.test_url, headers=router) as to_b,
            ):
                launched = await client.post(
                    "/api/v1/instances", json={"tool": "idler", "site": "edge"}, headers=admin
                )
                assert launched.status_code == 202, launched.text
                instance_id = str(launched.json()["id"])
                await wait_for_state(client, admin, instance_id, {"running"})
                assert a.state.portal.leader.leading
                # A router that reports to b (which does not cull) sees the instance used.
                used_until = time.monotonic() + LEASE + 5
                while time.monotonic() < used_until:
                    report = {
                        "worker": "router-1",
                        "activity": {instance_id: {"last_request": time.time()}},
                    }
                    sent = await to_b.post("/api/v1/router/activity", json=report)
                    assert sent.status_code == 204, sent.text
                    await asyncio.sleep(0.5)
                body = (await client.get(f"/api/v1/instances/{instance_id}", headers=admin)).json()
                assert body["state"] == "running"  # past its idle timeout since the start
                # No more use: the leader culls it.
                await wait_for_state(client, admin, instance_id, {"stopped"}, timeout=30)
                assert culls(a) == 1
                await stop_everything(a)
        finally:
            await client.aclose()
