"""The router's own answers: clear statuses and pages, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import httpx

from labgate.router.context import RouterOptions
from labgate.wire.routes import Route

from .conftest import (
    ALICE,
    ALICE_READ_TOKEN,
    GatewayFactory,
    Recorded,
    cookie_line,
    raw_request,
    status_of,
)

HTML = {"Accept": "text/html,application/xhtml+xml"}


async def test_browser_without_session_is_sent_to_login(recorded: Recorded) -> None:
    async with httpx.AsyncClient(base_url=recorded.gw.base) as client:
        response = await client.get("/i/aaaa/lab/tree?x=1&y=2", headers=HTML)
    assert response.status_code == 302
    assert response.headers["location"] == "/login?next=/i/aaaa/lab/tree%3Fx%3D1%26y%3D2"


async def test_api_client_without_credentials_gets_401_json(recorded: Recorded) -> None:
    async with httpx.AsyncClient(base_url=recorded.gw.base) as client:
        response = await client.get("/i/aaaa/api/x")
        assert response.status_code == 401
        body = response.json()
        assert body["error"] == "unauthorized"
        assert "detail" in body
        # A labgate token that is wrong is final, even with a browser Accept.
        response = await client.get(
            "/i/aaaa/api/x", headers={**HTML, "Authorization": "token lg_nope"}
        )
        assert response.status_code == 302 or response.status_code == 401


async def test_unknown_instance_is_404(recorded: Recorded) -> None:
    gw = recorded.gw
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        response = await client.get("/i/zzzz/")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        response = await client.get("/i/zzzz/", headers=HTML)
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "zzzz" in response.text


async def test_missing_slash_redirects(recorded: Recorded) -> None:
    gw = recorded.gw
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        response = await client.get("/i/aaaa?q=1")
    assert response.status_code == 302
    assert response.headers["location"] == "/i/aaaa/?q=1"


async def test_starting_instance_is_503_with_retry(recorded: Recorded) -> None:
    gw = recorded.gw
    gw.table.add_route(Route("ssss", recorded.a.url, ALICE, state="starting"))
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        response = await client.get("/i/ssss/", headers=HTML)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert 'http-equiv="refresh"' in response.text
    assert recorded.a.seen == []


async def test_refusing_upstream_is_502_naming_the_instance(recorded: Recorded) -> None:
    gw = recorded.gw
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gw.table.add_route(Route("dead", f"http://127.0.0.1:{port}", ALICE))
    gw.table.add_route(Route("gone", "unix:/nonexistent/tool.sock", ALICE))
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        response = await client.get("/i/dead/", headers=HTML)
        assert response.status_code == 502
        assert "dead" in response.text
        assert "refused" in response.text
        response = await client.get("/i/gone/")
        assert response.status_code == 502
        assert response.json()["error"] == "bad_gateway"


async def test_silent_upstream_is_504(make_gateway: GatewayFactory, recording) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(RouterOptions(response_timeout=0.3, sweep_interval=0.05), demo=False)
    silent = await recording(lambda seen: b"")
    gw.table.add_route(Route("slow", silent.url, ALICE))
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        response = await client.get("/i/slow/")
    assert response.status_code == 504
    assert "slow" in response.json()["detail"]


async def test_invalid_upstream_response_is_502(recorded: Recorded, recording) -> None:  # type: ignore[no-untyped-def]
    gw = recorded.gw
    liar = await recording(lambda seen: b"NOT HTTP AT ALL\r\n\r\n")
    gw.table.add_route(Route("liar", liar.url, ALICE))
    response = await raw_request(
        gw.port,
        b"GET /i/liar/ HTTP/1.1\r\nHost: gw\r\n" + cookie_line(gw, ALICE).encode() + b"\r\n",
    )
    assert status_of(response) == 502


async def test_portal_down_is_502(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(demo=False)
    assert gw.portal is not None
    await gw.portal.stop()
    gw.portal = None
    async with httpx.AsyncClient(base_url=gw.base) as client:
        response = await client.get("/", headers=HTML)
    assert response.status_code == 502
    assert "portal" in response.text.lower()


async def test_malformed_requests_get_400(recorded: Recorded) -> None:
    port = recorded.gw.port
    for data in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ):
        response = await raw_request(port, data)
        assert status_of(response) in (400, 405), (data, response)
        assert b"Traceback" not in response


async def test_oversized_heads(recorded: Recorded) -> None:
    port = recorded.gw.port
    big = "x" * 70000
    response = await raw_request(
        port, f"GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode()
    )
    assert status_of(response) == 431
    many = "".join(f"X-H{i}: v\r\n" for i in range(200))
    response = await raw_request(port, f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert status_of(response) == 431
    response = await raw_request(port, f"GET /{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(response) == 414
    # A head that never ends is cut off without waiting for it.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    answer = b""
    for _ in range(100):
        writer.write(b"y" * 65536)
        try:
            await asyncio.wait_for(writer.drain(), 2)
        except (ConnectionError, TimeoutError):
            break
        if reader.at_eof() or len(reader._buffer) > 0:  # type: ignore[attr-defined]
            break
    with contextlib.suppress(ConnectionError, TimeoutError):
        answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert answer == b"" or status_of(answer) == 431


async def test_error_json_shape(recorded: Recorded) -> None:
    response = await raw_request(recorded.gw.port, b"GET /i/aaaa/../x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 400
    body = json.loads(response.partition(b"\r\n\r\n")[2])
    assert set(body) == {"error", "detail"}


async def test_token_without_access_scope_says_insufficient_scope(recorded: Recorded) -> None:
    # The same code the portal and docs/api.md use for a token that lacks a scope.
    headers = {"Authorization": f"token {ALICE_READ_TOKEN}"}
    async with httpx.AsyncClient(base_url=recorded.gw.base, headers=headers) as client:
        response = await client.get("/i/aaaa/api/x")
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert "instances:access" in response.json()["detail"]


async def test_router_pages_look_like_the_portals(recorded: Recorded) -> None:
    # The portal's stylesheet (same origin, through this router) and its error-page markup.
    gw = recorded.gw
    async with httpx.AsyncClient(base_url=gw.base, headers=gw.cookie_header(ALICE)) as client:
        page = await client.get("/i/zzzz/", headers=HTML)
    assert page.status_code == 404
    assert '<link rel="stylesheet" href="/static/labgate.css">' in page.text
    assert 'class="site-header"' in page.text and 'class="brand" href="/"' in page.text
    assert 'class="narrow panel error-page"' in page.text
    assert '<p class="status-code">Error 404</p>' in page.text
    assert 'href="/instances"' in page.text  # where to go next
    assert "style=" not in page.text  # no inline styles (a strict CSP may forbid them)
