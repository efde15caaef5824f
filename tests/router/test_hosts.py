"""Instances on their own host names (``instance_host``): routing by Host, the hand-off, cookies.

The portal's side of the hand-off (who may get a code) is tested end to end
in ``tests/test_instance_hosts.py``; here the router gets codes signed the
way the portal signs them (:class:`InstanceGrants` under the same key).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import SimpleCookie

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from labgate.router.auth import split_instance_cookies
from labgate.router.context import RouterOptions
from labgate.router.hosts import InstanceHosts
from labgate.router.proxy import away_detail
from labgate.security import (
    HANDOFF_COOKIE,
    INSTANCE_COOKIE,
    SESSION_COOKIE,
    InstanceGrants,
    pkce_challenge,
)
from labgate.tools.demo.server import Demo, Server
from labgate.wire.routes import Route
from router.conftest import (
    ALICE,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    CAROL,
    KEY,
    ROOT,
    DemoServed,
    Gateway,
    GatewayFactory,
    nothing_listens,
)

PORTAL = "https://labgate.test"
HTML = {"Accept": "text/html"}


def host(instance_id: str) -> str:
    return f"{instance_id}.apps.test"


def serve_root_demo(token: str) -> DemoServed:
    """The demo tool at ``/`` (its base URL on its own host), on a random loopback port."""
    import threading

    os.environ["LABGATE_INSTANCE_TOKEN"] = token
    try:
        demo = Demo("/")
    finally:
        del os.environ["LABGATE_INSTANCE_TOKEN"]
    server = Server(("127.0.0.1", 0), demo)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return DemoServed(server, thread, f"http://127.0.0.1:{server.server_address[1]}")


@dataclass
class Hosted:
    """A router serving ``aaaa`` (alice's) and ``bbbb`` (bob's) on their own hosts."""

    gw: Gateway
    grants: InstanceGrants
    client: httpx.AsyncClient

    async def get(
        self, instance_id: str, path: str = "/api/info", **headers: str
    ) -> httpx.Response:
        # Like a browser, cookies go only where they were set: each test says which it sends.
        self.client.cookies.clear()
        return await self.client.get(path, headers={"Host": host(instance_id), **headers})

    async def handoff(
        self, instance_id: str, user_id: int, path: str = "/api/info", session: str = "s-1"
    ) -> httpx.Response:
        """Start a hand-off on ``instance_id``'s host, let the "portal" sign a code, finish it."""
        started = await self.get(instance_id, path, **HTML)
        assert started.status_code == 302, started.text
        location = httpx.URL(started.headers["location"])
        state_cookie = SimpleCookie(started.headers["set-cookie"])[HANDOFF_COOKIE].value
        params = dict(location.params)
        code = self.grants.issue_code(
            instance_id, host(instance_id), user_id, session, params["code_challenge"]
        )
        return await self.get(
            instance_id,
            f"/_labgate/callback?code={code}&state={params['state']}",
            Cookie=f"{HANDOFF_COOKIE}={state_cookie}",
            **HTML,
        )


def instance_cookie(answer: httpx.Response) -> str:
    for line in answer.headers.get_list("set-cookie"):
        if line.startswith(INSTANCE_COOKIE + "="):
            return SimpleCookie(line)[INSTANCE_COOKIE].value
    raise AssertionError(f"no instance cookie in {answer.headers}")


@pytest.fixture
async def hosted(make_gateway: GatewayFactory) -> AsyncIterator[Hosted]:
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


def test_host_template_is_parsed_exactly() -> None:
    hosts = InstanceHosts("{id}.apps.example.org", "https://{id}.apps.example.org")
    assert hosts.instance_of(b"k3x9.apps.example.org") == "k3x9"
    assert hosts.instance_of(b"K3X9.Apps.Example.Org:443") == "k3x9"
    assert hosts.instance_of(b"apps.example.org") is None
    assert hosts.instance_of(b".apps.example.org") is None
    assert hosts.instance_of(b"a.b.apps.example.org") is None
    assert hosts.instance_of(b"k3x9.apps.example.org.evil.test") is None
    assert hosts.instance_of(b"labgate.example.org") is None
    assert hosts.instance_of(b"[::1]:8000") is None
    assert hosts.callback("k3x9") == "https://k3x9.apps.example.org/_labgate/callback"
    with_port = InstanceHosts("{id}.localhost:8000", "http://{id}.localhost:8000")
    assert with_port.instance_of(b"k3x9.localhost:8000") == "k3x9"
    assert with_port.instance_of(b"k3x9.localhost:9000") is None


