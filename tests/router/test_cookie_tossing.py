"""A cookie another host planted never picks who the router lets in.

A page on a sibling host (an instance host beside the portal, another
instance's host) can set a cookie for a parent domain
(``Domain=example.org``); the browser then sends it beside the host's own.
So the router takes the session cookie under the name the portal uses
(``__Host-labgate-session`` when cookies are Secure: a browser takes no such
cookie from another host), and a ``Cookie`` header that holds the session
cookie, or the instance cookie on an instance host, more than once counts as
having none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie

import httpx

from labgate.config import Settings
from labgate.router.auth import split_instance_cookies
from labgate.router.context import RouterOptions
from labgate.router.server import options_from_settings
from labgate.security import (
    INSTANCE_COOKIE,
    SECURE_INSTANCE_COOKIE,
    SECURE_SESSION_COOKIE,
    SESSION_COOKIE,
    InstanceGrants,
    cookie_paths,
    instance_cookie_name,
    session_cookie_name,
)
from labgate.wire.routes import Route

from .conftest import (
    ALICE,
    BOB,
    KEY,
    Gateway,
    GatewayFactory,
    Handler,
    RecordingUpstream,
    Seen,
)
from .test_hosts import HTML, PORTAL, Hosted, hosted, instance_cookie, serve_root_demo

__all__ = ["hosted"]  # the fixture, for this module's tests


async def test_a_session_cookie_sent_twice_opens_nothing(gateway: Gateway) -> None:
    alice, bob = gateway.cookie(ALICE), gateway.cookie(BOB)
    async with httpx.AsyncClient(base_url=gateway.base, timeout=10) as client:
        one = await client.get("/i/aaaa/api/info", headers={"Cookie": f"{SESSION_COOKIE}={alice}"})
        assert one.status_code == 200
        # The browser's own session and one tossed in for a parent domain, in either order,
        # even when both are good: which is whose cannot be told, so neither counts.
        for cookie in (
            f"{SESSION_COOKIE}={alice}; {SESSION_COOKIE}={bob}",
            f"{SESSION_COOKIE}={bob}; {SESSION_COOKIE}={alice}",
            f"{SESSION_COOKIE}={alice}; theme=dark; {SESSION_COOKIE}={alice}",
            f"{SESSION_COOKIE}={alice}; {SESSION_COOKIE} =junk",
        ):
            api = await client.get("/i/aaaa/api/info", headers={"Cookie": cookie})
            assert api.status_code == 401, (cookie, api.text)
            page = await client.get("/i/aaaa/", headers={"Cookie": cookie, **HTML})
            assert page.status_code == 302 and page.headers["location"].startswith("/login?")


async def test_the_router_takes_the_session_cookie_by_the_name_the_portal_uses(
    make_gateway: GatewayFactory, recording: Callable[..., Awaitable[RecordingUpstream]]
) -> None:
    assert session_cookie_name(True) == SECURE_SESSION_COOKIE == "__Host-labgate-session"
    assert session_cookie_name(False) == SESSION_COOKIE
    assert options_from_settings(Settings()).session_cookie == SESSION_COOKIE
    secure = Settings(public_url="https://labgate.example.org")
    assert options_from_settings(secure).session_cookie == SECURE_SESSION_COOKIE
    assert options_from_settings(Settings(cookie_secure=True)).session_cookie.startswith("__Host-")

    def tool(seen: Seen) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            b"Set-Cookie: __Host-labgate-session=forged; Path=/; Secure\r\n"
            b"Set-Cookie: labgate-session=forged; Path=/\r\n"
            b"Set-Cookie: theirs=1; Path=/\r\n\r\nok"
        )

    handler: Handler = tool
    gw = await make_gateway(RouterOptions(session_cookie=SECURE_SESSION_COOKIE), demo=False)
    upstream = await recording(handler)
    gw.table.add_route(Route("aaaa", upstream.url, ALICE, upstream_token="tok-a"))
    value = gw.cookie(ALICE)
    async with httpx.AsyncClient(base_url=gw.base, timeout=10) as client:
        # The other name is no session here (a stale cookie from before https, or a tossed one).
        plain = await client.get("/i/aaaa/x", headers={"Cookie": f"{SESSION_COOKIE}={value}"})
        assert plain.status_code == 401
        both = f"theme=dark; {SESSION_COOKIE}={value}; {SECURE_SESSION_COOKIE}={value}"
        answer = await client.get("/i/aaaa/x", headers={"Cookie": both})
        assert answer.status_code == 200, answer.text
        # Neither name reaches the tool, and the tool can set neither.
        assert upstream.seen[-1].header("cookie") == ["theme=dark"]
        assert answer.headers.get_list("set-cookie") == ["theirs=1; Path=/"]
        twice = f"{SECURE_SESSION_COOKIE}={value}; {SECURE_SESSION_COOKIE}={value}"
        assert (await client.get("/i/aaaa/x", headers={"Cookie": twice})).status_code == 401
    assert len(upstream.seen) == 1


async def test_an_instance_cookie_sent_twice_opens_nothing(hosted: Hosted) -> None:
    """A sibling instance host may toss ``labgate-instance`` for ``Domain=apps.test``."""
    alice = instance_cookie(await hosted.handoff("aaaa", ALICE))
    one = await hosted.get("aaaa", Cookie=f"{INSTANCE_COOKIE}={alice}")
    assert one.status_code == 200, one.text
    for tossed in (alice, "junk"):
        cookie = f"{INSTANCE_COOKIE}={alice}; {INSTANCE_COOKIE}={tossed}"
        assert (await hosted.get("aaaa", Cookie=cookie)).status_code == 401
        # A browser is told why, and the copies for the parent domains are cleared; it is
        # not sent to a hand-off that would only bring it back here.
        page = await hosted.get("aaaa", "/", Cookie=cookie, **HTML)
        assert page.status_code == 400, page.text
        assert "Two instance cookies" in page.text and "location" not in page.headers
        assert f'href="{PORTAL}/instances"' in page.text
        cleared = {
            SimpleCookie(line)[INSTANCE_COOKIE]["domain"]
            for line in page.headers.get_list("set-cookie")
        }
        assert cleared == {"aaaa.apps.test", "apps.test"}
        assert all("Max-Age=0" in line for line in page.headers.get_list("set-cookie"))


async def test_with_secure_cookies_the_instance_cookie_is_one_no_sibling_can_plant(
    make_gateway: GatewayFactory,
) -> None:
    """Over https the hand-off sets ``__Host-labgate-instance``: a sibling instance host can
    plant ``labgate-instance`` for ``Domain=apps.test`` and any ``Path``, but no ``__Host-``
    cookie, so it can neither pick the identity nor lock the owner out."""
    assert instance_cookie_name(True) == SECURE_INSTANCE_COOKIE == "__Host-labgate-instance"
    assert instance_cookie_name(False) == INSTANCE_COOKIE
    assert options_from_settings(Settings()).instance_cookie == INSTANCE_COOKIE
    secure = Settings(public_url="https://labgate.example.org")
    assert options_from_settings(secure).instance_cookie == SECURE_INSTANCE_COOKIE
    options = RouterOptions(
        instance_host="{id}.apps.test",
        instance_base_url="https://{id}.apps.test",
        portal_url=PORTAL,
        forwarded_proto="https",
        instance_cookie=SECURE_INSTANCE_COOKIE,
    )
    gw = await make_gateway(options, demo=False)
    served = serve_root_demo("upstream-token-aaaa")
    gw.upstreams["aaaa"] = served
    gw.table.add_route(Route("aaaa", served.url, ALICE, upstream_token="upstream-token-aaaa"))
    async with httpx.AsyncClient(base_url=gw.base, timeout=10) as client:
        done = await Hosted(gw, InstanceGrants(KEY, 3600), client).handoff("aaaa", ALICE)
        assert done.status_code == 302, done.text
        line = next(
            c for c in done.headers.get_list("set-cookie") if c.startswith(SECURE_INSTANCE_COOKIE)
        )
        assert "; Secure" in line and "Path=/;" in line and "domain" not in line.lower()
        value = SimpleCookie(line)[SECURE_INSTANCE_COOKIE].value

        async def get(path: str, cookie: str, **headers: str) -> httpx.Response:
            client.cookies.clear()
            return await client.get(
                path, headers={"Host": "aaaa.apps.test", "Cookie": cookie, **headers}
            )

        own = f"{SECURE_INSTANCE_COOKIE}={value}"
        assert (await get("/api/info", own)).status_code == 200
        # The plain name is no credential here: a stale cookie from before https, or a tossed one.
        assert (await get("/api/info", f"{INSTANCE_COOKIE}={value}")).status_code == 401
        # A plain-named cookie tossed in beside the owner's locks nobody out, on any path,
        # and neither reaches the tool.
        for tossed in (value, "junk"):
            both = f"{INSTANCE_COOKIE}={tossed}; theirs=1; {own}"
            answer = await get("/api/info", both)
            assert answer.status_code == 200, answer.text
            page = await get("/lab/tree/x", both, **HTML)
            assert page.status_code != 400, page.text
    sent = f"{INSTANCE_COOKIE}=a; theirs=1; {SECURE_INSTANCE_COOKIE}=b".encode()
    assert split_instance_cookies(sent, SECURE_INSTANCE_COOKIE.encode()) == (("b",), b"theirs=1")


async def test_a_tossed_instance_cookie_is_cleared_for_the_path_it_was_planted_on(
    hosted: Hosted,
) -> None:
    """Over plain http a sibling can plant ``labgate-instance`` with ``Path=/lab``: clearing
    only ``Path=/`` copies left it there, and every page under ``/lab`` kept answering 400."""
    alice = instance_cookie(await hosted.handoff("aaaa", ALICE))
    cookie = f"{INSTANCE_COOKIE}={alice}; {INSTANCE_COOKIE}=junk"
    page = await hosted.get("aaaa", "/lab/tree/x?y=/z", Cookie=cookie, **HTML)
    assert page.status_code == 400, page.text
    cleared = set()
    for line in page.headers.get_list("set-cookie"):
        morsel = SimpleCookie(line)[INSTANCE_COOKIE]
        assert "Max-Age=0" in line and morsel.value == ""
        cleared.add((morsel["domain"], morsel["path"]))
    paths = {"/", "/lab", "/lab/", "/lab/tree", "/lab/tree/", "/lab/tree/x"}
    assert cleared == {(d, p) for d in ("aaaa.apps.test", "apps.test") for p in paths}
    assert cookie_paths("/a/b") == ["/", "/a", "/a/", "/a/b"]
    assert len(cookie_paths("/" + "x/" * 100)) == 16
