"""What a site's agent reports is checked before it is taken: an agent that lies moves no route.

The router connects to a direct site's instances at the endpoints their
agent reports: an endpoint that is a unix socket (on the router's host) or
another site's tunnel would send users' requests there. A report the portal
refuses (a state change it does not allow, a state it does not know) changes
nothing, its endpoint included; and no stored endpoint stops the route table
from loading.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from spies import spy_agent, wait_until
from sqlalchemy import select

from helpers import wait_for_state
from labgate.db.models import Instance, Site
from labgate.wire.agent import ReportMsg
from labgate.wire.routes import NO_ENDPOINT


async def add_site(
    client: httpx.AsyncClient, headers: dict[str, str], name: str, reach: str
) -> str:
    added = await client.post(
        "/api/v1/sites",
        json={"name": name, "backend": "process", "reach": reach},
        headers=headers,
    )
    assert added.status_code == 201, added.text
    return str(added.json()["token"])


async def launch_on(client: httpx.AsyncClient, headers: dict[str, str], spy: Any, site: str) -> str:
    started = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": site}, headers=headers
    )
    assert started.status_code == 202, started.text
    await wait_until(lambda: any(c["op"] == "launch" for c in spy.commands))
    return str(started.json()["id"])


async def report(spy: Any, iid: str, state: str, endpoint: str | None = None) -> None:
    await spy.report(
        ReportMsg(instance_id=iid, state=state, endpoint=endpoint, backend_state={"pid": 1})
    )


async def stop(client: httpx.AsyncClient, headers: dict[str, str], iid: str) -> None:
    """Stop the spy's instance while it is connected: it answers ``stopped``.

    Its agent gone, no stop could reach it (the spy runs nothing): the instance
    would stay ``stopping`` past the test.
    """
    stopped = await client.delete(f"/api/v1/instances/{iid}", headers=headers)
    assert stopped.status_code == 202, stopped.text
    await wait_for_state(client, headers, iid, {"stopped"}, timeout=10)


async def stored(app: Any, iid: str) -> tuple[str, str | None]:
    def read(session: Any) -> tuple[str, str | None]:
        instance = session.get(Instance, iid)
        return instance.state.value, instance.endpoint

    result: tuple[str, str | None] = await app.state.portal.run_db(read)
    return result


@pytest.mark.parametrize(
    ("reach", "endpoint"),
    [
        ("direct", "unix:/var/run/docker.sock"),
        ("direct", "tunnel:west/abcdefgh"),
        ("direct", "not-an-endpoint"),
        ("direct", "https://example.org:443"),
        ("tunnel", "tunnel:west/abcdefgh"),
    ],
)
async def test_an_endpoint_the_router_must_not_reach_is_refused(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], reach: str, endpoint: str
) -> None:
    token = await add_site(client, admin_headers, "east", reach)
    async with spy_agent(app.state.test_url, "east", token) as spy:
        iid = await launch_on(client, admin_headers, spy, "east")
        await report(spy, iid, "starting")
        await report(spy, iid, "running", endpoint)
        await asyncio.sleep(0.5)
        # Refused whole: not running, no endpoint taken, no route to it.
        state, taken = await stored(app, iid)
        assert (state, taken or None) == ("starting", None)
        routes = app.state.portal.routes.table.routes
        assert iid not in routes or routes[iid].upstream != endpoint
        await report(spy, iid, "running", "http://10.1.2.3:8888")  # an honest one after
        await wait_until(lambda: iid in routes and routes[iid].state == "running")
        assert (await stored(app, iid)) == ("running", "http://10.1.2.3:8888")
        if reach == "direct":
            assert routes[iid].upstream == "http://10.1.2.3:8888"
        # The connection carried on: the agent was not cut off for it.
        assert spy.ws.close_code is None
        await stop(client, admin_headers, iid)


async def test_a_refused_state_change_leaves_the_endpoint_alone(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    token = await add_site(client, admin_headers, "east", "direct")
    async with spy_agent(app.state.test_url, "east", token) as spy:
        iid = await launch_on(client, admin_headers, spy, "east")
        # pending -> running is not a move the portal allows: nothing of it is taken.
        await report(spy, iid, "running", "http://10.9.9.9:1")
        await report(spy, iid, "bogus", "http://10.9.9.9:2")
        await asyncio.sleep(0.5)
        state, endpoint = await stored(app, iid)
        assert (state, endpoint or None) == ("pending", None)
        await report(spy, iid, "starting")
        await report(spy, iid, "running")
        await asyncio.sleep(0.5)
        state, endpoint = await stored(app, iid)
        assert not endpoint
        assert spy.ws.close_code is None
        await stop(client, admin_headers, iid)


async def test_a_bad_stored_endpoint_does_not_stop_the_route_table_loading(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: Any
) -> None:
    alice = await make_user("alice")
    started = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    iid = started.json()["id"]
    await wait_for_state(client, alice, iid, {"running"})

    def plant(session: Any) -> None:
        instance = session.get(Instance, iid)
        instance.endpoint = "not-an-endpoint"  # as an older version could have stored

    portal = app.state.portal
    await portal.run_db(plant)
    await portal.run_db(portal.routes.load)  # what every start does: no exception
    assert iid not in portal.routes.table.routes


@pytest.mark.parametrize("reach", ["direct", "tunnel"])
async def test_only_a_tunneled_sites_launches_may_listen_on_a_socket(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], reach: str
) -> None:
    """The agent alone connects to a tunneled site's instances: their tools may take a Unix
    socket (docs/sites.md); a directly reached site's must listen where the router can."""
    token = await add_site(client, admin_headers, "east", reach)
    async with spy_agent(app.state.test_url, "east", token) as spy:
        iid = await launch_on(client, admin_headers, spy, "east")
        launched = next(c for c in spy.commands if c["op"] == "launch")
        assert launched["args"]["spec"]["on_socket"] is (reach == "tunnel")
        await report(spy, iid, "starting")
        await stop(client, admin_headers, iid)


