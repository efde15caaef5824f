"""Proxying through the router to real upstreams: the ordinary paths."""

from __future__ import annotations

import dataclasses
import json

import httpx

from labgate.router.options import RouterOptions
from labgate.security import SESSION_COOKIE
from labgate.wire.routes import NO_ENDPOINT, Route

from .conftest import (
    ALICE,
    ALICE_TOKEN,
    ROOT_TOKEN,
    Gateway,
    GatewayFactory,
    keep_alive_upstream,
    raw_request,
    status_of,
    statuses,
)


async def test_owner_reaches_instance_with_cookie(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        response = await client.get("/i/aaaa/api/info", headers=gateway.cookie_header(ALICE))
    assert response.status_code == 200
    info = response.json()
    assert info["path"] == "/i/aaaa/api/info"
    headers = info["headers"]
    assert headers["x-labgate-user"] == "alice"
    assert headers["x-forwarded-prefix"] == "/i/aaaa"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{gateway.port}"


async def test_owner_reaches_instance_with_token(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        for scheme in ("token", "Bearer"):
            response = await client.get(
                "/i/aaaa/api/info", headers={"Authorization": f"{scheme} {ALICE_TOKEN}"}
            )
            assert response.status_code == 200, response.text


async def test_admin_reaches_any_instance(gateway: Gateway) -> None:
    # With a token: an admin's portal session opens only their own instances under /i/
    # (tests/router/test_portal_origin.py).
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        response = await client.get(
            "/i/bbbb/api/info", headers={"Authorization": f"token {ROOT_TOKEN}"}
        )
    assert response.status_code == 200
    assert response.json()["headers"]["x-labgate-user"] == "root"


async def test_keep_alive_many_requests(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        for _ in range(50):
            response = await client.get("/i/aaaa/api/health", headers=gateway.cookie_header(ALICE))
            assert response.status_code == 200
    # One client connection, and the upstream pool reused its connection.
    assert gateway.router.ctx.pool.idle


async def test_put_body_reaches_tool(gateway: Gateway, tmp_path: object) -> None:
    target = f"{tmp_path}/upload.bin"
    body = bytes(range(256)) * 4096
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        response = await client.put(
            "/i/aaaa/api/file",
            params={"path": target},
            content=body,
            headers=gateway.cookie_header(ALICE),
        )
        assert response.json() == {"ok": True}

        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(body), 10000):
                yield body[i : i + 10000]

        response = await client.put(
            "/i/aaaa/api/file",
            params={"path": target},
            content=chunks(),
            headers=gateway.cookie_header(ALICE),
        )
        assert response.json() == {"ok": True}
    with open(target, "rb") as handle:
        assert handle.read() == body


async def test_portal_gets_everything_else(gateway: Gateway) -> None:
    cookie = gateway.cookie(ALICE)
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        response = await client.get(
            "/api/v1/me?x=1",
            headers={
                "Cookie": f"{SESSION_COOKIE}={cookie}; theme=dark",
                "X-Forwarded-For": "6.6.6.6",
                "X-Labgate-User": "root",
            },
        )
    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/api/v1/me"
    assert seen["query"] == "x=1"
    # The portal checks its own cookie, so it gets it; forged forwarding does not pass.
    assert f"{SESSION_COOKIE}={cookie}" in seen["headers"]["cookie"]
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert "x-labgate-user" not in seen["headers"]


async def test_activity_counts(gateway: Gateway) -> None:
    assert gateway.router.activity("aaaa") is None
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        await client.get("/i/aaaa/api/info", headers=gateway.cookie_header(ALICE))
    activity = gateway.router.activity("aaaa")
    assert activity is not None
    assert activity.last_request > 0
    assert activity.bytes_in > 0
    assert activity.bytes_out > 0
    assert activity.open_websockets == 0
    assert set(gateway.router.activities()) == {"aaaa"}


async def test_prefix_stripped_when_not_kept(gateway: Gateway) -> None:
    route = gateway.table.routes["aaaa"]
    portal = gateway.portal
    assert portal is not None
    gateway.table.add_route(Route("cccc", portal.url, ALICE, keep_prefix=False, upstream_token="t"))
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        response = await client.get("/i/cccc/some/where?q=1", headers=gateway.cookie_header(ALICE))
    seen = response.json()
    assert seen["path"] == "/some/where"
    assert seen["query"] == "q=1"
    assert seen["headers"]["x-forwarded-prefix"] == "/i/cccc"
    assert seen["headers"]["authorization"] == "token t"
    assert route.keep_prefix


async def test_head_request(gateway: Gateway) -> None:
    cookie = gateway.cookie(ALICE)
    request = (
        f"HEAD /i/aaaa/api/info HTTP/1.1\r\nHost: x\r\nCookie: {SESSION_COOKIE}={cookie}\r\n\r\n"
        f"GET /i/aaaa/api/health HTTP/1.1\r\nHost: x\r\nCookie: {SESSION_COOKIE}={cookie}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    response = await raw_request(gateway.port, request)
    first, _, rest = response.partition(b"\r\n\r\n")
    assert status_of(first) == 200
    assert b"content-length" in first.lower()
    # No body after the HEAD response: the next thing is the second response.
    assert rest.startswith(b"HTTP/1.1 200")
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"ready": True}


async def test_the_routers_own_answers_to_head_have_no_body(gateway: Gateway) -> None:
    """A login redirect, a 401 and a 404 to HEAD on one kept-alive connection: heads only."""
    cookie = gateway.cookie(ALICE)
    request = (
        "HEAD /i/aaaa/lab HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n"
        "HEAD /i/aaaa/lab HTTP/1.1\r\nHost: x\r\n\r\n"
        f"HEAD /i/nope/ HTTP/1.1\r\nHost: x\r\nCookie: {SESSION_COOKIE}={cookie}\r\n\r\n"
        f"GET /i/aaaa/api/health HTTP/1.1\r\nHost: x\r\nCookie: {SESSION_COOKIE}={cookie}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    rest = await raw_request(gateway.port, request)
    for status in (302, 401, 404):
        head, _, rest = rest.partition(b"\r\n\r\n")
        assert status_of(head) == status, head
        # Nothing after the head: the next bytes are the next response.
        assert rest.startswith(b"HTTP/1.1 "), rest[:80]
    head, _, body = rest.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert json.loads(body) == {"ready": True}


async def test_a_new_connection_to_the_portal_is_told_to_the_route_stream(
    gateway: Gateway,
) -> None:
    """So a router whose portal restarted resyncs as soon as the portal answers again."""
    told: list[int] = []
    gateway.router.ctx.portal_connected = lambda: told.append(1)
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        tool = await client.get("/i/aaaa/api/health", headers=gateway.cookie_header(ALICE))
        assert tool.status_code == 200 and told == []  # an instance is not the portal
        portal = await client.get("/api/v1/me")
        assert portal.status_code == 200
    assert told == [1]


async def test_an_instance_whose_agent_is_away_is_tried_at_its_endpoint(gateway: Gateway) -> None:
    """``unreachable`` with an endpoint: passed on; nothing answering there is the 503 page."""
    served = gateway.upstreams["aaaa"]
    gateway.table.add_route(
        Route("aaaa", served.url, ALICE, state="unreachable", upstream_token="upstream-token-aaaa")
    )
    gateway.table.add_route(Route("gone", "http://127.0.0.1:1", ALICE, state="unreachable"))
    gateway.table.add_route(Route("none", NO_ENDPOINT, ALICE, state="unreachable"))
    async with httpx.AsyncClient(base_url=gateway.base, headers=gateway.cookie_header(ALICE)) as c:
        assert (await c.get("/i/aaaa/api/health")).status_code == 200
        for iid in ("gone", "none"):
            page = await c.get(f"/i/{iid}/api/health")
            assert page.status_code == 503, page.text
            assert "its site is not connected" in page.text


async def test_an_upstream_connection_is_closed_after_pool_max_requests(
    make_gateway: GatewayFactory,
) -> None:
    """After ``pool_max_requests`` requests a kept-alive upstream connection is not reused."""
    server, url, carried = await keep_alive_upstream(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    )
    try:
        gateway = await make_gateway(RouterOptions(pool_max_requests=3), demo=False)
        gateway.table.add_route(Route("tool", url, ALICE))
        async with httpx.AsyncClient(base_url=gateway.base) as client:
            for _ in range(7):
                response = await client.get("/i/tool/", headers=gateway.cookie_header(ALICE))
                assert response.text == "ok"
        # Seven requests in a row: three, three, then one on a third connection.
        assert carried == [3, 3, 1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_bad_host_or_target_after_a_good_one_on_a_connection_is_still_refused(
    gateway: Gateway,
) -> None:
    """Each connection remembers its last valid Host and target (HeadMemo): only those."""
    cookie = gateway.cookie_header(ALICE)["Cookie"]

    def get(target: str, host: str) -> bytes:
        return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()

    good = get("/i/aaaa/api/health", "gw.example")
    for bad in (
        get("/i/aaaa/api/health", "gw example"),
        get("/i/aaaa/api/health", "gw.example/x"),
        get("/i/aaaa/../bbbb/api/health", "gw.example"),
        get("/i/aaaa/%2e%2e/bbbb/api/health", "gw.example"),
    ):
        answer = await raw_request(gateway.port, good + good + bad)
        assert statuses(answer) == [200, 200, 400], (bad, answer[-300:])


async def test_a_route_changed_between_requests_of_a_connection_is_read_again(
    gateway: Gateway,
) -> None:
    """A connection keeps what it read of a route only while the table holds that route."""
    server, url, _ = await keep_alive_upstream(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother"]
    )
    route = gateway.table.routes["aaaa"]
    try:
        async with httpx.AsyncClient(base_url=gateway.base) as client:
            headers = gateway.cookie_header(ALICE)
            first = await client.get("/i/aaaa/api/health", headers=headers)
            assert first.json() == {"ready": True}
            gateway.table.add_route(dataclasses.replace(route, state="starting"))
            starting = await client.get("/i/aaaa/api/health", headers=headers)
            assert starting.status_code == 503 and "starting" in starting.text
            gateway.table.add_route(dataclasses.replace(route, upstream=url))
            moved = await client.get("/i/aaaa/api/health", headers=headers)
            assert moved.text == "other"
    finally:
        server.close()
        await server.wait_closed()
