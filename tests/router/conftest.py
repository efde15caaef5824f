"""Fixtures for router tests: real upstreams on random ports, a real router, users.

Users: alice (1) owns instance ``aaaa``, bob (2) owns ``bbbb``, root (3) is an
admin. Each instance is the demo tool's own server (in a thread), requiring
its own upstream token like a real tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from labgate.router import http
from labgate.router.context import RouterOptions
from labgate.router.server import Router
from labgate.security import SESSION_COOKIE, SessionSigner, hash_token
from labgate.tools.demo.server import Demo, Server
from labgate.wire.routes import Route, RouteTable, TokenInfo, UserInfo

KEY = "router-test-signing-key"
ALICE, BOB, ROOT, CAROL = 1, 2, 3, 4
ALICE_TOKEN = "lg_alice_token_0123456789abcdefghijklmnopqrstuvwxyz"
BOB_TOKEN = "lg_bob_token_0123456789abcdefghijklmnopqrstuvwxyz"
ROOT_TOKEN = "lg_root_token_0123456789abcdefghijklmnopqrstuvwxyz"
ALICE_READ_TOKEN = "lg_alice_read_only_0123456789abcdefghijklmnopqrstuv"


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    """Router tests run on uvloop, like the router in production."""
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Served:
    """A uvicorn server running in the test's loop."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)


