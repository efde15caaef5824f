"""Open WebSockets end with the credential that opened them.

A WebSocket is checked once, at the upgrade; after that the router checks
its credentials again whenever they may have stopped holding (a session
signed out, a password changed, a user disabled, changed or removed, a token
deleted, the table replaced), as a new request with them would be checked,
and when the time they were good for runs out. Only the WebSockets whose
credentials no longer hold are closed.

The first tests go through the portal (its API makes the changes, from its
worker threads, as in production); the rest change the router's table
directly, from another thread as the portal does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from helpers import PASSWORD, wait_for_state
from labgate.config import Settings
from labgate.router.context import RouterOptions
from labgate.security import INSTANCE_COOKIE, SESSION_COOKIE, InstanceGrants, hash_token
from labgate.wire.routes import Route, TableState, TokenInfo, UserInfo
from router.conftest import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    KEY,
    ROOT,
    ROOT_TOKEN,
    Gateway,
    GatewayFactory,
)
from router.test_hosts import PORTAL, Hosted, instance_cookie, serve_root_demo

ACCESS = frozenset({"instances:access"})


async def closes_within(ws: ClientConnection, seconds: float = 1.0) -> bool:
    """Whether ``ws`` is closed within ``seconds`` (no message may come meanwhile)."""
    try:
        message = await asyncio.wait_for(ws.recv(), seconds)
    except ConnectionClosed:
        return True
    except TimeoutError:
        return False
    raise AssertionError(f"a message came instead of the end: {message!r}")


async def echoes(ws: ClientConnection) -> bool:
    """Whether ``ws`` is still open through the router to the tool."""
    try:
        await ws.send("still here")
        return await asyncio.wait_for(ws.recv(), 5) == "still here"
    except ConnectionClosed:
        return False


# --- through the portal ------------------------------------------------------


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests' settings, with bo's portal session let into ada's shared instance on /i/.

    Without ``instance_host`` a portal session opens only its user's own
    instances there (tests/router/test_portal_origin.py); these tests watch
    what closes a sharee's session WebSocket, so the operator's opt-in is on.
    """
    settings.share_on_portal_origin = True
    return settings


