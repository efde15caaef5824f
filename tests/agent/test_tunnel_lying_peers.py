"""The instance tunnel against peers that lie: each breaks the protocol one way and costs
the honest side no more than a stream, a log line or a refused stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import test_tunnel
from test_tunnel import Linked, Upstream, raw_agent, ticket, wait_for

from labgate.agent.tunnel import AgentTunnel, dial
from labgate.wire.tunnel import (
    CREDIT,
    DATA,
    HEADER,
    MAX_OPEN,
    OPEN,
    OPENED,
    REFUSED,
    WINDOW,
    WINDOW_UPDATE,
    SocketStream,
    TunnelEnd,
)

#: The fixtures of test_tunnel: a router and an agent's data connection; an instance.
link, make_link, upstream = test_tunnel.link, test_tunnel.make_link, test_tunnel.upstream

MiB = 1 << 20
Frame = tuple[int, int, bytes]


# --------------------------------------------------------------------------- a lying agent


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    kind, stream_id, length = HEADER.unpack(await asyncio.wait_for(reader.readexactly(9), 5))
    return kind, stream_id, await asyncio.wait_for(reader.readexactly(length), 5)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closed the connection (what it still sent is skipped)."""
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    return True


async def test_credit_beyond_the_window_resets_the_stream(link: Linked) -> None:
    """An agent that grants more credit than it was sent (and then reads nothing) loses
    the stream: the router never queues a client's upload beyond the window."""
    reader, writer = await raw_agent(link)
    near = link.near
    prefix = link.route("web")
    c_reader, c_writer = await link.client()
    size = 32 * MiB
    c_writer.write(
        f"POST {prefix}/up HTTP/1.1\r\nHost: x\r\nCookie: {link.cookie}\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )
    kind, stream_id, _ = await read_frame(reader)
    assert kind == OPEN
    writer.write(HEADER.pack(WINDOW_UPDATE, stream_id, 4) + CREDIT.pack(0xFFFFFFFF))
    await writer.drain()
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # reads no more
    await wait_for(lambda: near.protocol_errors == 1)
    assert stream_id not in near.streams
    chunk = b"u" * MiB
    with contextlib.suppress(ConnectionError):
        for _ in range(size // MiB):  # the client goes on uploading
            c_writer.write(chunk)
            await asyncio.wait_for(c_writer.drain(), 10)
    assert near.connected and near.transport is not None
    assert near.transport.get_write_buffer_size() <= 2 * WINDOW
    assert near.peak_queued <= 2 * WINDOW
    # The client's request failed: an error answer or a closed connection, not a 200.
    answer = b""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        answer = await asyncio.wait_for(c_reader.read(), 10)
    assert not answer.startswith(b"HTTP/1.1 200 ")
    c_writer.close()
    writer.close()


@pytest.mark.parametrize("kind", [0, 8, 255, OPEN])
async def test_an_agents_unknown_or_forbidden_frame_ends_the_connection(
    link: Linked, caplog: pytest.LogCaptureFixture, kind: int
) -> None:
    """A frame type the router does not take (unknown, or OPEN from an agent): the router
    ends the data connection after one warning, however many such frames follow."""
    reader, writer = await raw_agent(link)
    near = link.near
    body = b'{"instance_id": "web"}' if kind == OPEN else b""
    with caplog.at_level(logging.WARNING):
        writer.write((HEADER.pack(kind, 1, len(body)) + body) * 1000)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        assert await closed(reader)
        await wait_for(lambda: not near.connected)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert near.protocol_errors == 1 and len(warnings) < 5
    assert "s" not in link.router.ctx.site_tunnels.sites
    writer.close()


# --------------------------------------------------------------------------- a lying router
class FakeRouter:
    """A router that answers the agent's dial with 101, then writes what a test says."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.url = ""
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def start(self) -> FakeRouter:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: labgate-tunnel\r\n\r\n")
        await self.accepted.put((reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def lying_router(
    upstream: Upstream,
) -> AsyncIterator[tuple[AgentTunnel, asyncio.StreamReader, asyncio.StreamWriter]]:
    """An agent's data connection to a :class:`FakeRouter`; instance ``web`` is ``upstream``."""
    router = await FakeRouter().start()
    agent = await dial(router.url, ticket(), {"web": upstream.url}.get)
    reader, writer = await asyncio.wait_for(router.accepted.get(), 5)
    yield agent, reader, writer
    agent.close()
    writer.close()
    await router.stop()


def open_frame(stream_id: int, body: bytes) -> bytes:
    return HEADER.pack(OPEN, stream_id, len(body)) + body


async def test_an_oversized_or_deeply_nested_open_is_refused(
    lying_router: tuple[AgentTunnel, asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """An OPEN over MAX_OPEN bytes, or nested too deeply to parse, gets REFUSED (nothing
    escapes into the event loop) and the data connection still opens streams."""
    agent, reader, writer = lying_router
    writer.write(open_frame(1, b"[" * 200_000))  # over the limit: never parsed
    writer.write(open_frame(3, b"[" * MAX_OPEN))  # within it, but deeper than the recursion limit
    assert await read_frame(reader) == (REFUSED, 1, b"bad OPEN: 200000 bytes, more than 1024")
    kind, stream_id, reason = await read_frame(reader)
    assert (kind, stream_id) == (REFUSED, 3) and reason.startswith(b"bad OPEN: maximum recursion")
    writer.write(open_frame(5, b'{"instance_id": "web"}'))
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(HEADER.pack(DATA, 5, len(request)) + request)
    assert await read_frame(reader) == (OPENED, 5, b"")
    kind, stream_id, answer = await read_frame(reader)
    assert (kind, stream_id) == (DATA, 5) and answer.endswith(b"\r\n\r\nhello /ok")
    assert agent.connected and agent.streams_refused == 2


@pytest.mark.parametrize("kind", [0, 8, 255, OPENED, REFUSED])
async def test_a_routers_unknown_or_forbidden_frame_ends_the_connection(
    lying_router: tuple[AgentTunnel, asyncio.StreamReader, asyncio.StreamWriter],
    caplog: pytest.LogCaptureFixture,
    kind: int,
) -> None:
    """A frame type the agent does not take (unknown, or OPENED/REFUSED from a router):
    the agent ends the data connection after one warning."""
    agent, reader, writer = lying_router
    with caplog.at_level(logging.WARNING):
        writer.write(HEADER.pack(kind, 1, 0) * 1000)
        assert await closed(reader)
        await asyncio.wait_for(agent.closed, 5)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert agent.protocol_errors == 1 and len(warnings) < 5 and not agent.connected


# --------------------------------------------------------------------------- the agent's inbox
async def test_data_before_the_instance_connects_is_held_in_bounded_memory() -> None:
    """DATA for a stream still connecting is kept in one buffer, bounded by the window;
    empty DATA (which costs no credit) is ignored; what was held arrives in order."""
    written: list[bytes | memoryview] = []
    end = TunnelEnd()
    end.attach(written.extend)
    stream = SocketStream(end, 3, "web", opening=False)  # as AgentTunnel makes it on OPEN
    end.streams[3] = stream
    empty = HEADER.pack(DATA, 3, 0) * 200_000
    tiny = b"".join(HEADER.pack(DATA, 3, 1) + bytes([n % 251]) for n in range(100_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        end.feed(empty)
        end.feed(tiny)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    expected = bytes(n % 251 for n in range(100_000))
    assert grown < 512 * 1024  # a list of bytes objects: about 6 MB
    assert stream.inbox == expected and stream.allowance == WINDOW - len(expected)
    assert not end.protocol_errors and 3 in end.streams
    near, far = socket.socketpair()
    loop = asyncio.get_running_loop()
    await loop.create_connection(lambda: stream, sock=near)
    reader, writer = await asyncio.open_connection(sock=far)
    end.feed(HEADER.pack(DATA, 3, 4) + b"last")
    assert await asyncio.wait_for(reader.readexactly(len(expected) + 4), 5) == expected + b"last"
    assert not stream.inbox and stream.ungranted == len(expected) + 4
    stream.reset()
    writer.close()