async def test_requests_are_routed_by_host(hosted: Hosted) -> None:
    token = {"Authorization": f"token {ALICE_TOKEN}"}
    info = await hosted.get("aaaa", **token)
    assert info.status_code == 200, info.text
    seen = info.json()
    assert seen["path"] == "/api/info" and seen["headers"]["x-labgate-user"] == "alice"
    assert "x-forwarded-prefix" not in seen["headers"]
    # bob's instance is another host; alice may not use it.
    assert (await hosted.get("bbbb", **token)).status_code == 404
    # A host of the instance form that names no instance: 404, as JSON or as a page.
    unknown = await hosted.get("zzzz", **token)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    page = await hosted.get("zzzz", **HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    # Its links and stylesheet are the portal's ("/" on this host would be a tool's).
    assert f'href="{PORTAL}/static/labgate.css"' in page.text
    assert f'href="{PORTAL}/instances"' in page.text and 'href="/' not in page.text
    # The portal's own host goes to the portal, as before.
    portal = await hosted.client.get("/api/v1/ping")
    assert portal.status_code == 200 and portal.json()["path"] == "/api/v1/ping"


async def test_prefix_paths_on_the_portal_host_go_to_the_instance_host(hosted: Hosted) -> None:
    answer = await hosted.client.get("/i/aaaa/api/info?x=1", headers=HTML)
    assert answer.status_code == 302
    assert answer.headers["location"] == "http://aaaa.apps.test/api/info?x=1"


async def test_portal_session_is_not_accepted_on_an_instance_host(hosted: Hosted) -> None:
    session = {"Cookie": f"{SESSION_COOKIE}={hosted.gw.cookie(ALICE)}"}
    # A browser is sent to the portal for a hand-off, not let in.
    page = await hosted.get("aaaa", **session, **HTML)
    assert page.status_code == 302
    assert page.headers["location"].startswith(f"{PORTAL}/oauth/authorize?")
    api = await hosted.get("aaaa", **session)
    assert api.status_code == 401


async def test_handoff_gives_a_host_only_cookie_for_that_instance(hosted: Hosted) -> None:
    started = await hosted.get("aaaa", "/api/info?x=1", **HTML)
    assert started.status_code == 302
    params = dict(httpx.URL(started.headers["location"]).params)
    assert params["client_id"] == "aaaa"
    assert params["redirect_uri"] == "http://aaaa.apps.test/_labgate/callback"
    assert params["code_challenge_method"] == "S256" and params["state"]
    state = started.headers["set-cookie"]
    assert "HttpOnly" in state and "SameSite=Lax" in state and "Domain" not in state

    done = await hosted.handoff("aaaa", ALICE, "/api/info?x=1")
    assert done.status_code == 302, done.text
    assert done.headers["location"] == "/api/info?x=1"
    line = next(c for c in done.headers.get_list("set-cookie") if c.startswith(INSTANCE_COOKIE))
    assert "HttpOnly" in line and "SameSite=Lax" in line and "Path=/" in line
    assert "domain" not in line.lower()
    cookie = instance_cookie(done)
    with_cookie = {"Cookie": f"{INSTANCE_COOKIE}={cookie}; theirs=1"}
    info = await hosted.get("aaaa", **with_cookie)
    assert info.status_code == 200, info.text
    seen = info.json()["headers"]
    assert seen["x-labgate-user"] == "alice"
    # The tool is sent its own cookies only, never labgate's.
    cookies = b"labgate-session=a; labgate-instance=b; theirs=1; labgate-handoff=c"
    assert split_instance_cookies(cookies) == (("b",), b"theirs=1")
    # The cookie is worth nothing on another instance's host, or on the portal's /i/ paths.
    assert (await hosted.get("bbbb", **with_cookie)).status_code == 401
    elsewhere = await hosted.client.get("/i/aaaa/api/info", headers=with_cookie)
    assert elsewhere.status_code == 302 and "apps.test" in elsewhere.headers["location"]


async def test_handoff_over_https_marks_cookies_secure(make_gateway: GatewayFactory) -> None:
    options = RouterOptions(
        instance_host="{id}.apps.test",
        instance_base_url="https://{id}.apps.test",
        portal_url=PORTAL,
        forwarded_proto="https",
    )
    gw = await make_gateway(options)
    async with httpx.AsyncClient(base_url=gw.base, timeout=10) as client:
        started = await client.get("/", headers={"Host": host("aaaa"), **HTML})
    assert started.status_code == 302
    assert "; Secure" in started.headers["set-cookie"]
    redirect = dict(httpx.URL(started.headers["location"]).params)["redirect_uri"]
    assert redirect == "https://aaaa.apps.test/_labgate/callback"


async def test_handoff_code_is_single_use_and_bound_to_its_instance(hosted: Hosted) -> None:
    started = await hosted.get("aaaa", **HTML)
    state_cookie = SimpleCookie(started.headers["set-cookie"])[HANDOFF_COOKIE].value
    params = dict(httpx.URL(started.headers["location"]).params)
    cookie = {"Cookie": f"{HANDOFF_COOKIE}={state_cookie}", **HTML}
    challenge = params["code_challenge"]

    async def callback(code: str, state: str = params["state"]) -> httpx.Response:
        return await hosted.get("aaaa", f"/_labgate/callback?code={code}&state={state}", **cookie)

    # Codes for another instance, another host or another browser's challenge.
    for wrong in (
        hosted.grants.issue_code("bbbb", host("aaaa"), ALICE, "s-1", challenge),
        hosted.grants.issue_code("aaaa", "aaaa.apps.test:8443", ALICE, "s-1", challenge),
        hosted.grants.issue_code("aaaa", host("aaaa"), ALICE, "s-1", pkce_challenge("other")),
        InstanceGrants("another-key", 3600).issue_code(
            "aaaa", host("aaaa"), ALICE, "s-1", challenge
        ),
    ):
        refused = await callback(wrong)
        assert refused.status_code == 400 and INSTANCE_COOKIE not in str(refused.headers)
    code = hosted.grants.issue_code("aaaa", host("aaaa"), ALICE, "s-1", challenge)
    # The state must be the one this browser was given.
    assert (await callback(code, "forged-state")).status_code == 400
    assert (await callback(code)).status_code == 302
    # Good once.
    assert (await callback(code)).status_code == 400
    # Without the hand-off cookie (another browser) a fresh code is refused too.
    fresh = hosted.grants.issue_code("aaaa", host("aaaa"), ALICE, "s-1", challenge)
    bare = await hosted.get("aaaa", f"/_labgate/callback?code={fresh}&state={params['state']}")
    assert bare.status_code == 400
    # Expired: a minute is all a code has.
    old = hosted.grants.check_code(fresh, time.time() + 61)
    assert old is None


async def test_handoff_refuses_a_user_without_access(hosted: Hosted) -> None:
    refused = await hosted.handoff("aaaa", CAROL)
    assert refused.status_code == 404
    assert INSTANCE_COOKIE not in str(refused.headers)
    # An admin may use any instance, as on the /i/ paths.
    assert (await hosted.handoff("aaaa", ROOT)).status_code == 302


async def test_an_away_instance_on_its_host_is_reached_only_by_those_with_access(
    hosted: Hosted,
) -> None:
    """Its site's agent is away, the route keeps its endpoint: the same checks as when it runs.

    ``aaaa`` (the demo tool, answering) and ``gone`` (nothing listens) are
    alice's and ``unreachable``.
    """
    gw = hosted.gw
    route = gw.table.routes["aaaa"]
    gw.table.add_route(
        Route(
            "aaaa", route.upstream, ALICE, state="unreachable", upstream_token="upstream-token-aaaa"
        )
    )
    gw.table.add_route(Route("gone", nothing_listens(), ALICE, state="unreachable"))
    away_page = "its site is not connected"
    assert away_page in away_detail("gone")
    for instance_id in ("aaaa", "gone"):
        refused = await hosted.get(instance_id, Authorization=f"token {BOB_TOKEN}")
        assert refused.status_code == 404, refused.text
        assert away_page not in refused.text and "alice" not in refused.text
        assert (await hosted.get(instance_id)).status_code == 401
        # A browser is sent to the portal for a hand-off, which refuses those without access.
        page = await hosted.get(instance_id, **HTML)
        assert page.status_code == 302
        assert page.headers["location"].startswith(f"{PORTAL}/oauth/authorize?")
        refused = await hosted.handoff(instance_id, CAROL)
        assert refused.status_code == 404 and INSTANCE_COOKIE not in str(refused.headers)
    token = f"token {ALICE_TOKEN}"
    info = await hosted.get("aaaa", Authorization=token)
    assert info.status_code == 200, info.text
    assert info.json()["headers"]["x-labgate-user"] == "alice"
    away = await hosted.get("gone", Authorization=token)
    assert away.status_code == 503 and away_page in away.text


async def test_revoked_share_logout_and_stop_cut_an_instance_cookie(hosted: Hosted) -> None:
    gw = hosted.gw
    route = gw.table.routes["aaaa"]
    gw.table.add_route(
        Route(
            "aaaa", route.upstream, ALICE, frozenset({CAROL}), upstream_token=route.upstream_token
        )
    )
    cookie = {"Cookie": f"{INSTANCE_COOKIE}={instance_cookie(await hosted.handoff('aaaa', CAROL))}"}
    assert (await hosted.get("aaaa", **cookie)).status_code == 200
    # A WebSocket of carol's is open when the share goes.
    ws = await websockets.connect(
        "ws://aaaa.apps.test/ws",
        host="127.0.0.1",
        port=gw.port,
        additional_headers=cookie,
    )
    await ws.send("x")
    assert await ws.recv() == "x"
    gw.table.add_route(Route("aaaa", route.upstream, ALICE, upstream_token=route.upstream_token))
    assert (await hosted.get("aaaa", **cookie)).status_code == 404
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 1)
    # Logging out of the portal session the cookie came from ends it too.
    signed_in = await hosted.handoff("aaaa", ALICE, session="s-9")
    alice = {"Cookie": f"{INSTANCE_COOKIE}={instance_cookie(signed_in)}"}
    assert (await hosted.get("aaaa", **alice)).status_code == 200
    gw.table.revoke_session("s-9", time.time() + 3600)
    assert (await hosted.get("aaaa", **alice)).status_code == 401
    # A stopped instance (its route withdrawn) is gone for every cookie.
    fresh = await hosted.handoff("aaaa", ALICE, session="s-10")
    alice = {"Cookie": f"{INSTANCE_COOKIE}={instance_cookie(fresh)}"}
    assert (await hosted.get("aaaa", **alice)).status_code == 200
    gw.table.remove_route("aaaa")
    assert (await hosted.get("aaaa", **alice)).status_code == 404
    with pytest.raises(InvalidStatus):
        await websockets.connect(
            "ws://aaaa.apps.test/ws", host="127.0.0.1", port=gw.port, additional_headers=alice
        )


