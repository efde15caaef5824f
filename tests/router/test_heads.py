"""The one-pass head scanners (``_heads.c``), and the two readings of a head agreeing.

``scan_request`` and ``scan_response`` accept a strict subset of HTTP/1.1
and answer None for anything else, which httptools then reads as it always
did. The first part holds them to that subset, byte by byte at its edges.
The second sends the same bytes through the protocol objects twice, with
``Context.heads_in_c`` on and off, over small in-memory transports, and
compares what the tool, the portal and the client were sent, and what became
of the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from labgate.router import http
from labgate.router.auth import Authenticator
from labgate.router.context import Context
from labgate.router.http import MAX_HEAD, MAX_HEADERS, MAX_TARGET, scan_request, scan_response
from labgate.router.options import RouterOptions
from labgate.router.proxy import ClientConnection
from labgate.router.upstream import UpstreamConnection
from labgate.security import SESSION_COOKIE, SessionSigner, hash_token
from labgate.wire.routes import (
    Route,
    RouteTable,
    TokenInfo,
    UpstreamAddress,
    UserInfo,
    parse_upstream,
)

pytestmark = [pytest.mark.heads_in_c, pytest.mark.usefixtures("c_heads")]


TOKEN = "lg_" + "t" * 43
SIGNER = SessionSigner("heads-test-signing-key", 3600)
#: A session of ada's (user 1), the same for both readings of a case.
SESSION = SIGNER.issue(1)[0].encode()
HOST = b"127.0.0.1:8080"
AUTH = b"Authorization: Bearer " + TOKEN.encode()
SESSION_LINE = b"Cookie: theme=dark; " + SESSION_COOKIE.encode() + b"=" + SESSION + b"; _xsrf=2|ab"


def request(
    *lines: bytes,
    target: bytes = b"/i/bench/small",
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = HOST,
    body: bytes = b"",
) -> bytes:
    """A request head (``Host`` first unless None), then ``body``."""
    head = [method + b" " + target + b" " + version]
    if host is not None:
        head.append(b"Host: " + host)
    head += lines
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def response(*lines: bytes, status: bytes = b"200 OK", body: bytes = b"") -> bytes:
    """A response head with ``lines``, then ``body``."""
    return b"\r\n".join([b"HTTP/1.1 " + status, *lines]) + b"\r\n\r\n" + body


def accepted(data: bytes) -> http.RequestScan:
    """``scan_request(data)``, which must not be None."""
    scanned = scan_request(data)
    assert scanned is not None, data
    return scanned


# --- requests the scanner reads ---------------------------------------------------------

BROWSER = (
    b"Connection: keep-alive",
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"',
    b"sec-ch-ua-mobile: ?0",
    b'sec-ch-ua-platform: "Linux"',
    b"Upgrade-Insecure-Requests: 1",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36",
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    b"image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    b"Sec-Fetch-Site: same-origin",
    b"Sec-Fetch-Mode: navigate",
    b"Sec-Fetch-User: ?1",
    b"Sec-Fetch-Dest: document",
    b"Referer: http://127.0.0.1:8080/instances",
    b"Accept-Encoding: gzip, deflate, br, zstd",
    b"Accept-Language: en-GB,en;q=0.9,de;q=0.8",
    SESSION_LINE,
)


def test_a_browser_get_is_read_whole() -> None:
    data = request(*BROWSER, target=b"/i/bench/lab/tree?reset=1&x=%2F")
    # Everything but Host, Connection and Cookie goes on, in order, as sent.
    forwarded = [line for line in BROWSER if not line.startswith((b"Connection:", b"Cookie:"))]
    assert accepted(data) == (
        len(data),  # the head's end
        b"GET",
        b"/i/bench/lab/tree?reset=1&x=%2F",
        True,  # HTTP/1.1
        1,  # Connection: keep-alive
        HOST,
        SESSION_LINE.partition(b": ")[2],  # the cookie
        None,  # no Authorization
        None,  # no Origin
        b"same-origin",  # Sec-Fetch-Site
        True,  # a browser (Accept names text/html)
        False,  # no Content-Length: 0
        b"".join(line + b"\r\n" for line in forwarded),
    )


def test_a_benchmark_get_with_a_token_is_read_whole() -> None:
    """What wrk sends: Host and Authorization, nothing to forward."""
    data = request(AUTH)
    scanned = accepted(data)
    assert scanned == (
        len(data),
        b"GET",
        b"/i/bench/small",
        True,
        0,
        HOST,
        None,
        AUTH.partition(b": ")[2],
        None,
        None,
        False,
        False,
        b"",
    )


def test_the_head_ends_where_the_next_request_starts() -> None:
    first = request(AUTH, target=b"/i/bench/a")
    second = request(AUTH, target=b"/i/bench/b")
    assert accepted(first + second)[0] == len(first)
    assert accepted(first + b"garbage")[0] == len(first)


@pytest.mark.parametrize(
    ("lines", "connection"),
    [((), 0), ((b"Connection: keep-alive",), 1), ((b"Connection: close",), 2)],
)
def test_http_1_0(lines: tuple[bytes, ...], connection: int) -> None:
    scanned = accepted(request(*lines, version=b"HTTP/1.0"))
    assert (scanned[3], scanned[4]) == (False, connection)


@pytest.mark.parametrize(
    "method", [b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"]
)
def test_the_methods_read(method: bytes) -> None:
    assert accepted(request(AUTH, method=method))[1] == method


def test_content_length_zero_is_noted_and_not_forwarded() -> None:
    scanned = accepted(request(b"Content-Type: text/plain", b"Content-Length: 0", method=b"POST"))
    assert scanned[11] is True
    assert scanned[12] == b"Content-Type: text/plain\r\n"


@pytest.mark.parametrize(
    ("line", "connection"),
    [
        (b"Connection: keep-alive", 1),
        (b"Connection: Keep-Alive", 1),
        (b"CONNECTION: KEEP-ALIVE", 1),
        (b"connection:keep-alive", 1),
        (b"Connection: close", 2),
        (b"Connection: Close", 2),
        (b"connection: CLOSE", 2),
    ],
)
def test_connection_keep_alive_or_close_in_any_case(line: bytes, connection: int) -> None:
    scanned = accepted(request(line, b"X-A: 1"))
    assert scanned[4] == connection
    assert scanned[12] == b"X-A: 1\r\n"


def test_forwarding_and_labgate_headers_are_dropped_from_kept() -> None:
    data = request(
        b"X-Before: 1",
        b"x-forwarded-host: evil.example",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Prefix: /elsewhere",
        b"X-Labgate-User: root",
        b"x-labgate-admin: 1",
        b"X-Forwarded: no-dash-after",
        b"X-Labgatex: not-the-prefix",
        b"X-After: 2",
    )
    assert accepted(data)[12] == (
        b"X-Before: 1\r\nX-Forwarded: no-dash-after\r\nX-Labgatex: not-the-prefix\r\nX-After: 2\r\n"
    )


@pytest.mark.parametrize(
    ("accept", "browser"),
    [
        (b"Accept: text/html", True),
        (b"Accept: application/xhtml+xml, text/html;q=0.9", True),
        (b"Accept: application/json", False),
        (b"Accept: */*", False),
        (b"X-Accept: text/html", False),
    ],
)
def test_accept_naming_text_html_is_a_browser(accept: bytes, browser: bool) -> None:
    scanned = accepted(request(accept))
    assert scanned[10] is browser
    assert scanned[12] == accept + b"\r\n"


def test_origin_and_fetch_site_are_picked_out_and_kept() -> None:
    scanned = accepted(
        request(b"Origin: http://127.0.0.1:8080", b"Sec-Fetch-Site: cross-site", method=b"POST")
    )
    assert (scanned[8], scanned[9]) == (b"http://127.0.0.1:8080", b"cross-site")
    assert scanned[12] == b"Origin: http://127.0.0.1:8080\r\nSec-Fetch-Site: cross-site\r\n"


def test_whitespace_before_a_value_goes_and_after_it_stays() -> None:
    """As llhttp reads them: a value starts after the whitespace and ends at the line's end."""
    scanned = accepted(request(b"X-A:1", b"X-B:\t 2 \t", b"Origin: http://h ", AUTH + b" "))
    assert scanned[12] == b"X-A: 1\r\nX-B: 2 \t\r\nOrigin: http://h \r\n"
    assert (scanned[7], scanned[8]) == (AUTH.partition(b": ")[2] + b" ", b"http://h ")


