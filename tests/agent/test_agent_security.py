"""What a site's agent learns: only what its own instances need, never anyone's credentials.

The agents here are spies: raw WebSocket clients speaking the agent protocol,
recording every message the portal sends them, as a compromised site would.
"""

from __future__ import annotations

import asyncio

import pytest
from spies import add_site, spy_agent, wait_until

from helpers import TEST_SECRET_KEY
from labgate.agent.tunnel import TunnelRefused, dial
from labgate.db.models import TunnelRouter
from labgate.security import SESSION_COOKIE, router_token
from labgate.wire.stream import STREAM_PATH, TUNNEL_HEADER

PASSWORD = "a-users-own-password-42"


async def test_an_agent_gets_its_instances_secrets_and_nobodys_credentials(
    app, client, admin_headers
):
    east = await add_site(client, admin_headers, "east")
    west = await add_site(client, admin_headers, "west")
    created = await client.post(
        "/api/v1/users", json={"name": "bea", "password": PASSWORD}, headers=admin_headers
    )
    assert created.status_code == 201
    login = await client.post("/api/v1/auth/login", json={"username": "bea", "password": PASSWORD})
    session_cookie = login.cookies.get(SESSION_COOKIE)
    assert session_cookie
    made = await client.post(
        "/api/v1/tokens",
        json={"note": "spy test"},
        headers={"X-CSRF-Token": login.json()["csrf_token"]},
    )
    bea_token = made.json()["token"]
    bea = {"Authorization": f"token {bea_token}"}
    async with (
        spy_agent(app.state.test_url, "east", east) as east_spy,
        spy_agent(app.state.test_url, "west", west) as west_spy,
    ):
        launched = await client.post(
            "/api/v1/instances", json={"tool": "demo", "site": "east"}, headers=bea
        )
        assert launched.status_code == 202, launched.text
        iid = launched.json()["id"]
        async with asyncio.timeout(10):
            while not any(c["op"] == "launch" for c in east_spy.commands):
                await asyncio.sleep(0.05)
        launch = next(c for c in east_spy.commands if c["op"] == "launch")
        secret = launch["args"]["spec"]["secret"]
        assert launch["args"]["spec"]["instance_id"] == iid and len(secret) >= 32
        # The instance's own secret goes to its site, and only there.
        assert secret in east_spy.text and secret not in west_spy.text
        assert not west_spy.commands
        # Nobody's password, session, API token or the portal's key reach any agent.
        admin_token = admin_headers["Authorization"].split()[-1]
        for spy in (east_spy, west_spy):
            for credential in (PASSWORD, bea_token, admin_token, TEST_SECRET_KEY):
                assert credential not in spy.text
            assert session_cookie not in spy.text
            assert "argon2" not in spy.text  # no password hashes either
        await client.delete(f"/api/v1/instances/{iid}", headers=bea)
        async with asyncio.timeout(10):
            while not any(c["op"] == "stop" for c in east_spy.commands):
                await asyncio.sleep(0.05)


async def test_a_sites_tunnel_ticket_opens_only_its_own_door_and_dies_with_its_token(
    app, client, admin_headers, router_url
):
    """The portal hands each tunneled site's agent tickets for its own data connections.

    A ticket opens a data connection to the router for its site only while that
    agent's control connection lives: rotating the site's token cuts the data
    connection at once, and the ticket opens nothing any more.
    """
    east = await add_site(client, admin_headers, "east")
    west = await add_site(client, admin_headers, "west")
    table = app.state.portal.routes.table
    async with (
        spy_agent(app.state.test_url, "east", east) as east_spy,
        spy_agent(app.state.test_url, "west", west) as west_spy,
    ):
        async with asyncio.timeout(10):
            while not east_spy.tickets or not west_spy.tickets:
                await asyncio.sleep(0.02)
        assert set(table.tunnel_sites) == {"east", "west"}
        tunnel = await dial(router_url, east_spy.tickets[-1], {}.get)
        # A ticket names its site: east's opens east's door, never west's.
        assert east_spy.tickets[-1].startswith("lgt_east.")
        forged = west_spy.tickets[-1].replace("lgt_west.", "lgt_east.")
        with pytest.raises(TunnelRefused, match="403"):
            await dial(router_url, forged, {}.get)
        rotated = await client.post("/api/v1/sites/east/token", headers=admin_headers)
        assert rotated.status_code == 200, rotated.text
        await asyncio.wait_for(asyncio.shield(tunnel.closed), 5)  # cut at once
        assert "east" not in table.tunnel_sites and "west" in table.tunnel_sites
        with pytest.raises(TunnelRefused, match="403"):
            await dial(router_url, east_spy.tickets[-1], {}.get)


async def test_routers_are_listed_to_agents_only_and_only_from_their_route_streams(
    app, client, admin_headers, settings
):
    """A router names its tunnel address on its route stream; agents, and nobody else, get it.

    Only the router token opens the stream (an admin's token is refused), so no
    one else can list an address for agents to send their tickets to; a
    malformed address is refused. The list goes to agents with their tickets,
    never into an answer to a user (an admin's included), and the router is
    no longer listed once its stream ends.
    """
    east = await add_site(client, admin_headers, "east")
    address = "http://10.9.8.7:8010"
    router = {"Authorization": f"token {router_token(settings.signing_key())}"}
    refused = await client.get(STREAM_PATH, headers={**admin_headers, TUNNEL_HEADER: address})
    assert refused.status_code == 403, refused.text
    bad = await client.get(STREAM_PATH, headers={**router, TUNNEL_HEADER: "ftp://10.9.8.7/x"})
    assert bad.status_code == 400, bad.text
    portal = app.state.portal
    async with client.stream("GET", STREAM_PATH, headers={**router, TUNNEL_HEADER: address}) as r:
        assert r.status_code == 200
        async with spy_agent(app.state.test_url, "east", east) as spy:
            await wait_until(lambda: spy.routers)
            # (with its public URL first: this portal runs a router of its own, as `serve` does)
            assert spy.routers[-1] == [settings.effective_public_url, address]
            for path in ("/api/v1/sites", "/api/v1/sites/east", "/readyz", "/metrics"):
                answer = await client.get(path, headers=admin_headers)
                assert answer.status_code == 200, (path, answer.text)
                assert "10.9.8.7" not in answer.text, path
    deadline = asyncio.get_running_loop().time() + 10
    while await portal.run_db(lambda s: [row.url for row in s.query(TunnelRouter)]):
        assert asyncio.get_running_loop().time() < deadline, "the router is still listed"
        await asyncio.sleep(0.05)
