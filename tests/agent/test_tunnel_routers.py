"""A tunneled site's instances answer through every router of a split deployment.

The split deployment of deploy/ (two portals on PostgreSQL, two routers, an
agent whose control connection lands on router A and portal 1), with router B
following portal 2 first: so B learns the site's tunnel epoch from the
database, not from the portal that holds the agent. The site is tunneled
(nothing connects into it): its agent keeps a data connection to each router
at the address the router registered on its route stream
(docs/sites.md, "Several routers").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from spies import add_site, spy_agent, wait_until
from websockets.sync.client import connect as ws_connect

from helpers import ADMIN_PASSWORD, needs_postgres, replica, token_for
from labgate.agent.tunnel import dial
from labgate.router import start_router
from servers import wait_state
from split_deployment import SplitDeployment, enrol, launch_on, wait_connected

pytestmark = [pytest.mark.postgres, needs_postgres]

#: Test pace: heartbeats (and so tickets and the routers' list) every second.
HEARTBEAT = "1"


def reach(router: str, iid: str, admin: dict[str, str]) -> None:
    """The instance answers through ``router``: a page, and a WebSocket echo."""
    page = httpx.get(f"{router}/i/{iid}/api/info", headers=admin, timeout=10)
    assert page.status_code == 200, (router, page.status_code, page.text)
    ws_url = router.replace("http://", "ws://", 1) + f"/i/{iid}/ws"
    with ws_connect(ws_url, additional_headers=admin, open_timeout=10) as ws:
        ws.send("through " + router)
        assert ws.recv(timeout=10) == "through " + router


def until_reached(
    router: str, iid: str, admin: dict[str, str], deployment: SplitDeployment
) -> None:
    """Wait (up to 30 s) until the instance answers through ``router``."""
    deadline = time.monotonic() + 30
    while True:
        try:
            reach(router, iid, admin)
            return
        except (AssertionError, OSError, httpx.HTTPError) as problem:
            if time.monotonic() > deadline:
                raise AssertionError(f"{problem}\n{deployment.logs()}") from None
            time.sleep(0.2)


@pytest.fixture
def deployment(tmp_path: Path, database_url: str) -> Iterator[SplitDeployment]:
    split = SplitDeployment(
        tmp_path,
        database_url,
        portals=2,
        routers=2,
        extra={"LABGATE_SITE_HEARTBEAT_INTERVAL": HEARTBEAT},
    )
    # Router B follows portal 2 (the agent's portal is portal 1, through router A).
    split.routers[1].env["LABGATE_ROUTER_PORTALS"] = " ".join(reversed(split.portal_urls))
    try:
        split.start()
        yield split
    finally:
        split.stop()


@pytest.mark.slow
def test_a_tunneled_site_answers_through_every_router(deployment: SplitDeployment) -> None:
    admin = deployment.admin()
    a, b = deployment.router_urls
    with httpx.Client(base_url=a, headers=admin, timeout=10) as api:
        deployment.add_agent(enrol(api, "nat", reach="tunnel"))
        wait_connected(api, "nat", deployment)
        iid = launch_on(api, "nat")
        body = wait_state(api, iid, {"running", "failed"}, timeout=60)
        assert body["state"] == "running", (body, deployment.logs())
    # Through A (its portal holds the agent) and through B (it follows the other portal).
    until_reached(a, iid, admin, deployment)
    until_reached(b, iid, admin, deployment)

    # Router B dies and comes back: the agent dials it again, requests through it work.
    router_b = deployment.routers[1]
    router_b.kill()
    reach(a, iid, admin)  # nothing through A is touched
    deployment.start_router(1)
    until_reached(b, iid, admin, deployment)
    reach(a, iid, admin)

    # A router the agent cannot dial (its address leads nowhere) has no data connection
    # of the site: it answers 503 "not connected" at once, never hangs.
    router_b.stop()
    router_b.env["LABGATE_ROUTER_TUNNEL_URL"] = "http://127.0.0.1:1"
    deployment.start_router(1)
    time.sleep(2 * float(HEARTBEAT))  # the agent has the list naming it by now
    for _ in range(3):
        started = time.monotonic()
        page = httpx.get(f"{b}/i/{iid}/api/info", headers=admin, timeout=10)
        assert time.monotonic() - started < 2
        assert page.status_code == 503, (page.text, deployment.logs())
        assert "its site is not connected" in page.text
        assert page.headers["retry-after"]
    reach(a, iid, admin)

    with httpx.Client(base_url=a, headers=admin, timeout=10) as api:
        api.delete(f"/api/v1/instances/{iid}")
        assert wait_state(api, iid, {"stopped", "lost"})["state"] == "stopped"


async def test_a_sites_tunnel_door_opens_and_closes_at_the_routers_of_every_portal(
    settings, tmp_path
):
    """The agent is connected to portal A; a router following portal B takes its tickets.

    The epoch of the agent's control connection reaches B through the database;
    when that connection ends, B's router cuts the site's data connection too.
    """
    settings_b = settings.model_copy(update={"data_dir": tmp_path / "var-b"})
    async with replica(settings) as a, replica(settings_b) as b:
        async with httpx.AsyncClient(base_url=a.state.test_url, timeout=30) as client:
            admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
            token = await add_site(client, admin, "east")
        table_b = b.state.portal.routes.table
        router_b = await start_router(table_b, "127.0.0.1", 0, b.state.test_url, settings_b)
        try:
            async with spy_agent(a.state.test_url, "east", token) as spy:
                await wait_until(lambda: spy.tickets)
                epoch = a.state.portal.site_hub.epochs["east"]
                await wait_until(lambda: table_b.tunnel_sites.get("east") == epoch)
                tunnel = await dial(f"http://127.0.0.1:{router_b.port}", spy.tickets[-1], {}.get)
            await asyncio.wait_for(asyncio.shield(tunnel.closed), 5)
            assert "east" not in table_b.tunnel_sites
        finally:
            await router_b.close()
