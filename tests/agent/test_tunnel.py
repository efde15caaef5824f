"""The instance tunnel for real: a PortalTunnel and an AgentTunnel joined by a loopback
WebSocket, real HTTP and WebSocket servers behind the agent, clients on the unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from labgate.agent.tunnel import AgentTunnel, PortalTunnel
from labgate.agent.tunnel_stream import MAX_DATA, WINDOW
from labgate.router.server import Router
from labgate.security import SESSION_COOKIE, SessionSigner
from labgate.wire.routes import Route, RouteTable, UserInfo

MiB = 1 << 20
# What one stream may hold at one end: a window not yet granted back, plus what
# the local socket's write buffer held when credit was last granted (its
# high-water mark, 64 KiB on asyncio), plus one frame.
BUFFER_BOUND = WINDOW + 64 * 1024 + MAX_DATA
# Local data held back for want of credit: at most one read of the socket (256 KiB).
BACKLOG_BOUND = 256 * 1024


# --------------------------------------------------------------------------- the instance
class Upstream:
    """A tiny HTTP/1.1 server on loopback, keep-alive.

    ``GET /bytes/N`` answers N bytes (written with back-pressure), ``POST /sha``
    the SHA-256 of the body, anything else ``hello <path>``.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.bytes_sent = 0
        self.url = ""

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.open):
                writer.transport.abort()
            await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = content_length(head)
                body = await reader.readexactly(length) if length else b""
                if b"/bytes/" in path:
                    await self.stream(writer, int(path.rsplit(b"/", 1)[1]))
                    continue
                if method == b"POST":
                    answer = hashlib.sha256(body).hexdigest().encode()
                else:
                    answer = b"hello " + path
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, size: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * MiB
        left = size
        while left:
            piece = chunk[: min(left, MiB)]
            writer.write(piece)
            left -= len(piece)
            self.bytes_sent += len(piece)
            await writer.drain()


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes = b""
) -> bytes:
    """One request on a kept-alive connection; the response body."""
    method = "POST" if body else "GET"
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return await asyncio.wait_for(reader.readexactly(content_length(head)), 10)