def test_the_limits_are_reached_but_not_passed() -> None:
    # MAX_HEADERS headers, Host included.
    lines = [b"X-H%d: v" % n for n in range(MAX_HEADERS - 1)]
    assert accepted(request(*lines))[12].count(b"\r\n") == MAX_HEADERS - 1  # all but Host
    assert scan_request(request(*lines, b"X-One-More: v")) is None
    # A target of MAX_TARGET bytes.
    target = b"/i/bench/" + b"a" * (MAX_TARGET - len(b"/i/bench/"))
    assert accepted(request(target=target))[2] == target
    assert scan_request(request(target=target + b"a")) is None
    # A head of MAX_HEAD bytes, its last empty line included.
    short = request(b"X-Big: ")
    big = request(b"X-Big: " + b"a" * (MAX_HEAD - len(short)))
    assert len(big) == MAX_HEAD
    assert accepted(big)[0] == MAX_HEAD
    assert scan_request(request(b"X-Big: " + b"a" * (MAX_HEAD - len(short) + 1))) is None


# --- requests the scanner leaves to httptools -------------------------------------------


def test_an_incomplete_head_is_none_at_every_length() -> None:
    data = request(AUTH, b"Accept: text/html")
    for size in range(len(data)):
        assert scan_request(data[:size]) is None, data[:size]


