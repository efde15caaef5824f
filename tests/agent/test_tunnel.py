"""The instance tunnel for real: a router, an agent's data connection dialled to it with a
ticket, real HTTP and WebSocket servers behind the agent, clients through the router."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from labgate.agent.tunnel import AgentTunnel, TunnelDialer, TunnelRefused, dial
from labgate.router.context import RouterOptions
from labgate.router.server import Router
from labgate.router.tunnel import SiteTunnel
from labgate.security import SESSION_COOKIE, SessionSigner, TunnelTickets
from labgate.wire.routes import Route, RouteTable, UserInfo
from labgate.wire.tunnel import DATA, HEADER, MAX_DATA, OPEN, ROUTER_WINDOW, WINDOW

MiB = 1 << 20
KEY = "tunnel-test-key"
# What one stream may hold at one end: a window not yet granted back (the larger,
# the router's), plus what the local socket's write buffer held when credit was last
# granted (its high-water mark, 64 KiB on asyncio), plus one frame.
BUFFER_BOUND = max(WINDOW, ROUTER_WINDOW) + 64 * 1024 + MAX_DATA
# Local data held back for want of credit: at most one read of the socket (256 KiB).
BACKLOG_BOUND = 256 * 1024


# --------------------------------------------------------------------------- the instance
class Upstream:
    """A tiny HTTP/1.1 server on loopback, keep-alive.

    ``GET .../bytes/N`` answers N bytes (written with back-pressure), ``.../pattern/N``
    the first N bytes of :func:`pattern` (``101`` first when asked to upgrade), ``POST``
    the SHA-256 of the body, anything else ``hello <path>``.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.bytes_sent = 0
        self.url = ""

    async def start(self, path: str = "") -> Upstream:
        """Listen on loopback, or on the Unix socket ``path``."""
        if path:
            self.server = await asyncio.start_unix_server(self.handle, path)
            self.url = f"unix:{path}"
            return self
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
                if b"/pattern/" in path:
                    body = pattern(int(path.rsplit(b"/", 1)[1]))
                    if b"upgrade: bytes" in head.lower():
                        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n")
                        writer.write(b"Connection: Upgrade\r\nUpgrade: bytes\r\n\r\n")
                        for start in range(0, len(body), MiB):
                            writer.write(body[start : start + MiB])
                            await writer.drain()
                        writer.close()
                        return
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    writer.write(body)
                    await writer.drain()
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


