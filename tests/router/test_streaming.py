"""Bodies: chunked and close-delimited framing, back-pressure both ways, pipelining, pooling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from labgate.wire.routes import Route

from .conftest import (
    ALICE,
    Gateway,
    Recorded,
    Seen,
    cookie_line,
    keep_alive_upstream,
    raw_request,
    status_of,
    statuses,
)


def get(gw_cookie: str, target: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: gw\r\n{gw_cookie}{extra}\r\n".encode()


async def test_chunked_response_stays_chunked(recorded: Recorded, recording) -> None:  # type: ignore[no-untyped-def]
    gw = recorded.gw

    def handler(seen: Seen) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    up = await recording(handler)
    gw.table.add_route(Route("chnk", up.url, ALICE))
    response = await raw_request(
        gw.port, get(cookie_line(gw, ALICE), "/i/chnk/", "Connection: close\r\n")
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


async def test_close_delimited_response(recorded: Recorded, recording) -> None:  # type: ignore[no-untyped-def]
    gw = recorded.gw
    up = await recording(
        lambda seen: b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after_response=True
    )
    gw.table.add_route(Route("eof", up.url, ALICE))
    cookie = cookie_line(gw, ALICE)
    # HTTP/1.1 clients get it chunked and keep their connection.
    response = await raw_request(
        gw.port, get(cookie, "/i/eof/") + get(cookie, "/i/eof/", "Connection: close\r\n")
    )
    assert statuses(response) == [200, 200]
    assert response.count(b"d\r\nuntil the end\r\n0\r\n\r\n") == 2
    # HTTP/1.0 clients read to the end of the connection.
    response = await raw_request(gw.port, get(cookie, "/i/eof/", version="1.0"))
    assert response.endswith(b"\r\n\r\nuntil the end")
    assert b"connection: close" in response.lower()


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(recorded: Recorded, recording, status: int) -> None:  # type: ignore[no-untyped-def]
    gw = recorded.gw
    up = await recording(lambda seen: b'HTTP/1.1 %d X\r\nETag: "1"\r\n\r\n' % status)
    gw.table.add_route(Route("nb", up.url, ALICE))
    cookie = cookie_line(gw, ALICE)
    response = await raw_request(
        gw.port, get(cookie, "/i/nb/") + get(cookie, "/i/nb/", "Connection: close\r\n")
    )
    assert statuses(response) == [status, status]
    assert b"transfer-encoding" not in response.lower()


async def test_pipelined_requests_are_answered_in_order(recorded: Recorded) -> None:
    gw = recorded.gw
    cookie = cookie_line(gw, ALICE)
    data = b"".join(get(cookie, f"/i/aaaa/{n}") for n in range(20))
    data += get(cookie, "/i/aaaa/last", "Connection: close\r\n")
    response = await raw_request(gw.port, data)
    assert statuses(response) == [200] * 21
    assert [s.target for s in recorded.a.seen] == [f"/i/aaaa/{n}" for n in range(20)] + [
        "/i/aaaa/last"
    ]
    # Served one after another on one pooled upstream connection.
    assert recorded.a.connections == 1


async def test_request_bodies_both_framings(recorded: Recorded) -> None:
    gw = recorded.gw
    cookie = cookie_line(gw, ALICE)
    data = (
        f"POST /i/aaaa/cl HTTP/1.1\r\nHost: gw\r\n{cookie}Content-Length: 11\r\n\r\nhello world"
        f"POST /i/aaaa/te HTTP/1.1\r\nHost: gw\r\n{cookie}Transfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        f"GET /i/aaaa/end HTTP/1.1\r\nHost: gw\r\n{cookie}Connection: close\r\n\r\n"
    ).encode()
    response = await raw_request(gw.port, data)
    assert statuses(response) == [200, 200, 200]
    assert [s.body for s in recorded.a.seen] == [b"hello world", b"hello world", b""]
    assert recorded.a.seen[1].header("Transfer-Encoding") == ["chunked"]


async def test_expect_continue(gateway) -> None:  # type: ignore[no-untyped-def]
    cookie = cookie_line(gateway, ALICE)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    body = b"x" * 1000
    writer.write(
        f"PUT /i/aaaa/api/file?path=/dev/null HTTP/1.1\r\nHost: gw\r\n{cookie}"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()


@dataclass
class Firehose:
    """An upstream that writes ``total`` bytes as fast as the socket takes them."""

    total: int
    written: int = 0
    server: asyncio.Server | None = None
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.total)
        piece = b"z" * 65536
        with contextlib.suppress(ConnectionError):
            while self.written < self.total:
                writer.write(piece)
                await writer.drain()
                self.written += len(piece)
        writer.close()


@pytest.fixture
async def firehose() -> AsyncIterator[Firehose]:
    hose = Firehose(512 * 1024 * 1024)
    hose.server = await asyncio.start_server(hose.handle, "127.0.0.1", 0)
    hose.url = f"http://127.0.0.1:{hose.server.sockets[0].getsockname()[1]}"
    yield hose
    hose.server.close()


async def test_download_back_pressure(recorded: Recorded, firehose: Firehose) -> None:
    gw = recorded.gw
    gw.table.add_route(Route("hose", firehose.url, ALICE))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=2**16)
    writer.write(get(cookie_line(gw, ALICE), "/i/hose/"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 200
    # The client reads nothing more: the upstream must be held back, not buffered.
    for _ in range(20):
        before = firehose.written
        await asyncio.sleep(0.1)
        if firehose.written == before:
            break
    assert firehose.written < 64 * 1024 * 1024
    # Reading resumes the flow.
    got = 0
    while got < 80 * 1024 * 1024:
        got += len(await reader.read(1 << 20))
    assert firehose.written > 64 * 1024 * 1024
    writer.close()


async def test_upload_back_pressure(recorded: Recorded) -> None:
    gw = recorded.gw
    paused = asyncio.Event()
    received = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        await paused.wait()  # read nothing for a while
        while data := await reader.read(1 << 20):
            received += len(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw.table.add_route(Route("sink", f"http://127.0.0.1:{port}", ALICE))
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    total = 1024 * 1024 * 1024
    writer.write(
        f"POST /i/sink/ HTTP/1.1\r\nHost: gw\r\n{cookie_line(gw, ALICE)}"
        f"Content-Length: {total}\r\n\r\n".encode()
    )
    sent = 0
    piece = b"u" * (1 << 20)
    while sent < total:
        writer.write(piece)
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except TimeoutError:
            break  # the router stopped reading: back-pressure reached the client
        sent += len(piece)
    assert sent < 128 * 1024 * 1024
    paused.set()
    writer.close()
    server.close()


async def piecewise_upstream(pieces: list[bytes]) -> tuple[asyncio.Server, str]:
    """An upstream that answers each request with ``pieces``, written one by one.

    Each piece is its own write after a short pause, so the router reads the
    response in as many pieces as the network keeps apart.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.002)
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def through_piecewise(gw: Gateway, pieces: list[bytes]) -> bytes:
    """What a client gets through the router from a :func:`piecewise_upstream`."""
    server, url = await piecewise_upstream(pieces)
    try:
        gw.table.add_route(Route("pcws", url, ALICE))
        return await raw_request(
            gw.port, get(cookie_line(gw, ALICE), "/i/pcws/", "Connection: close\r\n")
        )
    finally:
        server.close()