REFUSED_REQUESTS = {
    "bare LF everywhere": b"GET /i/bench/ HTTP/1.1\nHost: h\n\n",
    "bare LF after the request line": b"GET /i/bench/ HTTP/1.1\nHost: h\r\n\r\n",
    "bare LF after a header": request(b"X-A: 1\nX-B: 2"),
    "bare LF to end the head": b"GET /i/bench/ HTTP/1.1\r\nHost: h\r\n\n",
    "CR without LF": b"GET /i/bench/ HTTP/1.1\r\nHost: h\rX-A: 1\r\n\r\n",
    "obs-fold with a space": request(b"X-A: 1", b" continued"),
    "obs-fold with a tab": request(b"X-A: 1", b"\tcontinued"),
    "a header line starting with a space": request(b" X-A: 1"),
    "space before the colon": request(b"X-A : 1"),
    "space before the colon of Host": request(b"Host : h", host=None),
    "no colon": request(b"X-A 1"),
    "an empty name": request(b": 1"),
    "a non-token name": request(b"X(A): 1"),
    "NUL in a value": request(b"X-A: a\x00b"),
    "CTL in a value": request(b"X-A: a\x01b"),
    "DEL in a value": request(b"X-A: a\x7fb"),
    "0x80 in a value": request(b"X-A: caf\x80"),
    "0xff in a value": request(b"X-A: \xff"),
    "UTF-8 in a value": request("X-A: café".encode()),
    "no Host": request(AUTH, host=None),
    "two Host": request(b"Host: other"),
    "two Cookie": request(b"Cookie: a=1", b"Cookie: b=2"),
    "two Authorization": request(AUTH, AUTH),
    "two Origin": request(b"Origin: http://a", b"Origin: http://a"),
    "two Sec-Fetch-Site": request(b"Sec-Fetch-Site: none", b"Sec-Fetch-Site: none"),
    "two Connection": request(b"Connection: keep-alive", b"Connection: keep-alive"),
    "Transfer-Encoding": request(b"Transfer-Encoding: chunked", method=b"POST"),
    "Content-Length 5": request(b"Content-Length: 5", method=b"POST", body=b"hello"),
    "Content-Length 00": request(b"Content-Length: 00", method=b"POST"),
    "Content-Length empty": request(b"Content-Length: ", method=b"POST"),
    "two Content-Length 0": request(b"Content-Length: 0", b"Content-Length: 0"),
    "Expect": request(b"Expect: 100-continue", b"Content-Length: 0", method=b"PUT"),
    "Upgrade": request(b"Upgrade: websocket"),
    "Connection: upgrade": request(b"Connection: upgrade"),
    "a WebSocket handshake": request(b"Connection: Upgrade", b"Upgrade: websocket"),
    "Connection tokens": request(b"Connection: keep-alive, X-A", b"X-A: 1"),
    "Connection: close, keep-alive": request(b"Connection: close, keep-alive"),
    "Connection: TE": request(b"Connection: TE"),
    "Keep-Alive": request(b"Keep-Alive: timeout=5"),
    "Proxy-Connection": request(b"Proxy-Connection: keep-alive"),
    "TE": request(b"TE: trailers"),
    "Trailer": request(b"Trailer: X-A"),
    "Proxy-Authorization": request(b"Proxy-Authorization: Basic eDp5"),
    "Forwarded": request(b"Forwarded: for=6.6.6.6"),
    "X-Forwarded-For": request(b"X-Forwarded-For: 6.6.6.6"),
    "x-forwarded-for": request(b"x-forwarded-for: 6.6.6.6"),
    "X-Real-IP": request(b"X-Real-IP: 6.6.6.6"),
    "a header named Close": request(b"Close: 1"),
    "an unknown method": request(method=b"FOO"),
    "PROPFIND": request(method=b"PROPFIND"),
    "TRACE": request(method=b"TRACE"),
    "CONNECT": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    "a lower-case method": request(method=b"get"),
    "a mixed-case method": request(method=b"Get"),
    "a method too long": request(method=b"GETGETGETGET"),
    "two spaces after the method": request(target=b" /i/bench/"),
    "absolute-form": request(target=b"http://127.0.0.1:8080/i/bench/"),
    "asterisk-form": request(target=b"*", method=b"OPTIONS"),
    "authority-form": request(target=b"127.0.0.1:8080"),
    "an empty target": request(target=b""),
    'a " in the target': request(target=b'/i/bench/"x"'),
    "a < in the target": request(target=b"/i/bench/<x>"),
    "a backslash in the target": request(target=b"/i/bench\\x"),
    "a ^ in the target": request(target=b"/i/bench/^"),
    "a backtick in the target": request(target=b"/i/bench/`"),
    "a { in the target": request(target=b"/i/bench/{x}"),
    "a | in the target": request(target=b"/i/bench/a|b"),
    "a # in the target": request(target=b"/i/bench/#frag"),
    "a [ in the target": request(target=b"/i/bench/[0]"),
    "a tab in the target": request(target=b"/i/bench/\t"),
    "DEL in the target": request(target=b"/i/bench/\x7f"),
    "0x80 in the target": request(target=b"/i/bench/\x80"),
    "two spaces before the version": request(target=b"/i/bench/ "),
    "HTTP/2.0": request(version=b"HTTP/2.0"),
    "HTTP/1.2": request(version=b"HTTP/1.2"),
    "HTTP/0.9": request(version=b"HTTP/0.9"),
    "http/1.1": request(version=b"http/1.1"),
    "no version": b"GET /i/bench/\r\nHost: h\r\n\r\n",
    "a space after the version": request(version=b"HTTP/1.1 "),
}


@pytest.mark.parametrize("data", REFUSED_REQUESTS.values(), ids=REFUSED_REQUESTS.keys())
def test_requests_outside_the_subset_are_none(data: bytes) -> None:
    assert scan_request(data) is None


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_only_bytes_are_scanned(kind: type[bytearray] | type[memoryview[Any]]) -> None:
    data = request(AUTH)
    assert scan_request(kind(data)) is None
    assert scan_response(kind(response(b"Content-Length: 0"))) is None


# --- responses --------------------------------------------------------------------------

OK_LINES = (b"Server: nginx", b"Content-Type: text/plain", b"Content-Length: 12")


@pytest.mark.parametrize(
    "connection",
    [b"Connection: keep-alive", b"Connection: Keep-Alive", b"connection:keep-alive", None],
)
def test_a_whole_response_is_passed_less_its_keep_alive_line(connection: bytes | None) -> None:
    lines = [OK_LINES[0], *([connection] if connection else []), *OK_LINES[1:]]
    data = response(*lines, body=b"hello world\n")
    scanned = scan_response(data)
    assert scanned is not None
    head_end, cut, cut_end = scanned
    assert data[head_end:] == b"hello world\n"
    expected = response(*OK_LINES, body=b"hello world\n")
    if connection is None:
        assert (cut, cut_end) == (0, 0)
    else:
        assert data[cut:cut_end] == connection + b"\r\n"
        assert data[:cut] + data[cut_end:] == expected