def pattern(size: int) -> bytes:
    """``size`` bytes that repeat only every MiB and 7 bytes: a piece out of place shows."""
    block = hashlib.shake_256(b"tunnel").digest(MiB + 7)
    return (block * (size // len(block) + 1))[:size]


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


async def drain_body(reader: asyncio.StreamReader, timeout: float = 10) -> int:
    """Read one response head and its whole body; the body's size."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    left = total = content_length(head)
    while left:
        piece = await asyncio.wait_for(reader.read(MiB), timeout)
        assert piece, "connection closed early"
        left -= len(piece)
    return total


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- the tunnel
@dataclass
class Linked:
    """A router with site ``s`` (epoch ``e1``) and the agent's data connection to it."""

    router: Router
    table: RouteTable
    agent: AgentTunnel
    cookie: str
    endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router.port}"

    @property
    def near(self) -> SiteTunnel:
        """The router's end of the data connection."""
        return self.router.ctx.site_tunnels.sites["s"][-1]

    def route(self, instance_id: str, site: str = "s") -> str:
        """Route ``/i/<instance_id>/`` through the tunnel of ``site``; its path prefix."""
        self.table.add_route(Route(instance_id, f"tunnel:{site}/{instance_id}", 1))
        return f"/i/{instance_id}"

    async def client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.router.port)

    async def request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        body: bytes = b"",
        status: int = 200,
    ) -> bytes:
        """One request on a kept-alive connection through the router; the response body."""
        self.send(writer, path, body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        return await asyncio.wait_for(reader.readexactly(content_length(head)), 10)

    def send(self, writer: asyncio.StreamWriter, path: str, body: bytes = b"") -> None:
        method = "POST" if body else "GET"
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nCookie: {self.cookie}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def cut(self) -> None:
        """Lose the data connection abruptly."""
        if self.agent.transport is not None:
            self.agent.transport.abort()


async def start_router(table: RouteTable, **options: object) -> Router:
    signer = SessionSigner(KEY, 3600)
    opts = RouterOptions(pool_idle_timeout=0.3, sweep_interval=0.1, **options)  # type: ignore[arg-type]
    router = Router(table, signer, "unix:/nonexistent/portal.sock", opts)
    return router


def ticket(site: str = "s", epoch: str = "e1", ttl: float = 60) -> str:
    return TunnelTickets(KEY).issue(site, epoch, ttl)


LinkFactory = Callable[[], Awaitable[Linked]]


@pytest.fixture
async def make_link() -> AsyncIterator[LinkFactory]:
    made: list[Linked] = []

    async def make() -> Linked:
        table = RouteTable()
        table.load(users=[UserInfo(1, "alice")])
        table.set_tunnel_site("s", "e1")
        router = await start_router(table)
        await router.listen("127.0.0.1", 0)
        endpoints: dict[str, str] = {}
        agent = await dial(f"http://127.0.0.1:{router.port}", ticket(), endpoints.get)
        await wait_for(lambda: bool(router.ctx.site_tunnels.sites.get("s")))
        cookie = f"{SESSION_COOKIE}={SessionSigner(KEY, 3600).issue(1)[0]}"
        linked = Linked(router, table, agent, cookie, endpoints)
        made.append(linked)
        return linked

    yield make
    for linked in made:
        linked.agent.close()
        await linked.router.close()


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


async def raw_agent(link: Linked) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Replace the link's agent by a data connection this test writes frames on itself."""
    link.agent.close()
    await wait_for(lambda: not link.router.ctx.site_tunnels.sites)
    reader, writer = await asyncio.open_connection("127.0.0.1", link.router.port)
    writer.write(
        f"GET /api/v1/agent/tunnel HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        f"Upgrade: labgate-tunnel\r\nAuthorization: Bearer {ticket()}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    await wait_for(lambda: bool(link.router.ctx.site_tunnels.sites.get("s")))
    return reader, writer


# --------------------------------------------------------------------------- tests
async def test_http_keep_alive_through_the_tunnel(link: Linked, upstream: Upstream) -> None:
    prefix = link.route("web")
    reader, writer = await link.client()
    for n in range(20):
        assert await link.request(reader, writer, f"{prefix}/n/{n}") == (
            f"hello {prefix}/n/{n}".encode()
        )
    body = os.urandom(5 * MiB)  # uploads are flow-controlled too
    answer = await link.request(reader, writer, f"{prefix}/sha", body)
    assert answer == hashlib.sha256(body).hexdigest().encode()
    assert await link.request(reader, writer, f"{prefix}/last") == f"hello {prefix}/last".encode()
    assert upstream.connections == 1  # one stream, one connection to the instance
    assert link.near.streams_opened == link.agent.streams_opened == 1
    writer.close()
    await writer.wait_closed()
    # Once the router lets the idle connection go, both ends forget the stream and the
    # instance's socket closes.
    await wait_for(lambda: not link.near.streams and not link.agent.streams and not upstream.open)
    assert link.agent.peak_buffered <= BUFFER_BOUND
    assert link.near.peak_backlog <= BACKLOG_BOUND


async def test_half_close_delivers_the_rest(link: Linked) -> None:
    """The client half-closes after its request: the answer still comes back whole."""
    prefix = link.route("web")
    reader, writer = await link.client()
    link.send(writer, f"{prefix}/bytes/3000000")
    writer.write_eof()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert content_length(head) == 3_000_000
    assert len(await asyncio.wait_for(reader.readexactly(3_000_000), 10)) == 3_000_000
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


@pytest.fixture
async def echo_url(link: Linked) -> AsyncIterator[str]:
    """A WebSocket echo server behind the agent, routed as ``ws``: its URL through the router."""

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as instance:
        link.endpoints["ws"] = f"http://127.0.0.1:{instance.sockets[0].getsockname()[1]}"
        yield f"ws://127.0.0.1:{link.router.port}{link.route('ws')}/ws"


async def test_websocket_upgrade_echo(link: Linked, echo_url: str) -> None:
    async with connect(echo_url, additional_headers={"Cookie": link.cookie}) as ws:
        for n in range(50):
            await ws.send(f"message {n}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"message {n}"
        big = os.urandom(MiB // 2)
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big


async def test_many_websockets_at_once(link: Linked, echo_url: str) -> None:
    """Concurrent WebSockets, each echoing many small messages, while a download runs."""

    async def one(n: int) -> None:
        async with connect(echo_url, additional_headers={"Cookie": link.cookie}) as ws:
            for i in range(100):
                await ws.send(f"{n}:{i}")
                assert await asyncio.wait_for(ws.recv(), 10) == f"{n}:{i}"

    async def download() -> None:
        reader, writer = await link.client()
        link.send(writer, f"{link.route('web')}/bytes/{50 * MiB}")
        assert await drain_body(reader) == 50 * MiB
        writer.close()

    await asyncio.gather(download(), *(one(n) for n in range(16)))
    assert link.near.protocol_errors == link.agent.protocol_errors == 0


async def test_large_download_bounded_memory(link: Linked, upstream: Upstream) -> None:
    prefix = link.route("web")
    reader, writer = await link.client()
    size = 200 * MiB
    link.send(writer, f"{prefix}/bytes/{size}")
    assert await drain_body(reader) == size
    writer.close()
    for end in (link.near, link.agent):
        assert end.peak_buffered <= BUFFER_BOUND
        assert end.peak_backlog <= BACKLOG_BOUND
    # What waits in the agent's data connection: never more than one window of DATA.
    assert link.agent.peak_queued <= ROUTER_WINDOW + 64 * 1024
    assert link.agent.bytes_sent >= size
    assert link.near.bytes_received == link.agent.bytes_sent


async def slow_client(link: Linked) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose socket takes little at a time, so that the router's writes to it queue."""
    reader, writer = await asyncio.open_connection("127.0.0.1", link.router.port, limit=MiB)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024
    )
    return reader, writer


async def read_slowly(reader: asyncio.StreamReader, size: int) -> bytes:
    """``size`` bytes, read a little at a time with pauses (writes to this client queue up)."""
    got = bytearray()
    while len(got) < size:
        piece = await asyncio.wait_for(reader.read(min(256 * 1024, size - len(got))), 30)
        assert piece, "connection closed early"
        got += piece
        if len(got) % (4 * MiB) < len(piece):
            await asyncio.sleep(0.05)
    return bytes(got)


async def test_bytes_arrive_intact_to_slow_readers(link: Linked) -> None:
    """Both ends read into buffers they reuse: a buffer a queued write still holds is not reused.

    Two responses at once, one of them upgraded (the router writes the tunnel's
    bytes to the client as they come, and they queue in its transport when
    the client is slow), to slow clients: every byte arrives, in order.
    """
    prefix = link.route("web")
    size = 24 * MiB
    plain_reader, plain_writer = await slow_client(link)
    link.send(plain_writer, f"{prefix}/pattern/{size}")
    raw_reader, raw_writer = await slow_client(link)
    raw_writer.write(
        f"GET {prefix}/pattern/{size} HTTP/1.1\r\nHost: x\r\nCookie: {link.cookie}\r\n"
        "Connection: Upgrade\r\nUpgrade: bytes\r\n\r\n".encode()
    )

    async def plain() -> bytes:
        head = await asyncio.wait_for(plain_reader.readuntil(b"\r\n\r\n"), 10)
        assert content_length(head) == size
        return await read_slowly(plain_reader, size)

    async def upgraded() -> bytes:
        head = await asyncio.wait_for(raw_reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return await read_slowly(raw_reader, size)

    got = await asyncio.gather(plain(), upgraded())
    expected = hashlib.sha256(pattern(size)).hexdigest()
    assert [hashlib.sha256(body).hexdigest() for body in got] == [expected, expected]
    for writer in (plain_writer, raw_writer):
        writer.close()


async def test_small_pieces_queued_for_a_stalled_reader_keep_no_read_buffers() -> None:
    """What a stalled reader's transport keeps of small DATA is a copy, not a view keeping a
    whole read buffer (memory stays about the stream's window, not a buffer per frame)."""
    from labgate.wire.tunnel import COPY_BELOW, PipeStream, TunnelEnd

    class Stalled:
        """A local transport whose reader reads nothing: it keeps everything written to it."""

        def __init__(self) -> None:
            self.kept: list[bytes | memoryview] = []

        def write(self, data: bytes | memoryview) -> None:
            self.kept.append(data)

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return sum(len(d) for d in self.kept)

    end = TunnelEnd()
    end.attach(lambda data: None)
    stream = PipeStream(end, 7, "web", opening=False)
    end.streams[7] = stream
    stalled = Stalled()
    stream.connection_made(stalled)  # type: ignore[arg-type]

    def arrive(frame: bytes) -> None:  # as the connection's reads would: one frame each
        buf = end.get_buffer(-1)
        buf[: len(frame)] = frame
        end.buffer_updated(len(frame))

    for n in range(500):
        arrive(HEADER.pack(DATA, 7, 100) + bytes([n % 256]) * 100)
    assert end.in_buffers.allocated == 1  # every small piece was copied
    big = COPY_BELOW + 1
    for n in range(3):
        arrive(HEADER.pack(DATA, 7, big) + bytes([n]) * big)
    assert end.in_buffers.allocated == 3  # a large piece is handed on as it is, and kept
    assert b"".join(bytes(d) for d in stalled.kept) == b"".join(
        [bytes([n % 256]) * 100 for n in range(500)] + [bytes([n]) * big for n in range(3)]
    )


async def test_the_router_says_its_window_and_the_agent_takes_it_as_its_credit(
    link: Linked, upstream: Upstream
) -> None:
    """The router's 101 says its receive window; the agent's streams take it as their credit,
    and the agent's own window stays what the router assumes of it."""
    assert link.near.receive_window == link.agent.send_window == ROUTER_WINDOW
    assert link.agent.receive_window == link.near.send_window == WINDOW
    prefix = link.route("web")
    reader, writer = await link.client()
    link.send(writer, f"{prefix}/bytes/{3 * MiB}")
    assert await drain_body(reader) == 3 * MiB
    writer.close()
    assert link.near.protocol_errors == link.agent.protocol_errors == 0


@pytest.mark.parametrize(
    ("said", "window"),
    [
        (None, WINDOW),  # a router that says nothing: the window both ends always had
        (str(ROUTER_WINDOW), ROUTER_WINDOW),
        ("65536", 65536),
        ("1024", WINDOW),  # below the range
        (str(1 << 30), WINDOW),  # above it
        ("9" * 5000, WINDOW),  # past what int() reads
        ("\u00b2", WINDOW),  # a digit to str.isdigit(), not to int()
        ("-1", WINDOW),
    ],
)
async def test_the_agent_takes_a_window_from_the_routers_answer_only_within_its_range(
    said: str | None, window: int
) -> None:
    class Transport:
        def writelines(self, data: list[bytes | memoryview]) -> None:
            pass

        def get_write_buffer_size(self) -> int:
            return 0

    tunnel = AgentTunnel(lambda instance_id: None)
    tunnel.connection_made(Transport())  # type: ignore[arg-type]
    head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: labgate-tunnel\r\n"
    if said is not None:
        head += f"Labgate-Tunnel-Window: {said}\r\n"
    tunnel.data_received((head + "\r\n").encode("latin-1"))
    assert tunnel.switched.done() and tunnel.send_window == window


def test_a_large_read_goes_on_as_a_view_even_when_the_connection_is_backed_up() -> None:
    """The agent copies no large read into fresh memory when its data connection queues:
    the read buffer is set aside until written. A read under one frame is copied (a view
    would keep a whole buffer)."""
    from labgate.wire.tunnel import COPY_BELOW, SocketStream, TunnelEnd

    class Socket:
        def pause_reading(self) -> None:
            pass

    sent: list[bytes | memoryview] = []
    end = TunnelEnd()
    end.attach(sent.extend, lambda: 1)  # one byte always waits: backed up
    end.send_window = ROUTER_WINDOW
    stream = SocketStream(end, 5, "web", opening=False)
    end.streams[5] = stream
    stream.transport = Socket()  # type: ignore[assignment]

    def read(size: int, fill: int) -> list[bytes | memoryview]:
        """One read of the instance's socket; the DATA payloads it was sent as."""
        before = len(sent)
        buf = stream.get_buffer(-1)
        buf[:size] = bytes([fill]) * size
        stream.buffer_updated(size)
        return sent[before + 1 :: 2]  # header, payload, header, payload...

    first = read(MAX_DATA * 2, 1)  # two frames
    assert all(isinstance(p, memoryview) for p in first) and end.buffers.allocated == 1
    second = read(MAX_DATA, 2)  # the first buffer is still viewed: another is taken
    assert all(isinstance(p, memoryview) for p in second) and end.buffers.allocated == 2
    small = read(COPY_BELOW, 3)
    assert all(isinstance(p, bytes) for p in small) and end.buffers.allocated == 3
    assert b"".join(first) == b"\x01" * (MAX_DATA * 2)
    assert b"".join(second) == b"\x02" * MAX_DATA
    assert b"".join(small) == b"\x03" * COPY_BELOW


def test_a_read_buffer_still_viewed_is_not_reused() -> None:
    from labgate.wire.tunnel import ReadBuffers

    buffers = ReadBuffers(1024)
    first = buffers.take()
    assert len(first) == 1024 and buffers.take() is first  # nothing holds it: reused
    held = memoryview(first)[10:20]  # as a transport that could not send it at once
    second = buffers.take()
    assert second is not first and len(second) == 1024
    first[10:20] = b"0123456789"
    second[:] = b"y" * 1024  # the next read goes elsewhere: what is held stays as it was
    assert bytes(held) == b"0123456789"
    held.release()
    assert buffers.take() is second
    second_view = memoryview(second)
    assert buffers.take() is first  # set aside, and free again
    second_view.release()


async def test_stalled_reader_does_not_stall_other_streams(
    link: Linked, upstream: Upstream
) -> None:
    prefix = link.route("web")
    slow_reader, slow_writer = await asyncio.open_connection(
        "127.0.0.1", link.router.port, limit=64 * 1024
    )
    slow_writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
    )
    link.send(slow_writer, f"{prefix}/bytes/{500 * MiB}")
    await asyncio.wait_for(slow_reader.readuntil(b"\r\n\r\n"), 10)  # then never reads again
    await asyncio.sleep(0.3)
    sent_when_stalled = upstream.bytes_sent

    reader, writer = await link.client()
    size = 100 * MiB
    link.send(writer, f"{prefix}/bytes/{size}")
    assert await drain_body(reader, timeout=30) == size
    writer.close()

    # The stalled stream holds its window and no more at the agent, and the instance
    # could not push more than a little into it in the meantime.
    slow_id = min(link.near.streams)
    agent_stream = link.agent.streams[slow_id]
    assert agent_stream.read_paused and agent_stream.credit <= 0
    assert agent_stream.backlog_bytes <= BACKLOG_BOUND
    assert link.near.streams[slow_id].write_paused  # the router holds back credit
    assert upstream.bytes_sent - sent_when_stalled <= size + 16 * MiB
    slow_writer.close()
    await wait_for(lambda: not link.near.streams and not link.agent.streams)


async def test_unknown_instance_refused(
    link: Linked, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = link.route("elsewhere")  # the agent has no such instance
    reader, writer = await link.client()
    with caplog.at_level(logging.WARNING, logger="labgate.agent.tunnel"):
        await link.request(reader, writer, f"{prefix}/", status=502)
    assert link.agent.streams_refused == 1
    assert link.near.streams_refused == 1
    assert not link.near.streams and not link.agent.streams
    assert "no instance elsewhere on this site" in caplog.text
    assert upstream.connections == 0
    writer.close()


async def test_unreachable_endpoint_refused(link: Linked) -> None:
    link.endpoints["down"] = "http://127.0.0.1:1"
    prefix = link.route("down")
    reader, writer = await link.client()
    await link.request(reader, writer, f"{prefix}/", status=502)
    assert link.near.streams_refused == 1
    writer.close()


async def test_an_instance_on_a_unix_socket_is_reached_through_the_tunnel(
    make_link: LinkFactory, tmp_path: Path
) -> None:
    upstream = await Upstream().start(str(tmp_path / "tool.sock"))
    try:
        link = await make_link()
        link.endpoints["sock"] = upstream.url
        prefix = link.route("sock")
        reader, writer = await link.client()
        assert await link.request(reader, writer, f"{prefix}/a") == f"hello {prefix}/a".encode()
        got = await link.request(reader, writer, f"{prefix}/pattern/{3 * MiB}")
        assert got == pattern(3 * MiB)
        assert upstream.connections == 1
        writer.close()
    finally:
        await upstream.stop()


async def test_a_link_in_place_of_an_instances_socket_is_not_followed(
    make_link: LinkFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The instance's uid owns its socket's directory: a link planted there (to a socket
    only root may use, say) leads the agent nowhere."""
    elsewhere = await Upstream().start(str(tmp_path / "engine.sock"))
    try:
        (tmp_path / "tool.sock").symlink_to(tmp_path / "engine.sock")
        link = await make_link()
        link.endpoints["planted"] = f"unix:{tmp_path / 'tool.sock'}"
        prefix = link.route("planted")
        reader, writer = await link.client()
        with caplog.at_level(logging.WARNING, logger="labgate.agent.tunnel"):
            await link.request(reader, writer, f"{prefix}/", status=502)
        assert "cannot connect" in caplog.text
        assert link.agent.streams_refused == 1
        assert elsewhere.connections == 0
        writer.close()
    finally:
        await elsewhere.stop()


async def test_connection_loss_closes_every_stream(link: Linked, upstream: Upstream) -> None:
    prefix = link.route("web")
    idle_reader, idle_writer = await link.client()
    assert await link.request(idle_reader, idle_writer, f"{prefix}/one")
    busy_reader, busy_writer = await link.client()
    link.send(busy_writer, f"{prefix}/bytes/{1000 * MiB}")
    await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 10)
    await wait_for(lambda: len(upstream.open) >= 1)
    near = link.near

    link.cut()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(busy_reader.read(MiB), 10):
            pass  # the download is cut short
    await wait_for(lambda: not upstream.open)  # the agent closed its instance connections
    assert not near.streams and not link.agent.streams
    assert not near.connected and not link.agent.connected
    assert "s" not in link.router.ctx.site_tunnels.sites

    # While the site has no data connection here the router answers 503 at once, saying so.
    body = await link.request(idle_reader, idle_writer, f"{prefix}/again", status=503)
    assert b"its site is not connected" in body
    for writer in (idle_writer, busy_writer):
        writer.close()


async def test_a_closed_door_closes_the_data_connection(link: Linked, upstream: Upstream) -> None:
    """The portal withdraws the site's epoch (token revoked, agent gone): cut at once."""
    prefix = link.route("web")
    reader, writer = await link.client()
    assert await link.request(reader, writer, f"{prefix}/x")
    link.table.set_tunnel_site("s", "e2")  # a new control connection: the old tunnel goes
    await asyncio.wait_for(asyncio.shield(link.agent.closed), 5)
    assert "s" not in link.router.ctx.site_tunnels.sites
    await link.request(reader, writer, f"{prefix}/y", status=503)
    # ... and the old epoch's tickets open nothing any more, even unexpired.
    with pytest.raises(TunnelRefused, match="not the current one"):
        await dial(link.url, ticket(epoch="e1"), link.endpoints.get)
    again = await dial(link.url, ticket(epoch="e2"), link.endpoints.get)
    link.table.remove_tunnel_site("s")
    await asyncio.wait_for(asyncio.shield(again.closed), 5)
    writer.close()


async def test_tickets_are_checked(link: Linked) -> None:
    url = link.url
    for bad in (
        "",
        "lgt_s.e1.9999999999.00",  # forged
        ticket(ttl=-5),  # expired
        TunnelTickets("another-key").issue("s", "e1", 60),  # another portal's key
        ticket(site="t"),  # a site without an open door
    ):
        with pytest.raises(TunnelRefused, match="403"):
            await dial(url, bad, link.endpoints.get)
    assert link.router.ctx.site_tunnels.refused == 5
    # A plain request to the path is no tunnel either.
    reader, writer = await link.client()
    await link.request(reader, writer, "/api/v1/agent/tunnel", status=403)
    writer.close()


async def test_a_site_reaches_only_its_own_instances(link: Linked, upstream: Upstream) -> None:
    """Site s's agent never sees a stream for another site's instance, even one it names."""
    link.endpoints["theirs"] = upstream.url  # a lying agent that would connect anything
    prefix = link.route("theirs", site="other")
    reader, writer = await link.client()
    await link.request(reader, writer, f"{prefix}/", status=503)  # other's tunnel is not up
    assert link.agent.streams_opened == 0 and upstream.connections == 0
    writer.close()


async def test_a_peer_sending_beyond_its_credit_loses_the_stream(link: Linked) -> None:
    """A lying agent floods a stream whose client reads nothing: it runs out of credit."""
    raw_reader, raw_writer = await raw_agent(link)
    prefix = link.route("web")
    _reader, writer = await asyncio.open_connection("127.0.0.1", link.router.port, limit=1024)
    link.send(writer, f"{prefix}/")
    frame = await asyncio.wait_for(raw_reader.readexactly(HEADER.size), 5)
    kind, stream_id, length = HEADER.unpack(frame)
    assert kind == OPEN
    await raw_reader.readexactly(length)
    near = link.near
    chunk = b"x" * MAX_DATA
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n"
    raw_writer.write(HEADER.pack(DATA, stream_id, len(answer)) + answer)
    for _ in range(16 * MiB // MAX_DATA):  # 16 MiB, far more than the client's buffers and a window
        raw_writer.write(HEADER.pack(DATA, stream_id, len(chunk)) + chunk)
        await raw_writer.drain()
        if near.protocol_errors:
            break
    await wait_for(lambda: near.protocol_errors == 1)
    assert stream_id not in near.streams
    raw_writer.close()
    writer.close()


async def answer_of(router: Router) -> bytes:
    """The status line's start of alice's ``GET /i/web/`` through ``router``."""
    cookie = f"{SESSION_COOKIE}={SessionSigner(KEY, 3600).issue(1)[0]}"
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    writer.write(f"GET /i/web/ HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    return head[:13]


async def test_one_data_connection_per_router_process(upstream: Upstream) -> None:
    """Two router processes share a port: the agent dials until it has one to each."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    table = RouteTable()
    table.load(users=[UserInfo(1, "alice")], routes=[Route("web", "tunnel:s/web", 1)])
    table.set_tunnel_site("s", "e1")
    routers = [await start_router(table, worker_index=i, worker_count=2) for i in range(2)]
    for router in routers:
        await router.listen("127.0.0.1", port, reuse_port=True)
    url = f"http://127.0.0.1:{port}"
    dialer = TunnelDialer(url, {"web": upstream.url}.get)
    try:
        dialer.update(ticket())
        await wait_for(lambda: len(dialer.tunnels) == 2)
        assert set(dialer.tunnels) == {(url, "0/2"), (url, "1/2")}
        for router in routers:
            # Every router process reaches the instance through its own data connection.
            assert await answer_of(router) == b"HTTP/1.1 200 "
        # A lost data connection is dialled again.
        next(iter(dialer.tunnels.values())).close()
        await asyncio.sleep(0.05)
        await wait_for(
            lambda: len(dialer.tunnels) == 2 and all(t.connected for t in dialer.tunnels.values())
        )
    finally:
        await dialer.stop()
        for router in routers:
            await router.close()


async def test_a_data_connection_to_every_listed_router(upstream: Upstream) -> None:
    """Two routers (two tables, as two portals' routers): the agent holds one to each.

    A router the portal no longer lists loses its data connection; listed
    again, it is dialled again.
    """
    routers = []
    for _ in range(2):
        table = RouteTable()
        table.load(users=[UserInfo(1, "alice")], routes=[Route("web", "tunnel:s/web", 1)])
        table.set_tunnel_site("s", "e1")
        router = await start_router(table)
        await router.listen("127.0.0.1", 0)
        routers.append(router)
    urls = [f"http://127.0.0.1:{router.port}" for router in routers]
    dialer = TunnelDialer("http://127.0.0.1:1", {"web": upstream.url}.get)
    try:
        dialer.update(ticket(), urls)
        await wait_for(lambda: len(dialer.tunnels) == 2)
        assert set(dialer.tunnels) == {(url, "0/1") for url in urls}
        for router in routers:
            assert await answer_of(router) == b"HTTP/1.1 200 "
        dialer.update(ticket(), urls[:1])
        await wait_for(lambda: "s" not in routers[1].ctx.site_tunnels.sites)
        assert set(dialer.tunnels) == {(urls[0], "0/1")}
        assert "s" in routers[0].ctx.site_tunnels.sites
        dialer.update(ticket(), urls)
        await wait_for(lambda: "s" in routers[1].ctx.site_tunnels.sites)
    finally:
        await dialer.stop()
        for router in routers:
            await router.close()


async def test_frames_split_anywhere_are_read_whole() -> None:
    """A data connection is a byte stream: frames arrive cut at any point, whole or several."""
    import random

    from labgate.wire.tunnel import TunnelEnd, TunnelStream

    class Recorder(TunnelEnd):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int, bytes]] = []

        def control(
            self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes
        ) -> None:
            self.seen.append((kind, stream_id, body))

    class Collector:
        """Stands in for a stream: what DATA it was handed."""

        def __init__(self) -> None:
            self.data = bytearray()

        def on_data(self, payload: memoryview) -> None:
            self.data += payload

    rng = random.Random(13)
    frames = [(OPEN, n, os.urandom(rng.choice([0, 1, 9, 100, 5000]))) for n in range(1, 60)]
    payloads = [os.urandom(rng.choice([1, 100, MAX_DATA // 2, MAX_DATA])) for _ in range(40)]
    wire = b"".join(
        HEADER.pack(k, n, len(b)) + b + HEADER.pack(DATA, 99, len(p)) + p
        for (k, n, b), p in zip(frames, payloads * 2, strict=False)
    )
    expected = b"".join(payloads * 2)[: sum(len(p) for p in (payloads * 2)[: len(frames)])]
    for cut in (1, 7, 4096, 100_000, 300_000):
        end = Recorder()
        end.attach(lambda data: None)
        collector = Collector()
        end.streams[99] = collector  # type: ignore[assignment]
        offset = 0
        while offset < len(wire):
            step = rng.randint(1, cut)
            end.feed(wire[offset : offset + step])
            offset += step
        assert end.seen == frames
        assert collector.data == expected and end.bytes_received == len(expected)
    liar = Recorder()
    liar.attach(lambda data: None)
    liar.feed(HEADER.pack(OPEN, 1, 1 << 30)[:5])
    liar.feed(HEADER.pack(OPEN, 1, 1 << 30)[5:])  # a frame longer than any allowed
    assert liar.protocol_errors == 1 and not liar.connected