async def test_labgate_paths_on_an_instance_host_are_the_routers(hosted: Hosted) -> None:
    token = {"Authorization": f"token {ALICE_TOKEN}"}
    assert (await hosted.get("aaaa", "/_labgate/other", **token)).status_code == 404
    posted = await hosted.client.post("/_labgate/callback", headers={"Host": host("aaaa"), **token})
    assert posted.status_code == 404


async def test_a_tool_cannot_set_labgate_cookies_on_its_host(
    hosted: Hosted,
    recording,  # type: ignore[no-untyped-def]
) -> None:
    def handler(seen: object) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
            b"Set-Cookie: " + INSTANCE_COOKIE.encode() + b"=forged; Path=/\r\n"
            b"Set-Cookie: " + HANDOFF_COOKIE.encode() + b"=forged; Path=/_labgate/\r\n"
            b"Set-Cookie: " + SESSION_COOKIE.encode() + b"=forged; Path=/\r\n"
            b"Set-Cookie: tool=1; Path=/\r\n\r\n"
        )

    evil = await recording(handler)
    hosted.gw.table.add_route(Route("evil", evil.url, ALICE))
    answer = await hosted.get("evil", "/", Authorization=f"token {ALICE_TOKEN}")
    assert answer.status_code == 200
    assert answer.headers.get_list("set-cookie") == ["tool=1; Path=/"]