@pytest.mark.parametrize(
    "data",
    [
        response(b"Content-Length: 0"),
        response(b"Content-Length: 0", b"Connection: keep-alive"),
        response(b"Content-Length: 3", status=b"404 Not Found", body=b"no\n"),
        response(b"Content-Length: 3", status=b"599 ", body=b"abc"),
        response(b"Content-Length: 2", status=b"200 ", body=b"ok"),
        response(b"Content-Length: 2", status=b"200 O\tK", body=b"ok"),
        response(b"content-length: 2", b"X-Empty:", body=b"ok"),
    ],
)
def test_responses_read_whole(data: bytes) -> None:
    scanned = scan_response(data)
    assert scanned is not None
    assert scanned[0] == data.index(b"\r\n\r\n") + 4


def test_a_response_cut_short_anywhere_is_none() -> None:
    data = response(b"Connection: keep-alive", *OK_LINES, body=b"hello world\n")
    for size in range(len(data)):
        assert scan_response(data[:size]) is None, data[:size]


REFUSED_RESPONSES = {
    "100": response(status=b"100 Continue"),
    "101": response(b"Connection: Upgrade", b"Upgrade: websocket", status=b"101 Switching"),
    "103": response(b"Link: </a.css>; rel=preload", status=b"103 Early Hints"),
    "199 with a body": response(b"Content-Length: 2", status=b"199 Odd", body=b"ok"),
    "204": response(b"Content-Length: 0", status=b"204 No Content"),
    "304": response(b"Content-Length: 12", b"ETag: x", status=b"304 Not Modified"),
    "600": response(b"Content-Length: 0", status=b"600 Odd"),
    "status of two digits": response(b"Content-Length: 0", status=b"20 OK"),
    "status of four digits": response(b"Content-Length: 0", status=b"2000 OK"),
    "no space after the status": response(b"Content-Length: 0", status=b"200"),
    "HTTP/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/2": b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "Set-Cookie": response(b"Set-Cookie: a=1", b"Content-Length: 2", body=b"ok"),
    "set-cookie": response(b"set-cookie: labgate-session=x", b"Content-Length: 2", body=b"ok"),
    "Transfer-Encoding": response(b"Transfer-Encoding: chunked", body=b"2\r\nok\r\n0\r\n\r\n"),
    "Transfer-Encoding and Content-Length": response(
        b"Transfer-Encoding: chunked", b"Content-Length: 11", body=b"2\r\nok\r\n0\r\n\r\n"
    ),
    "two Content-Length": response(b"Content-Length: 2", b"Content-Length: 2", body=b"ok"),
    "no Content-Length": response(b"Server: x", body=b"ok"),
    "a non-digit Content-Length": response(b"Content-Length: 2a", body=b"ok"),
    "a signed Content-Length": response(b"Content-Length: +2", body=b"ok"),
    "a negative Content-Length": response(b"Content-Length: -1"),
    "an empty Content-Length": response(b"Content-Length: "),
    "a Content-Length list": response(b"Content-Length: 2, 2", body=b"ok"),
    "a Content-Length of 19 digits": response(b"Content-Length: " + b"0" * 18 + b"2", body=b"ok"),
    "a body shorter than Content-Length": response(b"Content-Length: 12", body=b"hello"),
    "a body longer than Content-Length": response(b"Content-Length: 2", body=b"ok!"),
    "a second response after the body": response(b"Content-Length: 2", body=b"ok")
    + response(b"Content-Length: 2", body=b"ok"),
    "Connection: close": response(b"Connection: close", b"Content-Length: 2", body=b"ok"),
    "Connection: upgrade": response(b"Connection: upgrade", b"Content-Length: 2", body=b"ok"),
    "Connection tokens": response(b"Connection: keep-alive, X-A", b"Content-Length: 0"),
    "two Connection: keep-alive": response(
        b"Connection: keep-alive", b"Connection: keep-alive", b"Content-Length: 0"
    ),
    "Keep-Alive": response(b"Keep-Alive: timeout=5", b"Content-Length: 0"),
    "TE": response(b"TE: trailers", b"Content-Length: 0"),
    "Trailer": response(b"Trailer: X-A", b"Content-Length: 0"),
    "Upgrade": response(b"Upgrade: h2c", b"Content-Length: 0"),
    "Proxy-Connection": response(b"Proxy-Connection: keep-alive", b"Content-Length: 0"),
    "Proxy-Authenticate": response(b"Proxy-Authenticate: Basic", b"Content-Length: 0"),
    "Proxy-Authorization": response(b"Proxy-Authorization: Basic eDp5", b"Content-Length: 0"),
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "bare LF after a header": response(b"Server: x\nContent-Length: 2", body=b"ok"),
    "obs-fold": response(b"Server: x", b" y", b"Content-Length: 2", body=b"ok"),
    "space before a colon": response(b"Server : x", b"Content-Length: 2", body=b"ok"),
    "NUL in a value": response(b"Server: x\x00", b"Content-Length: 2", body=b"ok"),
    "0x80 in a value": response(b"Server: caf\x80", b"Content-Length: 2", body=b"ok"),
    "0x80 in the reason": response(b"Content-Length: 2", status=b"200 \x80", body=b"ok"),
}


@pytest.mark.parametrize("data", REFUSED_RESPONSES.values(), ids=REFUSED_RESPONSES.keys())
def test_responses_outside_the_subset_are_none(data: bytes) -> None:
    assert scan_response(data) is None


