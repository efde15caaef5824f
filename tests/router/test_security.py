"""User A can never reach user B's instance, whatever the request looks like."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import pytest

from labgate.router.context import RouterOptions
from labgate.router.proxy import away_detail
from labgate.security import SESSION_COOKIE, hash_token
from labgate.wire.routes import Route, TokenInfo, UserInfo

from .conftest import (
    ALICE,
    ALICE_READ_TOKEN,
    ALICE_TOKEN,
    BOB,
    BOB_TOKEN,
    Gateway,
    GatewayFactory,
    Recorded,
    cookie_line,
    nothing_listens,
    raw_request,
    status_of,
    statuses,
)


def request(target: str, extra: str = "", host: str = "gw") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


async def test_alice_cookie_cannot_reach_bobs_instance(recorded: Recorded) -> None:
    gw = recorded.gw
    response = await raw_request(gw.port, request("/i/bbbb/", cookie_line(gw, ALICE)))
    assert status_of(response) == 404
    response = await raw_request(
        gw.port, request("/i/bbbb/", f"Authorization: token {ALICE_TOKEN}\r\n")
    )
    assert status_of(response) == 404
    assert recorded.b.seen == []
    response = await raw_request(gw.port, request("/i/bbbb/x", cookie_line(gw, BOB)))
    assert status_of(response) == 200
    assert len(recorded.b.seen) == 1


TRICKS = [
    "/i/bbbb/../aaaa/",
    "/i/aaaa/../bbbb/",
    "/i/aaaa/%2e%2e/bbbb/",
    "/i/aaaa/%2E%2E/bbbb/",
    "/i/aaaa/.%2e/bbbb/",
    "/i/aaaa/..%2fbbbb/",
    "/i/aaaa/..%2Fbbbb/",
    "/i/aaaa%2f..%2fbbbb/",
    "/i/aaaa%2F%2E%2E%2Fbbbb/",
    "/i/aaaa/..\\bbbb/",
    "/i/aaaa\\..\\bbbb/",
    "/i/aaaa/%5c..%5cbbbb/",
    "//i/bbbb/",
    "/i//bbbb/",
    "/%69/bbbb/",
    "/%69%2fbbbb/",
    "/i%2fbbbb/",
    "/i/bbbb%2f/",
    "/i/%62bbb/",
    "/i/aaaa/./../bbbb/",
    "/i/aaaa/%00/../bbbb/",
    "/./i/bbbb/",
    "/x/../i/bbbb/",
    "http://gw/i/bbbb/",
    "*",
]


@pytest.mark.parametrize("target", TRICKS)
async def test_path_tricks_never_reach_bob(recorded: Recorded, target: str) -> None:
    gw = recorded.gw
    response = await raw_request(gw.port, request(target, cookie_line(gw, ALICE)))
    assert status_of(response) in (302, 400, 404), response[:200]
    assert recorded.b.seen == []
    assert b"Traceback" not in response
    # Whatever reached alice's own instance went under her prefix.
    for seen in recorded.a.seen:
        assert seen.target.startswith("/i/aaaa/")


SMUGGLING = [
    # Two Host headers.
    "GET /i/aaaa/ HTTP/1.1\r\nHost: gw\r\nHost: other\r\n{cookie}\r\n",
    # Conflicting lengths.
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Content-Length: 4\r\n"
    "Content-Length: 40\r\n\r\nxxxx",
    # Same length twice is refused too.
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Content-Length: 4\r\n"
    "Content-Length: 4\r\n\r\nxxxx",
    # CL.TE
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Content-Length: 44\r\n"
    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /i/bbbb/ HTTP/1.1\r\nHost: gw\r\n\r\n",
    # TE.CL
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n"
    "Content-Length: 3\r\n\r\n2c\r\nGET /i/bbbb/ HTTP/1.1\r\nHost: gw\r\n\r\n\r\n0\r\n\r\n",
    # Obfuscated transfer codings.
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked, identity\r\n"
    "\r\n0\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n"
    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Content-Length: +4\r\n\r\nxxxx",
    "POST /i/aaaa/ HTTP/1.0\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # Bare LF, NUL and spaces in places they must not be.
    "GET /i/aaaa/ HTTP/1.1\nHost: gw\n{cookie}\n",
    "GET /i/aaaa/ HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n{cookie}\r\n",
    "GET /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n X-Folded: yes\r\n{cookie}\r\n",
    "GET /i/aaaa/ HTTP/1.1\r\nHost: g w\r\n{cookie}\r\n",
    # No Host at all.
    "GET /i/aaaa/ HTTP/1.1\r\n{cookie}\r\n",
    # Chunk sizes that do not parse.
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n\r\n"
    "-1\r\nGET /i/bbbb/ HTTP/1.1\r\n\r\n",
    "POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n\r\n"
    "1;ext=\x01\r\nx\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("template", SMUGGLING)
async def test_ambiguous_framing_is_refused(recorded: Recorded, template: str) -> None:
    gw = recorded.gw
    data = template.replace("{cookie}", cookie_line(gw, ALICE)).encode("latin-1")
    response = await raw_request(gw.port, data)
    assert status_of(response) == 400, response[:300]
    assert response.count(b"HTTP/1.1 ") == 1  # and nothing after it: the connection closed
    assert recorded.b.seen == []
    assert recorded.a.seen == []


async def test_kept_alive_connection_checks_every_request(recorded: Recorded) -> None:
    gw = recorded.gw
    cookie = cookie_line(gw, ALICE)
    data = (
        f"GET /i/aaaa/one HTTP/1.1\r\nHost: gw\r\n{cookie}\r\n"
        f"GET /i/bbbb/two HTTP/1.1\r\nHost: gw\r\n\r\n"
        f"GET /i/bbbb/three HTTP/1.1\r\nHost: gw\r\n{cookie}\r\n"
        f"GET /i/bbbb/four HTTP/1.1\r\nHost: gw\r\nAuthorization: token {ALICE_TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    response = await raw_request(gw.port, data)
    assert statuses(response) == [200, 401, 404, 404]
    assert [s.target for s in recorded.a.seen] == ["/i/aaaa/one"]
    assert recorded.b.seen == []


async def test_client_cannot_forge_identity_headers(recorded: Recorded) -> None:
    gw = recorded.gw
    extra = (
        f"Cookie: theme=dark; {SESSION_COOKIE}={gw.cookie(ALICE)}; lang=en\r\n"
        "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: evil.example\r\n"
        "X-Forwarded-Proto: https\r\nX-Forwarded-Prefix: /i/bbbb\r\nX-Forwarded-User: root\r\n"
        "Forwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\n"
        "X-Labgate-User: root\r\nx-labgate-admin: 1\r\nX-LABGATE-USER: bob\r\n"
        "Authorization: token tok-b\r\n"
    )
    response = await raw_request(gw.port, request("/i/aaaa/x", extra))
    assert status_of(response) == 200
    [seen] = recorded.a.seen
    names = [k.lower() for k, _ in seen.headers]
    assert seen.header("X-Labgate-User") == ["alice"]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Host") == ["gw"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Prefix") == ["/i/aaaa"]
    assert seen.header("Authorization") == ["token tok-a"]
    assert seen.header("Cookie") == ["theme=dark; lang=en"]
    for forged in ("forwarded", "x-real-ip", "x-labgate-admin", "x-forwarded-user"):
        assert forged not in names
    assert names.count("x-labgate-user") == 1


async def test_labgate_token_is_not_passed_to_the_tool(recorded: Recorded) -> None:
    gw = recorded.gw
    gw.table.add_route(gw.table.routes["aaaa"].__class__("open", recorded.a.url, ALICE))
    response = await raw_request(
        gw.port, request("/i/open/x", f"Authorization: Bearer {ALICE_TOKEN}\r\n")
    )
    assert status_of(response) == 200
    assert recorded.a.seen[-1].header("Authorization") == []


async def test_tool_cannot_set_the_session_cookie(recorded: Recorded, recording) -> None:  # type: ignore[no-untyped-def]
    def handler(seen: object) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
            b"Set-Cookie: " + SESSION_COOKIE.encode() + b"=forged; Path=/\r\n"
            b"Set-Cookie: tool=1; Path=/i/aaaa/\r\n\r\n"
        )

    gw = recorded.gw
    evil = await recording(handler)
    gw.table.add_route(gw.table.routes["aaaa"].__class__("evil", evil.url, ALICE))
    response = await raw_request(gw.port, request("/i/evil/", cookie_line(gw, ALICE)))
    assert status_of(response) == 200
    assert b"tool=1" in response
    assert SESSION_COOKIE.encode() + b"=" not in response


async def test_revocations_take_effect(recorded: Recorded) -> None:
    gw = recorded.gw
    value, session_id = gw.signer.issue(ALICE)
    line = f"Cookie: {SESSION_COOKIE}={value}\r\n"
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", line))) == 200
    gw.table.revoke_session(session_id, time.time() + 3600)
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", line))) == 401

    fresh = cookie_line(gw, ALICE)
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", fresh))) == 200
    gw.table.set_user(UserInfo(ALICE, "alice", sessions_valid_after=time.time() + 5))
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", fresh))) == 401
    gw.table.set_user(UserInfo(ALICE, "alice", disabled=True))
    token = f"Authorization: token {ALICE_TOKEN}\r\n"
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", token))) == 401
    gw.table.set_user(UserInfo(ALICE, "alice"))
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", token))) == 200
    gw.table.set_token(
        hash_token(ALICE_TOKEN), TokenInfo(ALICE, frozenset({"instances:access"}), 1.0)
    )
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", token))) == 401
    gw.table.remove_token(hash_token(ALICE_TOKEN))
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", token))) == 401
    # A good token without instances:access: 403 (add the scope), never the tool.
    read_only = f"Authorization: token {ALICE_READ_TOKEN}\r\n"
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", read_only))) == 403
    assert status_of(await raw_request(gw.port, request("/i/nosuch/", read_only))) == 403
    gw.table.remove_user(ALICE)
    assert status_of(await raw_request(gw.port, request("/i/aaaa/", fresh))) == 401


async def test_changes_cut_the_next_request_on_the_same_kept_alive_connection(
    recorded: Recorded,
) -> None:
    """What a connection keeps from its last request (auth, access, head) outlives no change."""
    gw = recorded.gw
    value, session_id = gw.signer.issue(ALICE)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)

    async def status(target: str = "/i/aaaa/x") -> int:
        writer.write(
            request(target, f"Cookie: {SESSION_COOKIE}={value}\r\n").replace(
                b"Connection: close\r\n", b""
            )
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is not None
        await reader.readexactly(int(length[1]))
        return int(head[9:12])

    try:
        assert [await status(), await status()] == [200, 200]
        # Renamed: the next request names the user anew (the kept head lines are rebuilt).
        gw.table.set_user(UserInfo(ALICE, "alice2"))
        assert await status() == 200
        assert [s.header("X-Labgate-User") for s in recorded.a.seen] == [
            ["alice"],
            ["alice"],
            ["alice2"],
        ]
        # The route now belongs to someone else: refused, though the same user asks.
        gw.table.add_route(Route("aaaa", recorded.a.url, BOB, upstream_token="tok-a"))
        assert await status() == 404
        gw.table.add_route(Route("aaaa", recorded.a.url, ALICE, upstream_token="tok-a2"))
        assert await status() == 200
        assert recorded.a.seen[-1].header("Authorization") == ["token tok-a2"]
        gw.table.revoke_session(session_id, time.time() + 3600)
        assert await status() == 401
        assert len(recorded.a.seen) == 4
    finally:
        writer.close()


async def test_forged_and_expired_cookies(recorded: Recorded) -> None:
    gw = recorded.gw
    value = gw.cookie(ALICE)
    forged = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    for cookie in (forged, "garbage", "", value + "x"):
        line = f"Cookie: {SESSION_COOKIE}={cookie}\r\n"
        assert status_of(await raw_request(gw.port, request("/i/aaaa/", line))) == 401
    assert recorded.a.seen == []


async def test_access_list_and_admin(recorded: Recorded) -> None:
    gw = recorded.gw
    route = gw.table.routes["bbbb"]
    # A token: a portal session opens only its own instances under /i/ (test_portal_origin.py).
    line = f"Authorization: token {ALICE_TOKEN}\r\n"
    assert status_of(await raw_request(gw.port, request("/i/bbbb/", line))) == 404
    gw.table.add_route(route.__class__("bbbb", route.upstream, BOB, access=frozenset({ALICE})))
    assert status_of(await raw_request(gw.port, request("/i/bbbb/", line))) == 200
    gw.table.remove_route("bbbb")
    assert status_of(await raw_request(gw.port, request("/i/bbbb/", line))) == 404
    await asyncio.sleep(0)


async def test_an_away_instance_is_reached_only_by_those_with_access(recorded: Recorded) -> None:
    """Its site's agent is away, the route still has an endpoint: the router's checks still hold.

    ``aaaa`` is a tool that answers, ``gone`` an endpoint where nothing listens;
    both are alice's and ``unreachable``. Others get the 404 of an instance that
    is not theirs (never the tool, nor the away page that would say it exists).
    """
    gw = recorded.gw
    gw.table.add_route(Route("aaaa", recorded.a.url, ALICE, state="unreachable"))
    gw.table.add_route(Route("gone", nothing_listens(), ALICE, state="unreachable"))
    away_page = b"its site is not connected"
    assert away_page.decode() in away_detail("gone")
    not_alice = (
        cookie_line(gw, BOB),
        f"Authorization: token {BOB_TOKEN}\r\n",
    )
    for instance_id in ("aaaa", "gone"):
        for credentials in not_alice:
            response = await raw_request(gw.port, request(f"/i/{instance_id}/x", credentials))
            assert status_of(response) == 404, response[:300]
            assert b"upstream" not in response and away_page not in response
        # No credentials: 401 to an API client, the sign-in page to a browser.
        response = await raw_request(gw.port, request(f"/i/{instance_id}/x"))
        assert status_of(response) == 401, response[:300]
        response = await raw_request(
            gw.port, request(f"/i/{instance_id}/x", "Accept: text/html\r\n")
        )
        assert status_of(response) == 302, response[:300]
        assert b"upstream" not in response and away_page not in response
    assert recorded.a.seen == []
    # Alice reaches her tool while it answers, and is told her site is away where nothing does.
    for credentials in (cookie_line(gw, ALICE), f"Authorization: token {ALICE_TOKEN}\r\n"):
        response = await raw_request(gw.port, request("/i/aaaa/x", credentials))
        assert status_of(response) == 200, response[:300]
        assert b'"upstream": "a"' in response
        response = await raw_request(gw.port, request("/i/gone/x", credentials))
        assert status_of(response) == 503, response[:300]
        assert away_page in response
    assert [seen.target for seen in recorded.a.seen] == ["/i/aaaa/x", "/i/aaaa/x"]


@pytest.mark.parametrize("ticket", ["lgt_a.b.1.\xff", "lgt_s.e.\u00b2.mac", "lgt_\xe9"])
async def test_a_tunnel_ticket_with_odd_characters_is_a_403(gateway: Gateway, ticket: str) -> None:
    """A data connection's ticket is checked as bytes: odd characters make it wrong, not a 500."""
    response = await raw_request(
        gateway.port,
        b"GET /api/v1/agent/tunnel HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\n"
        b"Upgrade: labgate-tunnel\r\nAuthorization: Bearer "
        + ticket.encode("latin-1")
        + b"\r\n\r\n",
    )
    assert status_of(response) == 403