async def test_a_socket_endpoint_is_never_the_routers_once_the_site_is_reached_directly(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """An instance of a tunneled site on a Unix socket (or an agent's lie about one): the
    site is not switched to ``direct`` under it (409), and should the switch happen anyway
    (a report taken as it commits), the router does not look the path up on its own host."""
    token = await add_site(client, admin_headers, "east", "tunnel")
    portal = app.state.portal
    routes = portal.routes.table.routes
    endpoint = "unix:/run/podman/podman.sock"
    async with spy_agent(app.state.test_url, "east", token) as spy:
        iid = await launch_on(client, admin_headers, spy, "east")
        await report(spy, iid, "starting")
        await report(spy, iid, "running", endpoint)
        await wait_until(lambda: iid in routes and routes[iid].state == "running")
        assert routes[iid].upstream == f"tunnel:east/{iid}"
        refused = await client.patch(
            "/api/v1/sites/east", json={"reach": "direct"}, headers=admin_headers
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "instances_on_sockets"
        assert iid in refused.json()["detail"]
        site = await client.get("/api/v1/sites/east", headers=admin_headers)
        assert site.json()["reach"] == "tunnel"
        assert routes[iid].upstream == f"tunnel:east/{iid}"

        def switch(session: Any) -> None:
            session.scalars(select(Site).where(Site.name == "east")).one().reach = "direct"

        await portal.run_db(switch)
        await portal.site_hub.register("east", "process", "direct")  # what a PATCH does next
        await wait_until(lambda: not routes[iid].upstream.startswith("tunnel:"))
        assert routes[iid].upstream == NO_ENDPOINT
    # The agent is away now: the instance's route still never leads to the socket.
    await wait_for_state(client, admin_headers, iid, {"unreachable"}, timeout=20)
    assert routes[iid].upstream == NO_ENDPOINT
    assert (await stored(app, iid))[1] == endpoint
    async with spy_agent(app.state.test_url, "east", token) as again:
        again.seq = spy.seq  # the same agent, back: its reports carry on its numbering
        for _ in range(200):
            site = await client.get("/api/v1/sites/east", headers=admin_headers)
            if site.json()["status"] == "connected":
                break
            await asyncio.sleep(0.05)
        await stop(client, admin_headers, iid)
    # With nothing on a socket any more, the switch is taken.
    back = await client.patch("/api/v1/sites/east", json={"reach": "tunnel"}, headers=admin_headers)
    assert back.status_code == 200, back.text
    again_direct = await client.patch(
        "/api/v1/sites/east", json={"reach": "direct"}, headers=admin_headers
    )
    assert again_direct.status_code == 200, again_direct.text