def test_every_byte_anywhere_in_a_value_is_judged_as_llhttp_does() -> None:
    """A header value may hold tabs and visible ASCII (0x20-0x7e) only, wherever the byte
    is: the scanners read values sixteen bytes at a time, then byte by byte."""
    allowed = {0x09, *range(0x20, 0x7F)}
    for length in (1, 15, 16, 17, 40):
        for at in range(length):
            for byte in range(256):
                value = bytearray(b"v" * length)
                value[at] = byte
                line = b"X-Probe: " + bytes(value)
                reply, ask = scan_response(response(line, b"Content-Length: 0")), None
                if byte != 0x0D:  # a CR ends the line in a request: not the value's byte
                    ask = scan_request(request(line))
                expected = byte in allowed
                assert (reply is not None) == expected, (length, at, byte)
                if byte != 0x0D:
                    assert (ask is not None) == expected, (length, at, byte)
                    if expected:
                        kept = b"X-Probe: " + bytes(value).lstrip(b" \t") + b"\r\n"
                        assert ask is not None and ask[12] == kept


def test_response_limits() -> None:
    lines = [b"X-H%d: v" % n for n in range(MAX_HEADERS - 1)]
    assert scan_response(response(*lines, b"Content-Length: 0")) is not None
    assert scan_response(response(*lines, b"X-More: v", b"Content-Length: 0")) is None
    short = response(b"Content-Length: 0", b"X-Big: ")
    big = response(b"Content-Length: 0", b"X-Big: " + b"a" * (MAX_HEAD - len(short)))
    assert len(big) == MAX_HEAD
    assert scan_response(big) is not None
    too_big = response(b"Content-Length: 0", b"X-Big: " + b"a" * (MAX_HEAD - len(short) + 1))
    assert scan_response(too_big) is None


# --- the two readings, side by side -----------------------------------------------------

Side = Literal["client", "tool", "portal"]
Step = tuple[Side, bytes]


def ask(data: bytes) -> Step:
    """Bytes the client sends (one read of the client connection)."""
    return ("client", data)


def tool(data: bytes) -> Step:
    """Bytes the instance's tool sends (one read of its connection)."""
    return ("tool", data)


def portal(data: bytes) -> Step:
    """Bytes the portal sends (one read of its connection)."""
    return ("portal", data)


@dataclass(frozen=True)
class Case:
    """Reads on each side, in order, and the statuses the client must get."""

    steps: tuple[Step, ...]
    statuses: tuple[int, ...]
    options: RouterOptions | None = None
    #: Responses (by index in what the client got) without a body whatever their head says.
    bodiless: frozenset[int] = frozenset()
    #: The upstreams' reads arrive as memoryviews (as from a site tunnel's frames).
    views: bool = False


class Recorder(asyncio.Transport):
    """The test's end of a socket: what is written to it is kept."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 5555)})
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    """What one reading of a case left: bytes sent each way, and the connections' states."""

    to_tool: bytes
    to_portal: bytes
    to_client: bytes
    #: Closed or open, pooled or not, a new upstream connection being opened.
    connections: dict[str, bool]


def pooled(ctx: Context, address: UpstreamAddress) -> tuple[UpstreamConnection, Recorder]:
    """An open connection to ``address``, idle in the pool: requests find it, no socket opens."""
    conn, end = UpstreamConnection(ctx, address), Recorder()
    conn.connection_made(end)
    ctx.pool.release(conn)
    return conn, end


async def play(case: Case, *, heads_in_c: bool) -> Outcome:
    """Run ``case`` through a client connection, with a tool and a portal connection pooled."""
    table = RouteTable()
    table.set_user(UserInfo(1, "ada"))
    table.set_token(hash_token(TOKEN), TokenInfo(1, frozenset({"instances:access"})))
    table.add_route(Route("bench", "http://127.0.0.1:9", 1, upstream_token="bench-upstream"))
    auth = Authenticator(table, SIGNER)
    options = case.options or RouterOptions()
    ctx = Context(table, auth, parse_upstream("http://127.0.0.1:8"), options)
    ctx.heads_in_c = heads_in_c
    client, client_end = ClientConnection(ctx), Recorder()
    client.connection_made(client_end)
    tool_conn, tool_end = pooled(ctx, table.routes["bench"].address)
    portal_conn, portal_end = pooled(ctx, ctx.portal)
    for side, data in case.steps:
        if side == "client":
            client.data_received(data)
        else:
            conn = tool_conn if side == "tool" else portal_conn
            conn.data_received(memoryview(data) if case.views else data)
    task = client.connect_task
    if task is not None:  # no upstream was in the pool: nothing is connected to here
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return Outcome(
        bytes(tool_end.written),
        bytes(portal_end.written),
        bytes(client_end.written),
        {
            "client closed": client_end.closed,
            "tool pooled": tool_conn in ctx.pool.idle.get(tool_conn.key, []),
            "tool closed": tool_end.closed,
            "portal pooled": portal_conn in ctx.pool.idle.get(portal_conn.key, []),
            "portal closed": portal_end.closed,
            "connecting": task is not None,
        },
    )


@dataclass(frozen=True)
class Message:
    """A response as the client got it, ``Content-Length`` taken out of the header order.

    Each header line is kept as ``name: value`` without the whitespace around
    the value: through httptools the router writes its lines that way, while
    a response the C scanner passes keeps the tool's own spacing (``Server:nginx``,
    ``X-Empty:``). HTTP gives that whitespace no meaning.
    """

    start: bytes
    headers: tuple[bytes, ...]
    length: bytes | None
    body: bytes

    @property
    def status(self) -> int:
        return int(self.start.split(b" ")[1])


def chunked_size(data: bytes) -> int:
    """The bytes of the chunked body (no trailers) at the start of ``data``, or all of it."""
    at = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return len(data)
        size = int(data[at:line_end].partition(b";")[0], 16)
        at = line_end + 2
        if size == 0:
            return min(at + 2, len(data))
        at += size + 2
        if at >= len(data):
            return len(data)


