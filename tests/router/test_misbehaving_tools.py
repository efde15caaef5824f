"""What a tool cannot do to a client's connection through the router, however it answers.

A browser's kept-alive connection to the router also carries its requests to
the portal and to other instances: a tool that could put bytes of its own
choosing on it, outside the response it was asked for, could answer those
requests (with cookies for the portal's origin) or read them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from labgate.security import HANDOFF_COOKIE, INSTANCE_COOKIE, SESSION_COOKIE
from labgate.wire.routes import Route

from .conftest import ALICE, Gateway, Recorded, cookie_line, raw_request, status_of, statuses


def get(cookie: str, target: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{cookie}{extra}\r\n".encode()


class Tool:
    """A tool that answers the n-th request of each connection with ``answers[n]``.

    Each answer is a list of pieces, each its own write after a short pause.
    What reaches the tool after it answered is kept in :attr:`got`; the
    requests each connection carried are counted in :attr:`per_connection`.
    """

    def __init__(self, *answers: list[bytes]) -> None:
        self.answers = answers
        self.got: list[bytes] = []
        self.per_connection: list[int] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.per_connection.append(0)
        index = len(self.per_connection) - 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.per_connection[index] >= len(self.answers):
                    self.got.append(head)
                    continue
                answer = self.answers[self.per_connection[index]]
                self.per_connection[index] += 1
                for piece in answer:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        writer.close()


StartTool = Callable[..., Awaitable[Tool]]


@pytest.fixture
async def tool_at(recorded: Recorded) -> AsyncIterator[StartTool]:
    """Route ``/i/tool/`` (alice's) to a :class:`Tool`; stop them afterwards."""
    started: list[Tool] = []

    async def start(*answers: list[bytes]) -> Tool:
        tool = Tool(*answers)
        tool.server = await asyncio.start_server(tool.handle, "127.0.0.1", 0)
        recorded.gw.table.add_route(Route("tool", tool.url, ALICE))
        started.append(tool)
        return tool

    yield start
    for tool in started:
        assert tool.server is not None
        tool.server.close()


async def two_requests(gw: Gateway, second: str) -> bytes:
    """GET /i/tool/, then (after its answer) ``second`` on the same connection."""
    cookie = cookie_line(gw, ALICE)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(get(cookie, "/i/tool/"))
    await asyncio.sleep(0.3)
    writer.write(get(cookie, second, "Connection: close\r\n"))
    chunks: list[bytes] = []
    with contextlib.suppress(TimeoutError, ConnectionError):
        while piece := await asyncio.wait_for(reader.read(65536), 3):
            chunks.append(piece)
    writer.close()
    return b"".join(chunks)


FORGED = (
    b"HTTP/1.1 200 OK\r\nSet-Cookie: labgate-session=forged; Path=/\r\n"
    b"Content-Length: 6\r\n\r\nforged"
)


async def test_a_101_after_a_complete_response_does_not_make_a_tunnel(
    recorded: Recorded, tool_at: StartTool
) -> None:
    """Extra bytes that switch protocols are dropped: the next request is not the tool's."""
    tool = await tool_at(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
            + FORGED
        ]
    )
    response = await two_requests(recorded.gw, "/portal/page")
    assert b"forged" not in response
    assert statuses(response) == [200, 200]  # the tool's 200, then the portal's
    assert not any(b"/portal/page" in seen for seen in tool.got)
    assert tool.per_connection == [1]


@pytest.mark.parametrize("status", [100, 103, 199])
async def test_an_interim_response_with_a_body_is_a_502(
    recorded: Recorded, tool_at: StartTool, status: int
) -> None:
    """llhttp reads a body after some 1xx heads; passed on, it would be a response of its own."""
    await tool_at(
        [
            b"HTTP/1.1 %d Wait\r\nContent-Length: %d\r\n\r\n%s" % (status, len(FORGED), FORGED)
            + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        ]
    )
    response = await two_requests(recorded.gw, "/portal/page")
    assert b"forged" not in response
    assert status_of(response) == 502


@pytest.mark.parametrize("cookie", [SESSION_COOKIE, INSTANCE_COOKIE, HANDOFF_COOKIE])
@pytest.mark.parametrize("spelled", ["{} =x", "{}\t=x; Path=/", " {}=x", "{}", "{} ; Path=/"])
async def test_a_tool_cannot_set_labgates_cookies_however_it_spaces_the_name(
    recorded: Recorded, tool_at: StartTool, cookie: str, spelled: str
) -> None:
    """Browsers drop the whitespace around a cookie's name: so does the router's check."""
    value = spelled.format(cookie).encode()
    await tool_at(
        [
            b"HTTP/1.1 200 OK\r\nSet-Cookie: %s\r\nSet-Cookie: app=1\r\nContent-Length: 0\r\n\r\n"
            % value
        ]
    )
    cookie_header = cookie_line(recorded.gw, ALICE)
    response = await raw_request(
        recorded.gw.port, get(cookie_header, "/i/tool/", "Connection: close\r\n")
    )
    assert status_of(response) == 200
    assert b"Set-Cookie: app=1" in response
    assert cookie.encode() not in response


async def test_a_trailer_section_without_end_is_cut(recorded: Recorded) -> None:
    """Trailers are held to the head's limit: a value that never ends ends the response."""
    gw = recorded.gw
    total = 8 * 1024 * 1024
    written = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        with contextlib.suppress(ConnectionError):
            while written < total:
                writer.write(b"t" * 65536)
                await writer.drain()
                written += 65536
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        gw.table.add_route(
            Route("trl", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", ALICE)
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(get(cookie_line(gw, ALICE), "/i/trl/"))
        # The client gets what came before the trailers, then its connection ends: the
        # response cannot be completed, and the router does not keep reading.
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        server.close()
    assert status_of(got) == 200
    assert got.endswith(b"2\r\nok\r\n")
    assert written < total


async def test_body_bytes_after_a_head_response_keep_its_connection_out_of_the_pool(
    recorded: Recorded, tool_at: StartTool
) -> None:
    """A HEAD answered with a body: the body is dropped and the connection not reused."""
    tool = await tool_at(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", b"world"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
    )
    cookie = cookie_line(recorded.gw, ALICE)
    response = await raw_request(
        recorded.gw.port,
        get(cookie, "/i/tool/", method="HEAD") + get(cookie, "/i/tool/", "Connection: close\r\n"),
        read_timeout=2,
    )
    assert statuses(response) == [200, 200]
    # The GET had a connection of its own (its first request: the 10-byte answer).
    assert tool.per_connection == [1, 1]
    assert response.endswith(b"\r\n\r\nhelloworld")


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "chunked, chunked"])
async def test_a_transfer_coding_other_than_chunked_is_a_502(
    recorded: Recorded, tool_at: StartTool, coding: str
) -> None:
    """The client could not undo another coding, and llhttp would read such a body to the close."""
    await tool_at(
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n2\r\nok\r\n0\r\n\r\n" % coding.encode()]
    )
    cookie = cookie_line(recorded.gw, ALICE)
    response = await raw_request(
        recorded.gw.port, get(cookie, "/i/tool/", "Connection: close\r\n"), read_timeout=2
    )
    assert status_of(response) == 502
