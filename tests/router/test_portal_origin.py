"""Under ``/i/<id>/`` a portal session opens only its own user's instances.

Without ``instance_host`` every tool is served on the portal's own origin, so
a tool's JavaScript runs there with its visitor's session cookie: it can read
the portal's pages (and their CSRF token) and call the API as the visitor.
An admin (or someone an instance is shared with) who opened another user's
tool that way handed that user their account. So there, as JupyterHub's
``admin_access`` (off by default), a session cookie opens its user's own
instances only; admins and shares reach others with an API token (a header
no page can make a browser send) or on instance hosts (origins of their
own), unless the operator opts in with ``share_on_portal_origin``.
A refused browser is told why, not that the instance does not exist.
"""

from __future__ import annotations

import httpx
import websockets
from websockets.exceptions import InvalidStatus

from labgate.router.context import RouterOptions
from labgate.router.server import options_from_settings
from labgate.wire.routes import Route

from .conftest import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    CAROL,
    ROOT,
    ROOT_TOKEN,
    Gateway,
    GatewayFactory,
    raw_request,
    statuses,
)

HTML = {"Accept": "text/html"}


def share_bobs_with_alice(gw: Gateway) -> None:
    """``bbbb`` (bob's) shared with alice as ``use``."""
    route = gw.table.routes["bbbb"]
    gw.table.add_route(
        Route(
            "bbbb",
            route.upstream,
            BOB,
            access=frozenset({ALICE}),
            upstream_token=route.upstream_token,
        )
    )


async def test_a_portal_session_opens_only_its_own_instances_under_the_portal(
    gateway: Gateway,
) -> None:
    share_bobs_with_alice(gateway)
    async with httpx.AsyncClient(base_url=gateway.base, timeout=10) as client:
        owner = await client.get("/i/bbbb/api/info", headers=gateway.cookie_header(BOB))
        assert owner.status_code == 200, owner.text
        assert owner.json()["headers"]["x-labgate-user"] == "bob"
        # The share (alice) and the admin (root) with their portal sessions: refused, and told
        # why, as a page to a browser and as JSON to a script.
        for who in (ALICE, ROOT):
            page = await client.get("/i/bbbb/", headers={**gateway.cookie_header(who), **HTML})
            assert page.status_code == 403, page.text
            assert page.headers["content-type"].startswith("text/html")
            assert "Another user&#x27;s instance" in page.text
            assert "bbbb is not yours" in page.text and "instance_host" in page.text
            assert "API token" in page.text
            api = await client.get("/i/bbbb/api/info", headers=gateway.cookie_header(who))
            assert api.status_code == 403
            assert api.json()["error"] == "needs_instance_host"
        # Someone with no access learns nothing more than before: the same 404.
        carol = await client.get("/i/bbbb/api/info", headers=gateway.cookie_header(CAROL))
        assert carol.status_code == 404
        assert "there is no instance 'bbbb' of yours here" in carol.json()["detail"]
        # With a token (not ambient: a tool's page cannot make the browser send it) they get in.
        for token, name in ((ALICE_TOKEN, "alice"), (ROOT_TOKEN, "root")):
            headers = {"Authorization": f"token {token}"}
            answer = await client.get("/i/bbbb/api/info", headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["headers"]["x-labgate-user"] == name


async def test_a_websocket_with_another_users_session_is_refused(gateway: Gateway) -> None:
    share_bobs_with_alice(gateway)
    url = f"ws://127.0.0.1:{gateway.port}/i/bbbb/ws"
    for who in (ALICE, ROOT):
        try:
            async with websockets.connect(url, additional_headers=gateway.cookie_header(who)):
                raise AssertionError("a share's portal session opened a WebSocket under /i/")
        except InvalidStatus as refused:
            assert refused.response.status_code == 403
    async with websockets.connect(url, additional_headers=gateway.cookie_header(BOB)) as ws:
        await ws.send("mine")
        assert await ws.recv() == "mine"
    token = {"Authorization": f"token {ALICE_TOKEN}"}
    async with websockets.connect(url, additional_headers=token) as ws:
        await ws.send("by token")
        assert await ws.recv() == "by token"


async def test_a_kept_alive_connection_decides_each_request_by_its_own_credentials(
    gateway: Gateway,
) -> None:
    """The proxy keeps the last allowed (route, identity) pair: a session after a token of the
    same admin, on the same connection, is still refused (and the token let in again)."""
    root_cookie = gateway.cookie_header(ROOT)["Cookie"]
    bob_cookie = gateway.cookie_header(BOB)["Cookie"]

    def get(credentials: str) -> str:
        return f"GET /i/bbbb/api/info HTTP/1.1\r\nHost: gw\r\n{credentials}\r\n\r\n"

    pipelined = (
        get(f"Authorization: token {ROOT_TOKEN}")
        + get(f"Cookie: {root_cookie}")
        + get(f"Authorization: token {ROOT_TOKEN}")
        + get(f"Cookie: {bob_cookie}")
        + get(f"Cookie: {root_cookie}")
        + "GET /i/bbbb/api/info HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        + f"Cookie: {bob_cookie}\r\n\r\n"
    )
    answer = await raw_request(gateway.port, pipelined.encode())
    assert statuses(answer) == [200, 403, 200, 200, 403, 200]


async def test_the_operator_may_let_admins_and_shares_in_on_the_portal_origin(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(RouterOptions(share_on_portal_origin=True))
    share_bobs_with_alice(gw)
    async with httpx.AsyncClient(base_url=gw.base, timeout=10) as client:
        for who, name in ((ALICE, "alice"), (ROOT, "root"), (BOB, "bob")):
            answer = await client.get("/i/bbbb/api/info", headers=gw.cookie_header(who))
            assert answer.status_code == 200, answer.text
            assert answer.json()["headers"]["x-labgate-user"] == name
        # Still only those on the access list (and admins).
        carol = await client.get("/i/bbbb/api/info", headers=gw.cookie_header(CAROL))
        assert carol.status_code == 404


def test_the_setting_reaches_the_router() -> None:
    from labgate.config import Settings

    assert options_from_settings(Settings()).share_on_portal_origin is False
    assert options_from_settings(Settings(share_on_portal_origin=True)).share_on_portal_origin