def messages(stream: bytes, bodiless: frozenset[int] = frozenset()) -> list[Message | bytes]:
    """The responses in what the client got; anything that does not parse, as bytes."""
    found: list[Message | bytes] = []
    while stream:
        head_end = stream.find(b"\r\n\r\n")
        if head_end < 0 or not stream.startswith(b"HTTP/1.1 "):
            found.append(stream)
            break
        start, *lines = stream[:head_end].split(b"\r\n")
        rest = stream[head_end + 4 :]
        headers: list[bytes] = []
        length: bytes | None = None
        chunked = False
        for line in lines:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = value.strip()
            else:
                headers.append(name + b": " + value.strip(b" \t"))
                chunked |= name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
        status = int(start.split(b" ")[1])
        if len(found) in bodiless or status < 200 or status in (204, 304):
            size = 0
        elif chunked:
            size = chunked_size(rest)
        elif length is not None:
            size = int(length)
        else:
            size = len(rest)
        found.append(Message(start, tuple(headers), length, rest[:size]))
        stream = rest[size:]
    return found


def status_codes(found: list[Message | bytes]) -> tuple[int, ...]:
    return tuple(m.status if isinstance(m, Message) else 0 for m in found)


OK_BODY = b"hello world\n"
OK = response(
    b"Server: nginx",
    b"Content-Type: text/plain",
    b"Content-Length: 12",
    b"Connection: keep-alive",
    body=OK_BODY,
)
OK_CL_FIRST = response(
    b"Content-Length: 12", b"Server: nginx", b"Content-Type: text/plain", body=OK_BODY
)
OK_PLAIN = response(b"Server: nginx", b"Content-Length: 12", body=OK_BODY)
EMPTY = response(b"Server: nginx", b"Content-Length: 0", b"Connection: keep-alive")
JSON = b'{"ok": true, "items": [1, 2, 3]}'
JSON_OK = response(
    b"Date: Sat, 05 Dec 2026 19:00:00 GMT",
    b"Content-Type: application/json",
    b"Content-Length: %d" % len(JSON),
    b"Cache-Control: no-store",
    b"Vary: Accept-Encoding",
    body=JSON,
)
GET = request(AUTH)
ACCEPT_JSON = b"Accept: application/json"
BROWSER_GET = request(*BROWSER, target=b"/i/bench/lab/tree")
POST_CHUNKED = request(
    AUTH,
    b"Content-Type: text/plain",
    b"Transfer-Encoding: chunked",
    target=b"/i/bench/upload",
    method=b"POST",
    body=b"5\r\nhello\r\n0\r\n\r\n",
)
POST_LENGTH = request(
    AUTH, b"Content-Length: 5", target=b"/i/bench/upload", method=b"POST", body=b"hello"
)
TRUSTED = RouterOptions(trusted_proxies=("127.0.0.0/8",))


def scenario(*steps: Step, statuses: tuple[int, ...], **more: Any) -> Case:
    return Case(steps, statuses, **more)