async def serve_asgi(app: Any, *, uds: str | None = None) -> Served:
    """Run an ASGI app under uvicorn on a random loopback port (or a unix socket)."""
    config = uvicorn.Config(
        app,
        uds=uds,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="websockets-sansio",
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    sockets: list[socket.socket] | None = None
    if uds is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets = [sock]
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        url = f"unix:{uds}"
    task = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    return Served(server, task, url)


def nothing_listens() -> str:
    """A loopback address where nothing listens (a port just bound and let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def portal_app() -> Starlette:
    """A stand-in portal that shows what reached it."""

    async def echo(request: Request) -> Response:
        return JSONResponse(
            {
                "path": request.url.path,
                "query": request.url.query,
                "headers": {k: v for k, v in request.headers.items()},
            }
        )

    return Starlette(routes=[StarletteRoute("/{path:path}", echo, methods=["GET", "POST", "PUT"])])


@dataclass
class Gateway:
    """A router with two demo instances and a portal behind it."""

    router: Router
    table: RouteTable
    signer: SessionSigner
    base: str
    port: int
    upstreams: dict[str, DemoServed] = field(default_factory=dict)
    portal: Served | None = None

    def cookie(self, user_id: int) -> str:
        value, _ = self.signer.issue(user_id)
        return value

    def cookie_header(self, user_id: int) -> dict[str, str]:
        # The name this router takes (``__Host-labgate-session`` when told cookies are Secure).
        return {"Cookie": f"{self.router.options.session_cookie}={self.cookie(user_id)}"}


@dataclass
class DemoServed:
    """The demo tool's standard-library server, in a thread of the test process."""

    server: Server
    thread: threading.Thread
    url: str

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def serve_demo(instance_id: str, token: str) -> DemoServed:
    """Serve the demo tool for ``instance_id`` on a random loopback port."""
    os.environ["LABGATE_INSTANCE_TOKEN"] = token
    try:
        demo = Demo(f"/i/{instance_id}/")
    finally:
        del os.environ["LABGATE_INSTANCE_TOKEN"]
    server = Server(("127.0.0.1", 0), demo)
    # A short poll so that shutdown() returns at once at the end of the test.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return DemoServed(server, thread, f"http://127.0.0.1:{server.server_address[1]}")


def users() -> list[UserInfo]:
    return [
        UserInfo(ALICE, "alice"),
        UserInfo(BOB, "bob"),
        UserInfo(ROOT, "root", is_admin=True),
        UserInfo(CAROL, "carol"),
    ]


def tokens() -> list[tuple[str, TokenInfo]]:
    access = frozenset({"instances:access"})
    return [
        (hash_token(ALICE_TOKEN), TokenInfo(ALICE, access)),
        (hash_token(BOB_TOKEN), TokenInfo(BOB, access)),
        (hash_token(ROOT_TOKEN), TokenInfo(ROOT, frozenset({"admin"}))),
        (hash_token(ALICE_READ_TOKEN), TokenInfo(ALICE, frozenset({"instances:read"}))),
    ]


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Build gateways; everything started is stopped afterwards."""
    started: list[Gateway] = []

    async def make(
        options: RouterOptions | None = None, portal_uds: bool = True, demo: bool = True
    ) -> Gateway:
        table = RouteTable()
        table.load(users=users(), tokens=tokens())
        signer = SessionSigner(KEY, 3600)
        upstreams: dict[str, DemoServed] = {}
        for instance_id, owner in (("aaaa", ALICE), ("bbbb", BOB)) if demo else ():
            token = f"upstream-token-{instance_id}"
            served = serve_demo(instance_id, token)
            upstreams[instance_id] = served
            table.add_route(Route(instance_id, served.url, owner, upstream_token=token))
        uds = str(tmp_path / f"portal{len(started)}.sock") if portal_uds else None
        portal = await serve_asgi(portal_app(), uds=uds)
        router = Router(table, signer, portal.url, options)
        await router.listen("127.0.0.1", 0)
        gateway = Gateway(
            router, table, signer, f"http://127.0.0.1:{router.port}", router.port, upstreams, portal
        )
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.router.close()
        for served in gateway.upstreams.values():
            await served.stop()
        if gateway.portal is not None:
            await gateway.portal.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    """A gateway with default options."""
    return await make_gateway()


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the router closes or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        while True:
            try:
                piece = await asyncio.wait_for(reader.read(65536), read_timeout)
            except TimeoutError:
                break
            if not piece:
                break
            chunks.append(piece)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def status_of(response: bytes) -> int:
    """The status code of the first response in raw bytes."""
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclass
class Seen:
    """A request a recording upstream received."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


Handler = Callable[[Seen], bytes]


def ok_handler(name: str) -> Handler:
    """Answer every request with 200 and ``name`` as the body."""

    def handle(seen: Seen) -> bytes:
        body = json.dumps({"upstream": name, "target": seen.target}).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    return handle


class _RecordingProtocol(asyncio.Protocol):
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.target = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        self.owner.transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.target, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        seen = Seen(
            self.parser.get_method().decode(),
            self.target.decode("latin-1"),
            self.headers,
            self.body,
        )
        self.owner.seen.append(seen)
        response = self.owner.handler(seen)
        assert self.transport is not None
        if response:
            self.transport.write(response)
        if self.owner.close_after_response:
            self.transport.close()


class RecordingUpstream:
    """A raw HTTP/1.1 upstream that records what it receives."""

    def __init__(self, handler: Handler, *, close_after_response: bool = False) -> None:
        self.handler = handler
        self.close_after_response = close_after_response
        self.seen: list[Seen] = []
        self.connections = 0
        self.transports: set[Any] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _RecordingProtocol(self), "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in list(self.transports):
                transport.close()
            await self.server.wait_closed()


@pytest.fixture
async def recording() -> AsyncIterator[Callable[..., Awaitable[RecordingUpstream]]]:
    """Start recording upstreams; all are stopped afterwards."""
    started: list[RecordingUpstream] = []

    async def make(handler: Handler, **kwargs: Any) -> RecordingUpstream:
        upstream = await RecordingUpstream(handler, **kwargs).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


@dataclass
class Recorded:
    """A gateway whose instances are recording upstreams: aaaa (alice), bbbb (bob)."""

    gw: Gateway
    a: RecordingUpstream
    b: RecordingUpstream


@pytest.fixture
async def recorded(
    make_gateway: GatewayFactory, recording: Callable[..., Awaitable[RecordingUpstream]]
) -> Recorded:
    """A gateway in front of two recording upstreams."""
    gw = await make_gateway(demo=False)
    a = await recording(ok_handler("a"))
    b = await recording(ok_handler("b"))
    gw.table.add_route(Route("aaaa", a.url, ALICE, upstream_token="tok-a"))
    gw.table.add_route(Route("bbbb", b.url, BOB, upstream_token="tok-b"))
    return Recorded(gw, a, b)


def cookie_line(gw: Gateway, user_id: int) -> str:
    """A raw ``Cookie:`` header line with a fresh session of ``user_id``."""
    return f"Cookie: {SESSION_COOKIE}={gw.cookie(user_id)}\r\n"


def statuses(response: bytes) -> list[int]:
    """Status codes of every response in raw bytes (bodies here never contain status lines)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", response)]


@pytest.fixture
def c_heads() -> None:
    """The C head scanners (``labgate.router._heads``): skipped without them, failed in CI."""
    if http.HEADS_IN_C:
        return
    if os.environ.get("LABGATE_ROUTER_PURE", "") not in ("", "0"):
        pytest.skip("the router was told to run Python (LABGATE_ROUTER_PURE): no C scanners")
    if os.environ.get("CI") == "true":
        pytest.fail("CI must test the C head scanners: labgate.router._heads is not loaded")
    pytest.skip("the C head scanners (labgate.router._heads) are not built here: make compile")


async def keep_alive_upstream(
    answer: list[bytes],
) -> tuple[asyncio.Server, str, list[int]]:
    """An upstream that answers every request of a connection with ``answer``, piece by piece.

    Each piece is its own write after a short pause (the router reads the body
    in many pieces); the list it returns counts the requests of each connection.
    """
    per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        index = len(per_connection) - 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                per_connection[index] += 1
                for piece in answer:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", per_connection