async def drain_body(reader: asyncio.StreamReader) -> int:
    """Read one response head and its whole body; the body's size."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    left = content_length(head)
    total = 0
    while left:
        piece = await asyncio.wait_for(reader.read(min(left, MiB)), 10)
        assert piece, "connection closed early"
        left -= len(piece)
        total += len(piece)
    return total


# --------------------------------------------------------------------------- the tunnel
@dataclass
class Linked:
    """Two tunnel ends joined by a loopback WebSocket."""

    portal: PortalTunnel
    agent: AgentTunnel
    server: Server
    client: ClientConnection
    pump: asyncio.Task[None]
    directory: Path
    endpoints: dict[str, str] = field(default_factory=dict)

    def path(self, instance_id: str) -> str:
        return str(self.directory / f"{instance_id}.sock")

    async def serve(self, instance_id: str) -> str:
        await self.portal.serve(instance_id, self.path(instance_id))
        return self.path(instance_id)

    def cut(self) -> None:
        """Lose the connection abruptly (no close handshake)."""
        self.client.transport.abort()


async def carry(
    tunnel: PortalTunnel | AgentTunnel, ws: ServerConnection | ClientConnection
) -> None:
    """Hand every binary message to ``tunnel`` until the connection closes."""
    tunnel.attach(ws.send)
    try:
        async for message in ws:
            if isinstance(message, bytes):
                await tunnel.feed(message)
    except ConnectionClosed:
        pass
    finally:
        tunnel.detach("connection closed")


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


LinkFactory = Callable[[], Awaitable[Linked]]


@pytest.fixture
async def make_link(tmp_path: Path) -> AsyncIterator[LinkFactory]:
    made: list[Linked] = []

    async def make() -> Linked:
        portal = PortalTunnel()
        endpoints: dict[str, str] = {}
        agent = AgentTunnel(endpoints.get)
        server = await serve(lambda ws: carry(portal, ws), "127.0.0.1", 0, compression=None)
        port = server.sockets[0].getsockname()[1]
        client = await connect(f"ws://127.0.0.1:{port}", compression=None)
        pump = asyncio.get_running_loop().create_task(carry(agent, client))
        await wait_for(lambda: portal.connected)
        linked = Linked(
            portal, agent, server, client, pump, tmp_path / f"tun{len(made)}", endpoints
        )
        made.append(linked)
        return linked

    yield make
    for linked in made:
        linked.portal.close()
        linked.agent.close()
        await linked.client.close()
        linked.server.close()
        await linked.server.wait_closed()
        linked.pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await linked.pump


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def link(make_link: LinkFactory, upstream: Upstream) -> Linked:
    linked = await make_link()
    linked.endpoints["web"] = upstream.url
    return linked


# --------------------------------------------------------------------------- tests
async def test_http_keep_alive_through_the_tunnel(link: Linked, upstream: Upstream) -> None:
    path = await link.serve("web")
    reader, writer = await asyncio.open_unix_connection(path)
    for n in range(20):
        assert await request(reader, writer, f"/n/{n}") == f"hello /n/{n}".encode()
    body = os.urandom(5 * MiB)  # uploads are flow-controlled too
    assert await request(reader, writer, "/sha", body) == hashlib.sha256(body).hexdigest().encode()
    assert await request(reader, writer, "/last") == b"hello /last"
    assert upstream.connections == 1  # one stream, one connection to the instance
    assert link.portal.streams_opened == link.agent.streams_opened == 1
    writer.close()
    await writer.wait_closed()
    # Both ends forget the stream once both sides are done; the instance's socket closes.
    await wait_for(lambda: not link.portal.streams and not link.agent.streams and not upstream.open)
    assert link.portal.peak_backlog <= BACKLOG_BOUND
    assert link.agent.peak_buffered <= BUFFER_BOUND


async def test_half_close_delivers_the_rest(link: Linked) -> None:
    """The client half-closes after its request: the answer still comes back whole."""
    path = await link.serve("web")
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    writer.write_eof()
    assert await drain_body(reader) == 3_000_000
    assert await asyncio.wait_for(reader.read(), 10) == b""  # the instance closed after EOF
    writer.close()


async def test_websocket_upgrade_echo(link: Linked) -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as instance:
        link.endpoints["ws"] = f"http://127.0.0.1:{instance.sockets[0].getsockname()[1]}"
        path = await link.serve("ws")
        async with unix_connect(path, "ws://instance/ws") as ws:
            for n in range(50):
                await ws.send(f"message {n}")
                assert await asyncio.wait_for(ws.recv(), 10) == f"message {n}"
            big = os.urandom(MiB // 2)
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), 10) == big


async def test_large_download_bounded_memory(link: Linked, upstream: Upstream) -> None:
    path = await link.serve("web")
    reader, writer = await asyncio.open_unix_connection(path)
    size = 200 * MiB
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    started = time.monotonic()
    assert await drain_body(reader) == size
    elapsed = time.monotonic() - started
    writer.close()
    for end in (link.portal, link.agent):
        assert end.peak_buffered <= BUFFER_BOUND
        assert end.peak_backlog <= BACKLOG_BOUND
        # Frames waiting for the connection: never more than one window of DATA.
        assert end.peak_queued <= WINDOW + 64 * 1024
    assert link.agent.bytes_sent >= size
    assert link.portal.bytes_received == link.agent.bytes_sent
    logging.getLogger(__name__).info("200 MiB in %.2f s", elapsed)


async def test_stalled_reader_does_not_stall_other_streams(
    link: Linked, upstream: Upstream
) -> None:
    path = await link.serve("web")
    slow_reader, slow_writer = await asyncio.open_unix_connection(path, limit=64 * 1024)
    slow_writer.write(f"GET /bytes/{500 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.wait_for(slow_reader.readuntil(b"\r\n\r\n"), 10)  # then never reads again
    await asyncio.sleep(0.3)
    sent_when_stalled = upstream.bytes_sent

    reader, writer = await asyncio.open_unix_connection(path)
    size = 100 * MiB
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert await asyncio.wait_for(drain_body(reader), 30) == size
    writer.close()

    # The stalled stream holds its window and no more, at both ends, and the
    # instance could not push more than a little into it in the meantime.
    slow_id = min(link.portal.streams)
    agent_stream = link.agent.streams[slow_id]
    portal_stream = link.portal.streams[slow_id]
    assert agent_stream.read_paused and agent_stream.credit <= 0
    assert agent_stream.backlog_bytes <= BACKLOG_BOUND
    assert portal_stream.transport is not None
    assert portal_stream.transport.get_write_buffer_size() <= BUFFER_BOUND
    assert link.portal.peak_buffered <= BUFFER_BOUND
    assert upstream.bytes_sent - sent_when_stalled <= size + 16 * MiB
    slow_writer.close()
    await wait_for(lambda: not link.portal.streams and not link.agent.streams)


async def test_unknown_instance_refused(
    link: Linked, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    path = await link.serve("elsewhere")  # the agent has no such instance
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with caplog.at_level(logging.WARNING, logger="labgate.agent.tunnel"):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    assert link.agent.streams_refused == 1
    assert link.portal.streams_refused == 1
    assert not link.portal.streams and not link.agent.streams
    assert "no instance elsewhere on this site" in caplog.text
    assert upstream.connections == 0
    writer.close()


async def test_unreachable_endpoint_refused(link: Linked) -> None:
    link.endpoints["down"] = "http://127.0.0.1:1"
    path = await link.serve("down")
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert link.portal.streams_refused == 1
    writer.close()


async def test_connection_loss_closes_every_stream(link: Linked, upstream: Upstream) -> None:
    path = await link.serve("web")
    idle_reader, idle_writer = await asyncio.open_unix_connection(path)
    assert await request(idle_reader, idle_writer, "/one") == b"hello /one"
    busy_reader, busy_writer = await asyncio.open_unix_connection(path)
    busy_writer.write(f"GET /bytes/{1000 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 10)
    await wait_for(lambda: len(upstream.open) == 2)

    link.cut()
    for reader in (idle_reader, busy_reader):
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(reader.read(MiB), 10):
                pass
    await wait_for(lambda: not upstream.open)  # the agent closed its instance connections
    assert not link.portal.streams and not link.agent.streams
    assert not link.portal.connected and not link.agent.connected

    # While the connection is down the socket stays, but what connects is closed at once.
    assert Path(path).exists()
    reader, writer = await asyncio.open_unix_connection(path)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    for writer in (idle_writer, busy_writer):
        writer.close()


async def test_unserve_removes_socket_and_streams(link: Linked) -> None:
    path = await link.serve("web")
    await link.portal.serve("web", path)  # idempotent
    reader, writer = await asyncio.open_unix_connection(path)
    assert await request(reader, writer, "/x") == b"hello /x"
    await link.portal.unserve("web")
    assert not Path(path).exists()
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    await wait_for(lambda: not link.agent.streams)
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(path)
    writer.close()


async def test_socket_permissions(link: Linked) -> None:
    link.directory.mkdir(mode=0o755)  # a looser directory is tightened
    path = await link.serve("web")
    directory = os.stat(link.directory)
    assert stat.S_IMODE(directory.st_mode) == 0o700
    assert directory.st_uid == os.getuid()
    socket_file = os.stat(path)
    assert stat.S_ISSOCK(socket_file.st_mode)
    assert stat.S_IMODE(socket_file.st_mode) == 0o600
    link.portal.close()
    assert not Path(path).exists()


async def test_router_proxies_through_the_tunnel(link: Linked, upstream: Upstream) -> None:
    """The router needs nothing new: the route's upstream is the unix socket."""
    path = await link.serve("web")
    table = RouteTable()
    table.load(users=[UserInfo(1, "alice")], routes=[Route("web", f"unix:{path}", 1)])
    signer = SessionSigner("tunnel-test-key", 3600)
    router = Router(table, signer, f"unix:{link.directory}/no-portal.sock")
    await router.listen("127.0.0.1", 0)
    cookie = {"Cookie": f"{SESSION_COOKIE}={signer.issue(1)[0]}"}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{router.port}", headers=cookie
        ) as client:
            for n in range(10):
                response = await client.get(f"/i/web/n/{n}")
                assert response.status_code == 200
                assert response.content == f"hello /i/web/n/{n}".encode()
            response = await client.get(f"/i/web/bytes/{20 * MiB}")
            assert response.status_code == 200 and len(response.content) == 20 * MiB
            link.cut()  # the router answers 502 while the site is away
            await wait_for(lambda: not link.portal.connected)
            response = await client.get("/i/web/again")
            assert response.status_code == 502
    finally:
        await router.close()