CASES = {
    # Kept-alive API requests, the scanners' own ground.
    "wrk get": scenario(ask(GET), tool(OK), statuses=(200,)),
    "Content-Length first": scenario(ask(GET), tool(OK_CL_FIRST), statuses=(200,)),
    "no Connection line": scenario(ask(GET), tool(OK_PLAIN), statuses=(200,)),
    "a JSON answer": scenario(ask(request(AUTH, ACCEPT_JSON)), tool(JSON_OK), statuses=(200,)),
    "Content-Length 0 answer": scenario(ask(GET), tool(EMPTY), statuses=(200,)),
    "404 from the tool": scenario(
        ask(GET),
        tool(response(b"Content-Length: 3", status=b"404 Not Found", body=b"no\n")),
        statuses=(404,),
    ),
    "one request after another": scenario(
        ask(GET),
        tool(OK),
        ask(request(AUTH, target=b"/i/bench/two")),
        tool(JSON_OK),
        statuses=(200, 200),
    ),
    "Content-Length 0 request": scenario(
        ask(request(AUTH, b"Content-Type: text/plain", b"Content-Length: 0", method=b"POST")),
        tool(EMPTY),
        statuses=(200,),
    ),
    "every method": scenario(
        *(
            step
            for method in (b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
            for step in (ask(request(AUTH, method=method)), tool(OK))
        ),
        statuses=(200,) * 4,
    ),
    # Browsers.
    "browser with a session": scenario(ask(BROWSER_GET), tool(OK), statuses=(200,)),
    "browser without a session": scenario(
        ask(request(*BROWSER[:-1], b"Cookie: theme=dark", target=b"/i/bench/lab?x=1")),
        statuses=(302,),
    ),
    "browser without a cookie": scenario(ask(request(*BROWSER[:-1])), statuses=(302,)),
    "browser with a forged session": scenario(
        ask(request(*BROWSER[:-1], b"Cookie: labgate-session=forged")), statuses=(302,)
    ),
    "browser HEAD without a session": scenario(
        ask(request(*BROWSER[:-1], method=b"HEAD")), statuses=(302,)
    ),
    "API client without credentials": scenario(ask(request(ACCEPT_JSON)), statuses=(401,)),
    "a token not known": scenario(
        ask(request(b"Authorization: Bearer lg_" + b"x" * 43)), statuses=(401,)
    ),
    "no such instance": scenario(ask(request(AUTH, target=b"/i/nope/")), statuses=(404,)),
    "the instance without its slash": scenario(
        ask(request(AUTH, target=b"/i/bench")), statuses=(302,)
    ),
    "a dot segment": scenario(ask(request(AUTH, target=b"/i/bench/../x")), statuses=(400,)),
    "an invalid Host": scenario(ask(request(AUTH, host=b"a b")), statuses=(400,)),
    "a cross-site POST": scenario(
        ask(
            request(
                SESSION_LINE,
                b"Origin: http://evil.example",
                b"Sec-Fetch-Site: cross-site",
                b"Content-Length: 0",
                method=b"POST",
            )
        ),
        statuses=(403,),
    ),
    "a same-origin POST": scenario(
        ask(
            request(
                SESSION_LINE,
                b"Origin: http://127.0.0.1:8080",
                b"Sec-Fetch-Site: same-origin",
                b"Content-Length: 0",
                method=b"POST",
            )
        ),
        tool(EMPTY),
        statuses=(200,),
    ),
    # Headers the router writes itself.
    "forged forwarding and identity": scenario(
        ask(
            request(
                AUTH,
                b"X-Forwarded-For: 6.6.6.6",
                b"X-Forwarded-Host: evil.example",
                b"X-Forwarded-Proto: https",
                b"X-Labgate-User: root",
                b"x-labgate-admin: 1",
                b"X-Kept: yes",
            )
        ),
        tool(OK),
        statuses=(200,),
    ),
    "X-Forwarded-For from a trusted proxy": scenario(
        ask(request(AUTH, b"X-Forwarded-For: 203.0.113.9")),
        tool(OK),
        statuses=(200,),
        options=TRUSTED,
    ),
    "the portal with forged forwarding": scenario(
        ask(
            request(SESSION_LINE, b"X-Forwarded-For: 6.6.6.6", b"X-Labgate-User: root", target=b"/")
        ),
        portal(OK),
        statuses=(200,),
    ),
    "the portal from a trusted proxy": scenario(
        ask(request(b"X-Forwarded-For: 198.51.100.7, 127.0.0.2", target=b"/login")),
        portal(OK),
        statuses=(200,),
        options=TRUSTED,
    ),
    # Versions and Connection.
    "HTTP/1.0": scenario(ask(request(AUTH, version=b"HTTP/1.0")), tool(OK), statuses=(200,)),
    "HTTP/1.0 keep-alive": scenario(
        ask(request(AUTH, b"Connection: keep-alive", version=b"HTTP/1.0")),
        tool(OK),
        ask(request(AUTH, b"Connection: Keep-Alive", version=b"HTTP/1.0")),
        tool(OK_PLAIN),
        statuses=(200, 200),
    ),
    "Connection: close": scenario(
        ask(request(AUTH, b"Connection: close")), tool(OK), statuses=(200,)
    ),
    "Connection: close answered by the router": scenario(
        ask(request(b"Connection: close")), statuses=(401,)
    ),
    "a request after Connection: close": scenario(
        ask(request(AUTH, b"Connection: close") + GET), tool(OK), statuses=(200,)
    ),
    "a request after an HTTP/1.0 one": scenario(
        ask(request(AUTH, version=b"HTTP/1.0") + GET), tool(OK), statuses=(200,)
    ),
    # HEAD: the answer has no body whatever its head says.
    "HEAD": scenario(
        ask(request(AUTH, method=b"HEAD")),
        tool(response(b"Server: nginx", b"Content-Length: 12", b"Connection: keep-alive")),
        statuses=(200,),
        bodiless=frozenset({0}),
    ),
    "HEAD answered with a body": scenario(
        ask(request(AUTH, method=b"HEAD")),
        tool(OK),
        statuses=(200,),
        bodiless=frozenset({0}),
    ),
    # Pipelining.
    "two pipelined": scenario(
        ask(GET + request(AUTH, target=b"/i/bench/two")),
        tool(OK),
        tool(JSON_OK),
        statuses=(200, 200),
    ),
    "three pipelined": scenario(
        ask(GET + request(AUTH, target=b"/i/bench/two") + request(AUTH, target=b"/i/bench/3")),
        tool(OK),
        tool(EMPTY),
        tool(JSON_OK),
        statuses=(200, 200, 200),
    ),
    "pipelined, then a chunked POST": scenario(
        ask(GET + POST_CHUNKED), tool(OK), tool(EMPTY), statuses=(200, 200)
    ),
    "pipelined, then a POST with a body": scenario(
        ask(GET + POST_LENGTH), tool(OK), tool(EMPTY), statuses=(200, 200)
    ),
    "a chunked POST, then pipelined": scenario(
        ask(POST_CHUNKED + GET), tool(EMPTY), tool(OK), statuses=(200, 200)
    ),
    "pipelined, the first answered by the router": scenario(
        ask(request(ACCEPT_JSON) + GET), tool(OK), statuses=(401, 200)
    ),
    "pipelined HEAD then GET": scenario(
        ask(request(AUTH, method=b"HEAD") + GET),
        tool(response(b"Content-Length: 12")),
        tool(OK),
        statuses=(200, 200),
        bodiless=frozenset({0}),
    ),
    # Split reads.
    "a request split in a header": scenario(
        ask(GET[:30]), ask(GET[30:]), tool(OK), statuses=(200,)
    ),
    "a request split before its last CRLF": scenario(
        ask(GET[:-2]), ask(GET[-2:]), tool(OK), statuses=(200,)
    ),
    "a second request split across reads": scenario(
        ask(GET + GET[:20]), ask(GET[20:]), tool(OK), tool(OK), statuses=(200, 200)
    ),
    "a response split in its head": scenario(
        ask(GET), tool(OK[:20]), tool(OK[20:]), statuses=(200,)
    ),
    "a response split in its body": scenario(
        ask(GET), tool(OK[:-5]), tool(OK[-5:]), statuses=(200,)
    ),
    "a response with bytes after its body": scenario(
        ask(GET), tool(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"), statuses=(200,)
    ),
    "a response with a stray byte after its body": scenario(
        ask(GET), tool(OK + b"x"), statuses=(200,)
    ),
    # Responses the response scanner leaves to httptools.
    "204": scenario(
        ask(GET), tool(response(b"Server: x", status=b"204 No Content")), statuses=(204,)
    ),
    "304": scenario(
        ask(request(AUTH, b'If-None-Match: "v1"')),
        tool(response(b'ETag: "v1"', b"Content-Length: 12", status=b"304 Not Modified")),
        statuses=(304,),
    ),
    "Set-Cookie": scenario(
        ask(GET),
        tool(response(b"Set-Cookie: theme=dark; Path=/", b"Content-Length: 12", body=OK_BODY)),
        statuses=(200,),
    ),
    "Set-Cookie of labgate's session": scenario(
        ask(GET),
        tool(
            response(
                b"Set-Cookie: labgate-session=evil; Path=/",
                b"Set-Cookie: theme=dark",
                b"Set-Cookie:  __Host-labgate-session=evil",
                b"Content-Length: 12",
                b"Connection: keep-alive",
                body=OK_BODY,
            )
        ),
        statuses=(200,),
    ),
    "Set-Cookie from the portal": scenario(
        ask(request(b"Content-Length: 0", target=b"/login", method=b"POST")),
        portal(
            response(b"Set-Cookie: labgate-session=fresh; Path=/; HttpOnly", b"Content-Length: 0")
        ),
        statuses=(200,),
    ),
    "a chunked response": scenario(
        ask(GET),
        tool(
            response(b"Transfer-Encoding: chunked", b"Server: x", body=b"5\r\nhello\r\n0\r\n\r\n")
        ),
        statuses=(200,),
    ),
    "a memoryview response": scenario(ask(GET), tool(OK), statuses=(200,), views=True),
    "a response with Connection: close": scenario(
        ask(GET),
        tool(response(b"Connection: close", b"Content-Length: 12", body=OK_BODY)),
        statuses=(200,),
    ),
    "a response read to the close": scenario(
        ask(GET), tool(response(b"Connection: close", body=b"until the end")), statuses=(200,)
    ),
    "a 100 Continue first": scenario(
        ask(GET),
        tool(response(status=b"100 Continue") + OK),
        statuses=(100, 200),
    ),
    "a response with Keep-Alive": scenario(
        ask(GET),
        tool(response(b"Keep-Alive: timeout=5", b"Content-Length: 12", body=OK_BODY)),
        statuses=(200,),
    ),
    "a response naming a header in Connection": scenario(
        ask(GET),
        tool(response(b"Connection: X-Hop", b"X-Hop: 1", b"Content-Length: 12", body=OK_BODY)),
        statuses=(200,),
    ),
    # Whitespace around values: the readings must agree on the bytes passed on.
    "request values with trailing whitespace": scenario(
        ask(request(AUTH, b"Accept: */*  ", b"X-Tab: a\t")), tool(OK), statuses=(200,)
    ),
    "a Host with trailing whitespace": scenario(
        ask(request(AUTH, host=HOST + b" ")), tool(OK), statuses=(400,)
    ),
    "request values without a space after the colon": scenario(
        ask(request(AUTH, b"Accept:*/*", b"X-A:\t\t1")), tool(OK), statuses=(200,)
    ),
    "an empty request header": scenario(
        ask(request(AUTH, b"X-Empty:", b"X-Next: 1")), tool(OK), statuses=(200,)
    ),
    "an empty Cookie": scenario(ask(request(AUTH, b"Cookie:")), tool(OK), statuses=(200,)),
    "credentials with trailing whitespace, to the portal": scenario(
        ask(request(b"Cookie: theme=dark ", AUTH + b" ", target=b"/api/me")),
        portal(OK),
        statuses=(200,),
    ),
    "response values without a space after the colon": scenario(
        ask(GET),
        tool(response(b"Server:nginx", b"Content-Length:12", b"X-A:   1", body=OK_BODY)),
        statuses=(200,),
    ),
    "response values with trailing whitespace": scenario(
        ask(GET),
        tool(response(b"Server: nginx ", b"Content-Length: 12 ", body=OK_BODY)),
        statuses=(200,),
    ),
    "an empty response header": scenario(
        ask(GET),
        tool(response(b"X-Empty:", b"Server: nginx", b"Content-Length: 12", body=OK_BODY)),
        statuses=(200,),
    ),
    "a lower-case content-length": scenario(
        ask(GET),
        tool(response(b"content-length: 12", b"server: nginx", body=OK_BODY)),
        statuses=(200,),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_both_readings_pass_on_the_same_bytes(case: Case) -> None:
    """With and without the scanners: the same bytes each way, the same connections kept."""
    python = await play(case, heads_in_c=False)
    in_c = await play(case, heads_in_c=True)
    assert status_codes(messages(python.to_client, case.bodiless)) == case.statuses
    assert in_c.to_tool == python.to_tool
    assert in_c.to_portal == python.to_portal
    assert messages(in_c.to_client, case.bodiless) == messages(python.to_client, case.bodiless)
    assert in_c.connections == python.connections


def test_the_corpus_reaches_the_scanners() -> None:
    """Most cases start with bytes the scanners read whole: the fast path is what is compared."""
    first_asks = [c.steps[0][1] for c in CASES.values() if c.steps[0][0] == "client"]
    answers = [data for c in CASES.values() for side, data in c.steps if side != "client"]
    assert sum(scan_request(data) is not None for data in first_asks) >= 3 * len(first_asks) // 4
    assert sum(scan_response(data) is not None for data in answers) >= len(answers) // 2