@pytest.mark.parametrize(
    "template",
    ["apps.example.org", "x{id}.example.org", "{id}.{id}.org", "https://{id}.a.org", "*.a.org"],
)
def test_instance_host_must_start_with_an_id_label(template: str) -> None:
    from pydantic import ValidationError

    from labgate.config import Settings

    with pytest.raises(ValidationError, match="instance_host"):
        Settings(instance_host=template)


def test_instance_host_cannot_take_the_portals_own_host() -> None:
    from pydantic import ValidationError

    from labgate.config import Settings

    with pytest.raises(ValidationError, match="portal's own host"):
        Settings(instance_host="{id}.example.org", public_url="https://labgate.example.org")
    hosted = Settings(instance_host="{ID}.Apps.Example.org", public_url="https://example.org")
    assert hosted.instance_url("k3x9") == "https://k3x9.apps.example.org/"
    local = Settings(instance_host="{id}.localhost", port=8123)
    assert local.instance_url("k3x9") == "http://k3x9.localhost:8123/"
    assert Settings(port=8123).instance_url("k3x9") == "http://127.0.0.1:8123/i/k3x9/"


async def test_a_page_of_another_instance_cannot_drive_an_instance_in_its_visitors_name(
    hosted: Hosted,
) -> None:
    """Sibling hosts are one site: the browser sends alice's instance cookie along.

    The router adds the instance token for the tool, which therefore skips its
    own origin and XSRF checks (Jupyter does). So a page of bob's instance
    must not open a WebSocket to alice's nor POST to it; the instance's own
    pages may, and anyone may GET (a link, an image).
    """
    gw = hosted.gw
    cookie = {"Cookie": f"{INSTANCE_COOKIE}={instance_cookie(await hosted.handoff('aaaa', ALICE))}"}
    to_alice = {"Host": host("aaaa"), **cookie}
    bobs_page = {"Origin": "http://bbbb.apps.test"}

    async def post(**headers: str) -> httpx.Response:
        hosted.client.cookies.clear()
        return await hosted.client.post(
            "/api/info",
            content=b"{}",
            headers={**to_alice, "Content-Type": "text/plain", **headers},
        )

    refused = await post(**bobs_page)
    assert refused.status_code == 403 and "another site or instance" in refused.json()["detail"]
    assert (await post(**{"Sec-Fetch-Site": "same-site"})).status_code == 403
    assert (await post(**{"Sec-Fetch-Site": "cross-site"})).status_code == 403
    assert (await post(Origin="null")).status_code == 403
    with pytest.raises(InvalidStatus) as caught:
        await websockets.connect(
            "ws://aaaa.apps.test/ws",
            host="127.0.0.1",
            port=gw.port,
            origin="http://bbbb.apps.test",  # type: ignore[arg-type]
            additional_headers=cookie,
        )
    assert caught.value.response.status_code == 403
    # Reading is not refused (the tool's own answers decide what it shows).
    assert (await hosted.get("aaaa", **cookie, **bobs_page)).status_code == 200

    # The instance's own pages (any port of its host), and clients that are no browser, pass.
    for own in ({"Origin": "http://aaaa.apps.test"}, {"Origin": "https://aaaa.apps.test:8443"}):
        assert (await post(**own, **{"Sec-Fetch-Site": "same-origin"})).status_code != 403
    assert (await post()).status_code != 403
    ws = await websockets.connect(
        "ws://aaaa.apps.test/ws",
        host="127.0.0.1",
        port=gw.port,
        origin="http://aaaa.apps.test",  # type: ignore[arg-type]
        additional_headers=cookie,
    )
    await ws.send("mine")
    assert await ws.recv() == "mine"
    await ws.close()


@pytest.mark.parametrize(
    ("origin", "host_header", "same"),
    [
        (b"http://a.example", b"a.example", True),
        (b"HTTPS://A.Example:8443", b"a.example:8443", True),
        (b"https://a.example:8443", b"a.example", True),  # a proxy's Host without its port
        (b"http://[::1]:8000", b"[::1]:8000", True),
        (b"http://b.example", b"a.example", False),
        (b"http://a.example.evil", b"a.example", False),
        (b"null", b"a.example", False),
        (b"http://a.example/path", b"a.example", False),
        (b"http://[::1", b"[::2]", False),
    ],
)
def test_an_origin_is_compared_by_host(origin: bytes, host_header: bytes, same: bool) -> None:
    from labgate.router.http import same_origin

    assert same_origin(origin, host_header) is same