async def test_a_peer_sending_beyond_its_credit_loses_the_stream(tmp_path: Path) -> None:
    from labgate.agent.tunnel_stream import DATA, HEADER, OPEN

    sent: list[bytes] = []

    async def send(message: bytes) -> None:
        sent.append(message)

    portal = PortalTunnel(send)
    path = str(tmp_path / "t" / "x.sock")
    await portal.serve("x", path)
    reader, writer = await asyncio.open_unix_connection(path)
    async with asyncio.timeout(5):
        while not sent:
            await asyncio.sleep(0.01)
    kind, stream_id, _ = HEADER.unpack_from(sent[0])
    assert kind == OPEN
    # A lying agent floods the stream while the local client reads nothing: credit is
    # granted only for what the local socket took, so the flood runs out of it.
    chunk = b"x" * MAX_DATA
    frame = HEADER.pack(DATA, stream_id, len(chunk)) + chunk
    for _ in range(256):  # 16 MiB, far more than a socket's buffers and one window
        await portal.feed(frame)
        if portal.protocol_errors:
            break
    assert portal.protocol_errors == 1
    assert stream_id not in portal.streams
    async with asyncio.timeout(5):
        received = await reader.read()
    assert len(received) < 16 * MiB  # what was within its credit, then the end
    writer.close()
    portal.close()