async def running_demo(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert launched.status_code == 202, launched.text
    iid = str(launched.json()["id"])
    await wait_for_state(client, headers, iid, {"running"})
    return iid


async def sign_in(client: httpx.AsyncClient, name: str) -> tuple[dict[str, str], str]:
    """A new portal session of ``name``: its cookie header, and its CSRF token."""
    async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as browser:
        signed = await browser.post(
            "/api/v1/auth/login", json={"username": name, "password": PASSWORD}
        )
        assert signed.status_code == 200, signed.text
        cookie = {"Cookie": f"{SESSION_COOKIE}={signed.cookies[SESSION_COOKIE]}"}
        return cookie, str(signed.json()["csrf_token"])


def ws_url(router_url: str, iid: str) -> str:
    return router_url.replace("http://", "ws://") + f"/i/{iid}/ws"


async def test_signing_out_closes_that_sessions_websockets_within_a_second(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada = await make_user("ada")
    await make_user("bo")
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    first, csrf = await sign_in(client, "ada")
    second, _ = await sign_in(client, "ada")
    bos, _ = await sign_in(client, "bo")
    url = ws_url(router_url, iid)
    async with (
        websockets.connect(url, additional_headers=first) as signed_out,
        websockets.connect(url, additional_headers=second) as other_session,
        websockets.connect(url, additional_headers=ada) as by_token,
        websockets.connect(url, additional_headers=bos) as other_user,
    ):
        assert await echoes(signed_out)
        client.cookies.clear()
        out = await client.post("/api/v1/auth/logout", headers={**first, "X-CSRF-Token": csrf})
        assert out.status_code == 204, out.text
        assert await closes_within(signed_out), "the signed-out session's WebSocket stayed open"
        for ws in (other_session, by_token, other_user):
            assert await echoes(ws)


async def test_disabling_a_user_closes_their_websockets(
    client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str], router_url: str
) -> None:
    ada, bo = await make_user("ada"), await make_user("bo")
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    bos, _ = await sign_in(client, "bo")
    url = ws_url(router_url, iid)
    async with (
        websockets.connect(url, additional_headers=bos) as by_session,
        websockets.connect(url, additional_headers=bo) as by_token,
        websockets.connect(url, additional_headers=ada) as owner,
    ):
        assert await echoes(by_session) and await echoes(by_token)
        disabled = await client.patch(
            "/api/v1/users/bo", json={"disabled": True}, headers=admin_headers
        )
        assert disabled.status_code == 200, disabled.text
        assert await closes_within(by_session), "a disabled user's session WebSocket stayed open"
        assert await closes_within(by_token), "a disabled user's token WebSocket stayed open"
        assert await echoes(owner)


async def test_a_password_change_closes_the_websockets_of_the_sessions_it_ends(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada = await make_user("ada")
    iid = await running_demo(client, ada)
    cookie, _ = await sign_in(client, "ada")
    url = ws_url(router_url, iid)
    async with (
        websockets.connect(url, additional_headers=cookie) as by_session,
        websockets.connect(url, additional_headers=ada) as by_token,
    ):
        assert await echoes(by_session)
        changed = await client.put(
            "/api/v1/users/me/password",
            json={"password": "a-new-password", "current_password": PASSWORD},
            headers=ada,
        )
        assert changed.status_code == 204, changed.text
        assert await closes_within(by_session), "an ended session's WebSocket stayed open"
        # API tokens outlive a password change (documented), and so do their WebSockets.
        assert await echoes(by_token)


async def test_deleting_a_token_closes_the_websockets_it_opened(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada = await make_user("ada")
    iid = await running_demo(client, ada)
    made = await client.post("/api/v1/tokens", json={"note": "terminal"}, headers=ada)
    assert made.status_code == 201, made.text
    second = {"Authorization": f"token {made.json()['token']}"}
    url = ws_url(router_url, iid)
    async with (
        websockets.connect(url, additional_headers=second) as doomed,
        websockets.connect(url, additional_headers=ada) as kept,
    ):
        assert await echoes(doomed)
        deleted = await client.delete(f"/api/v1/tokens/{made.json()['id']}", headers=ada)
        assert deleted.status_code == 204, deleted.text
        assert await closes_within(doomed), "a deleted token's WebSocket stayed open"
        assert await echoes(kept)


# --- the router's table, changed from another thread -------------------------


def router_ws(gw: Gateway, instance_id: str = "aaaa") -> str:
    return f"ws://127.0.0.1:{gw.port}/i/{instance_id}/ws"


def token_header(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
async def hosted(make_gateway: GatewayFactory) -> AsyncIterator[Hosted]:
    """A router serving ``aaaa`` (alice's) and ``bbbb`` (bob's) on their own hosts."""
    options = RouterOptions(
        instance_host="{id}.apps.test",
        instance_base_url="http://{id}.apps.test",
        portal_url=PORTAL,
    )
    gw = await make_gateway(options, demo=False)
    for instance_id, owner in (("aaaa", ALICE), ("bbbb", BOB)):
        token = f"upstream-token-{instance_id}"
        served = serve_root_demo(token)
        gw.upstreams[instance_id] = served
        gw.table.add_route(Route(instance_id, served.url, owner, upstream_token=token))
    async with httpx.AsyncClient(base_url=gw.base, timeout=10) as client:
        yield Hosted(gw, InstanceGrants(KEY, 3600), client)


async def test_signing_out_closes_websockets_opened_with_an_instance_cookie(
    hosted: Hosted,
) -> None:
    gw = hosted.gw

    async def opened(session: str) -> ClientConnection:
        answer = await hosted.handoff("aaaa", ALICE, session=session)
        cookie = {"Cookie": f"{INSTANCE_COOKIE}={instance_cookie(answer)}"}
        return await websockets.connect(
            "ws://aaaa.apps.test/ws", host="127.0.0.1", port=gw.port, additional_headers=cookie
        )

    signed_out, other_session = await opened("s-1"), await opened("s-2")
    by_token = await websockets.connect(
        "ws://aaaa.apps.test/ws",
        host="127.0.0.1",
        port=gw.port,
        additional_headers=token_header(ALICE_TOKEN),
    )
    try:
        assert await echoes(signed_out)
        # The portal signs s-1 out from a worker thread.
        await asyncio.to_thread(gw.table.revoke_session, "s-1", time.time() + 3600)
        assert await closes_within(signed_out), "an instance cookie's WebSocket stayed open"
        assert await echoes(other_session) and await echoes(by_token)
        # A password change (sessions_valid_after moves) ends the instance cookies made before.
        changed = UserInfo(ALICE, "alice", sessions_valid_after=time.time() + 1)
        await asyncio.to_thread(gw.table.set_user, changed)
        assert await closes_within(other_session)
        assert await echoes(by_token)
    finally:
        for ws in (signed_out, other_session, by_token):
            await ws.close()


async def test_removing_a_user_or_their_admin_rights_closes_what_they_opened(
    gateway: Gateway,
) -> None:
    alice = await websockets.connect(
        router_ws(gateway), additional_headers=gateway.cookie_header(ALICE)
    )
    bob = await websockets.connect(
        router_ws(gateway, "bbbb"), additional_headers=token_header(BOB_TOKEN)
    )
    # An admin reaches alice's instance only as an admin.
    root = await websockets.connect(router_ws(gateway), additional_headers=token_header(ROOT_TOKEN))
    try:
        assert await echoes(root)
        await asyncio.to_thread(gateway.table.set_user, UserInfo(ROOT, "root"))
        assert await closes_within(root), "a former admin's WebSocket stayed open"
        await asyncio.to_thread(gateway.table.remove_user, BOB)
        assert await closes_within(bob), "a removed user's WebSocket stayed open"
        assert await echoes(alice)
    finally:
        for ws in (alice, bob, root):
            await ws.close()


async def test_a_replaced_table_closes_the_websockets_whose_credentials_it_dropped(
    gateway: Gateway,
) -> None:
    alice = await websockets.connect(
        router_ws(gateway), additional_headers=token_header(ALICE_TOKEN)
    )
    bob = await websockets.connect(
        router_ws(gateway, "bbbb"), additional_headers=token_header(BOB_TOKEN)
    )
    try:
        table = gateway.table
        state = TableState(
            routes=dict(table.routes),
            users=dict(table.users),
            tokens={h: t for h, t in table.tokens.items() if h != hash_token(ALICE_TOKEN)},
        )
        await asyncio.to_thread(table.replace, state)  # a router's resync after reconnecting
        assert await closes_within(alice), "a WebSocket of a token gone in a resync stayed open"
        assert await echoes(bob)
    finally:
        await alice.close()
        await bob.close()


async def test_a_websocket_closes_when_its_credentials_expire(gateway: Gateway) -> None:
    short = "lg_short_lived_0123456789abcdefghijklmnopqrstuvwxyz"
    expires = time.time() + 3
    gateway.table.set_token(hash_token(short), TokenInfo(ALICE, ACCESS, expires_at=expires))
    # A session cookie issued session_max_age (3600 s here) less 3 s ago: its age runs out too.
    old = gateway.signer._serializer.dumps({"u": ALICE, "s": "old", "t": expires - 3600})
    cookie = {"Cookie": f"{SESSION_COOKIE}={old}"}
    url = router_ws(gateway)
    by_token = await websockets.connect(url, additional_headers=token_header(short))
    by_cookie = await websockets.connect(url, additional_headers=cookie)
    kept = await websockets.connect(url, additional_headers=token_header(ALICE_TOKEN))
    try:
        assert await echoes(by_token) and await echoes(by_cookie)
        assert not await closes_within(by_token, expires - time.time() - 0.5)
        # The router's sweep (every second) closes them once their time is up.
        assert await closes_within(by_token, expires - time.time() + 1.5), "an expired token's"
        assert await closes_within(by_cookie, expires - time.time() + 1.5), "an old cookie's"
        assert await echoes(kept)
    finally:
        for ws in (by_token, by_cookie, kept):
            await ws.close()