_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
_FINAL = (
    b"HTTP/1.1 203 Fine Thanks\r\n"
    b"Server: piecewise\r\n"
    b"Connection: keep-alive, X-Hop\r\n"
    b"X-Hop: hop-by-hop, dropped\r\n"
    b"Set-Cookie: labgate-session=stolen; Path=/\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Set-Cookie: app=1; Path=/\r\n"
    b"X-Kept:its value as sent \r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)


@pytest.mark.parametrize(
    "pieces",
    [
        [_HINTS + _FINAL],
        [_HINTS[:20], _HINTS[20:] + _FINAL[:60], _FINAL[60:120], _FINAL[120:]],
        [bytes([byte]) for byte in _HINTS + _FINAL],
    ],
    ids=["one-read", "split-heads", "byte-by-byte"],
)
async def test_a_response_head_is_passed_on_whole_however_it_arrives(
    recorded: Recorded, pieces: list[bytes]
) -> None:
    """Split anywhere, byte by byte too, a response head is passed on the same."""
    response = await through_piecewise(recorded.gw, pieces)
    hints, _, final = response.partition(b"\r\n\r\n")
    assert hints == b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"
    head, _, body = final.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 203 Fine Thanks"
    assert b"Server: piecewise" in lines
    assert b"Set-Cookie: app=1; Path=/" in lines
    assert b"X-Kept: its value as sent " in lines
    assert b"Content-Length: 5" in lines
    # Hop-by-hop headers (and those Connection names) and labgate's cookie stay behind.
    lowered = head.lower()
    for gone in (b"x-hop", b"keep-alive", b"labgate-session", b"connection: keep-alive"):
        assert gone not in lowered, gone
    assert b"connection: close" in lowered
    assert body == b"hello"


@pytest.mark.parametrize("shape", ["one-write", "in-pieces", "one-endless-value"])
async def test_a_response_head_too_large_is_a_502(recorded: Recorded, shape: str) -> None:
    """A response head over 64 KiB (MAX_HEAD) is not passed on, however it arrives.

    A header value that never ends is cut there too, not kept growing.
    """
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    response = b"HTTP/1.1 200 OK\r\n" + line * 70 + b"Content-Length: 2\r\n\r\nok"
    if shape == "one-endless-value":
        response = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"f" * (1 << 20)
    pieces = [response]
    if shape != "one-write":
        pieces = [response[i : i + 8192] for i in range(0, len(response), 8192)]
    answer = await through_piecewise(recorded.gw, pieces)
    assert status_of(answer) == 502
    assert b"X-Filler" not in answer


async def twice_through(gw: Gateway, answer: list[bytes]) -> tuple[bytes, list[int]]:
    """Two requests on one client connection to a :func:`keep_alive_upstream` answering
    ``answer``: what the client got, and the requests each upstream connection carried."""
    server, url, per_connection = await keep_alive_upstream(answer)
    try:
        gw.table.add_route(Route("twice", url, ALICE))
        cookie = cookie_line(gw, ALICE)
        response = await raw_request(
            gw.port, get(cookie, "/i/twice/") + get(cookie, "/i/twice/", "Connection: close\r\n")
        )
    finally:
        server.close()
    return response, per_connection


async def test_a_content_length_body_in_many_reads_arrives_whole_and_the_connection_is_reused(
    recorded: Recorded,
) -> None:
    """A body read in many pieces arrives whole; the connection then serves the next request."""
    gw = recorded.gw
    body = bytes(range(256)) * 1024  # 256 KiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    pieces = [head + body[:1000]] + [body[i : i + 50_000] for i in range(1000, len(body), 50_000)]
    response, per_connection = await twice_through(gw, pieces)
    first, second = response.split(b"HTTP/1.1 200 OK\r\n")[1:]
    for answer in (first, second):
        assert answer.partition(b"\r\n\r\n")[2] == body
    # Both requests went over the one upstream connection: it was reused after the body.
    assert per_connection == [2]


async def test_a_body_passed_on_without_parsing_is_counted_as_traffic(
    recorded: Recorded,
) -> None:
    """A ``Content-Length`` body's later reads skip the parser; the instance's
    traffic (idle culling, usage) still counts every byte the client got."""
    gw = recorded.gw
    body = b"c" * 300_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    pieces = [head + body[:5]] + [body[i : i + 70_000] for i in range(5, len(body), 70_000)]
    response, per_connection = await twice_through(gw, pieces)
    assert [
        answer.partition(b"\r\n\r\n")[2] for answer in response.split(b"HTTP/1.1 200 OK\r\n")[1:]
    ] == [body, body]
    activity = gw.router.activity("twice")
    assert activity is not None
    assert activity.bytes_out == len(response)
    assert per_connection == [2]


@pytest.mark.parametrize("arrives", ["after-the-body-in-its-last-read", "with-the-whole-response"])
async def test_bytes_after_a_content_length_body_are_dropped_and_the_connection_is_not_reused(
    recorded: Recorded, arrives: str
) -> None:
    """Whatever an upstream sends past the response it was asked for never reaches the client.

    Not even the head of a second response: passed on, it would answer the
    client's next request on that connection, whatever it was for.
    """
    gw = recorded.gw
    body = b"b" * 100_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Forged: 1\r\n\r\nforged!"
    pieces = [head + body[:10], body[10:60_000], body[60_000:] + smuggled]
    if arrives == "with-the-whole-response":
        pieces = [head + body + smuggled]
    response, per_connection = await twice_through(gw, pieces)
    assert b"forged" not in response.lower()
    assert statuses(response) == [200, 200]
    first, second = response.split(b"HTTP/1.1 200 OK\r\n")[1:]
    for answer in (first, second):
        assert answer.partition(b"\r\n\r\n")[2] == body
    # The connection that sent too much was closed; the second request got a new one.
    assert per_connection == [1, 1]


async def test_an_upstream_that_closes_inside_a_content_length_body_is_not_a_complete_response(
    recorded: Recorded,
) -> None:
    """A body cut short ends the client's connection: it never looks complete."""
    gw = recorded.gw

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"x" * 100_000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw.table.add_route(Route("short", f"http://127.0.0.1:{port}", ALICE))
        started = asyncio.get_running_loop().time()
        response = await raw_request(gw.port, get(cookie_line(gw, ALICE), "/i/short/"))
        took = asyncio.get_running_loop().time() - started
    finally:
        server.close()
    assert status_of(response) == 200
    # The client got what came, and then its connection closed (not a quiet wait).
    assert len(response.partition(b"\r\n\r\n")[2]) == 100_010
    assert took < 4