@pytest.mark.parametrize("target", ["/\\evil.example/x", "/\\\\evil.example", "//evil.example/x"])
@pytest.mark.parametrize("host", ["gw", "aaaa.apps.test"])
async def test_a_path_a_browser_would_take_for_another_host_is_a_400(
    make_gateway: GatewayFactory, target: str, host: str
) -> None:
    """``/\\host`` is ``//host`` to a browser: never a target that could come back as a Location.

    On an instance's own host, the path first asked for is where the
    sign-in hand-off ends: passed on, it would send the browser off-site
    right after a genuine sign-in.
    """
    gw = await make_gateway(
        RouterOptions(
            instance_host="{id}.apps.test",
            instance_base_url="http://{id}.apps.test",
            portal_url="https://labgate.test",
        ),
        demo=False,
    )
    gw.table.add_route(Route("aaaa", nothing_listens(), ALICE))
    response = await raw_request(gw.port, request(target, "Accept: text/html\r\n", host=host))
    assert status_of(response) == 400
    assert b"evil.example" not in response.partition(b"\r\n\r\n")[0]


async def test_an_upload_that_stops_coming_ends_its_connection(
    make_gateway: GatewayFactory,
) -> None:
    """A request answered before its body came (a 401 here) waits for the rest only so long."""
    gw = await make_gateway(
        RouterOptions(header_timeout=1, keepalive_timeout=1, sweep_interval=0.2), demo=False
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /i/aaaa/ HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nab")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status_of(head) == 401
    # The rest never comes: the connection ends after the head's timeout, not never.
    await asyncio.wait_for(reader.read(), 6)
    writer.close()


async def test_trailers_never_change_a_request_head(recorded: Recorded) -> None:
    """A chunked body's trailers reach no head, not even one queued behind another request."""
    gw = recorded.gw
    cookie = cookie_line(gw, ALICE)
    data = (
        f"GET /i/aaaa/first HTTP/1.1\r\nHost: gw\r\n{cookie}\r\n"
        f"POST /i/aaaa/y HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n\r\n"
        "1\r\nx\r\n0\r\nHost: evil\r\nX-Foo: bar\r\nX-Labgate-User: bob\r\n\r\n"
        "GET /i/aaaa/z HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    ).encode()
    response = await raw_request(gw.port, data)
    assert statuses(response)[:2] == [200, 200]
    posted = [seen for seen in recorded.a.seen if seen.target.endswith("/y")]
    assert len(posted) == 1
    assert posted[0].header("Host") == ["gw"]
    assert posted[0].header("X-Foo") == []
    assert posted[0].header("X-Labgate-User") == ["alice"]


async def test_endless_request_trailers_are_cut(recorded: Recorded) -> None:
    """Trailers are held to what a head may take, however they come."""
    gw = recorded.gw
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        f"POST /i/aaaa/t HTTP/1.1\r\nHost: gw\r\n{cookie_line(gw, ALICE)}"
        "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: ".encode()
    )
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 8 * 1024 * 1024:
            writer.write(b"t" * 65536)
            await asyncio.wait_for(writer.drain(), 5)
            sent += 65536
    answer = b""
    with contextlib.suppress(ConnectionError):
        answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    # The router stopped reading and closed (after a 431 when the client could still read it).
    assert sent < 8 * 1024 * 1024
    assert answer == b"" or status_of(answer) == 431


async def test_a_page_of_another_site_cannot_post_to_an_instance_under_the_portal(
    recorded: Recorded,
) -> None:
    """On ``/i/<id>/`` paths too: a POST whose Origin is another host never reaches the tool."""
    gw = recorded.gw

    def post(origin: str) -> bytes:
        return (
            f"POST /i/aaaa/x HTTP/1.1\r\nHost: gw\r\n{cookie_line(gw, ALICE)}"
            f"Origin: {origin}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ).encode()

    assert status_of(await raw_request(gw.port, post("https://evil.example"))) == 403
    assert recorded.a.seen == []
    assert status_of(await raw_request(gw.port, post("https://gw"))) == 200
    assert len(recorded.a.seen) == 1
