"""Random and mutated raw requests: the router never crashes, leaks or misroutes.

The router and its upstreams run in a background thread (their own uvloop);
hypothesis drives plain blocking sockets. Every request carries alice's
credentials or none, so bob's instance must never see a byte, and whatever
reaches alice's instance must be under her prefix.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labgate.router.context import RouterOptions
from labgate.router.proxy import ClientConnection
from labgate.router.server import Router
from labgate.security import SESSION_COOKIE, SessionSigner
from labgate.wire.routes import Route, RouteTable

from .conftest import ALICE, ALICE_TOKEN, BOB, KEY, RecordingUpstream, ok_handler, tokens, users


@dataclass
class Rig:
    """The router under fuzzing, run in a thread."""

    port: int
    router: Router
    a: RecordingUpstream
    b: RecordingUpstream
    portal: RecordingUpstream
    cookie: str
    loop: asyncio.AbstractEventLoop

    def client_connections(self) -> int:
        async def count() -> int:
            return sum(isinstance(c, ClientConnection) for c in self.router.ctx.connections)

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Rig] = {}
    stop = asyncio.Event()

    async def main() -> None:
        a = await RecordingUpstream(ok_handler("a")).start()
        b = await RecordingUpstream(ok_handler("b")).start()
        portal = await RecordingUpstream(ok_handler("portal")).start()
        table = RouteTable()
        table.load(users=users(), tokens=tokens())
        table.add_route(Route("aaaa", a.url, ALICE, upstream_token="tok-a"))
        table.add_route(Route("bbbb", b.url, BOB, upstream_token="tok-b"))
        signer = SessionSigner(KEY, 3600)
        router = Router(table, signer, portal.url, RouterOptions(header_timeout=2.0))
        await router.listen("127.0.0.1", 0)
        holder["rig"] = Rig(router.port, router, a, b, portal, signer.issue(ALICE)[0], loop)
        ready.set()
        await stop.wait()
        await router.close()
        for upstream in (a, b, portal):
            await upstream.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield holder["rig"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read everything the router answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        chunks: list[bytes] = []
        try:
            while piece := sock.recv(65536):
                chunks.append(piece)
        except OSError:
            pass
        return b"".join(chunks)


TARGETS = [
    "/i/aaaa/",
    "/i/aaaa/x?y=1",
    "/i/bbbb/",
    "/i/aaaa/../bbbb/",
    "/i/aaaa/%2e%2e/bbbb/",
    "/i/aaaa%2fbbbb/",
    "//i/bbbb/",
    "/i//bbbb/",
    "/",
    "/login",
    "*",
    "/i/bbbb",
]
HEADER_LINES = [
    "Host: gw",
    "Host: other",
    "Content-Length: 0",
    "Content-Length: 5",
    "Content-Length: -1",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: identity",
    "Connection: close",
    "Connection: keep-alive, Upgrade",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "X-Forwarded-For: 1.2.3.4",
    "X-Labgate-User: bob",
    "Accept: text/html",
    f"Authorization: token {ALICE_TOKEN}",
    "Authorization: Bearer lg_forged",
    "Cookie: a=b",
]
METHODS = ["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE", "CONNECT", "G\x00T", ""]


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """One or more request-like messages, possibly mutated."""
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(METHODS))
        target = draw(st.sampled_from(TARGETS) | st.text(min_size=0, max_size=20))
        version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 "]))
        lines = draw(st.lists(st.sampled_from(HEADER_LINES), max_size=6))
        if draw(st.booleans()):
            lines.append("__COOKIE__")
        sep = draw(st.sampled_from(["\r\n", "\r\n", "\n", "\r"]))
        body = draw(st.sampled_from(["", "hello", "0\r\n\r\n", "5\r\nhello\r\n0\r\n\r\n"]))
        head = sep.join([f"{method} {target} {version}", *lines]) + sep + sep
        messages.append(head + body)
    data = "".join(messages).encode("utf-8", "replace")
    if draw(st.booleans()):
        # Mutate: flip, drop or insert bytes somewhere.
        position = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        if kind == "flip" and data:
            data = data[:position] + bytes([data[position] ^ 0x20]) + data[position + 1 :]
        elif kind == "drop":
            data = data[:position] + data[position + 1 :]
        elif kind == "insert":
            extra = draw(st.binary(min_size=1, max_size=8))
            data = data[:position] + extra + data[position:]
        else:
            data = data[:position]
    return data


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=raw_requests() | st.binary(max_size=300))
def test_random_requests(rig: Rig, data: bytes) -> None:
    data = data.replace(b"__COOKIE__", f"Cookie: {SESSION_COOKIE}={rig.cookie}".encode())
    answer = exchange(rig.port, data)
    assert b"Traceback" not in answer
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    assert rig.b.seen == [], (data, rig.b.seen)
    for seen in rig.a.seen:
        assert seen.target.startswith("/i/aaaa/"), seen.target
    for seen in rig.portal.seen:
        assert not seen.target.startswith("/i/"), seen.target


def test_router_survives_and_leaks_nothing(rig: Rig) -> None:
    """Run after the fuzzing: every client connection is gone, and a request still works."""
    deadline = time.monotonic() + 10
    while rig.client_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.client_connections() == 0
    answer = exchange(
        rig.port,
        f"GET /i/aaaa/ok HTTP/1.1\r\nHost: gw\r\nCookie: {SESSION_COOKIE}={rig.cookie}\r\n\r\n".encode(),  # noqa: E501
    )
    assert answer.startswith(b"HTTP/1.1 200")
