"""The C head scanners accept nothing llhttp refuses, and read what they accept as llhttp does.

Random mutations of real heads (bytes changed, inserted, deleted, lines
doubled or cut) go to ``scan_request`` / ``scan_response`` and to httptools.
Whenever a scanner answers (does not hand the bytes on to httptools), llhttp
must parse the same bytes without error, end the head where the scanner
said, and see the same method, target, version and headers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import TypeVar

import httptools
import pytest

from labgate.router import http

REQUESTS = [
    b"GET /i/abc/lab?x=1 HTTP/1.1\r\nHost: a.example\r\nCookie: labgate-session=v; x=1\r\n"
    b"Accept: text/html,*/*\r\nUser-Agent: Mozilla/5.0 (X11)\r\nConnection: keep-alive\r\n\r\n",
    b"POST /api/v1/x HTTP/1.0\r\nHost: h:8080\r\nContent-Length: 0\r\n"
    b"Authorization: token lg_abc\r\nOrigin: http://h:8080\r\nSec-Fetch-Site: same-origin\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nhost: x\r\nX-Forwarded-Host: evil\r\nX-Labgate-User: root\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: keep-alive\r\n\r\nhello world\n",
    b'HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nETag: "x"\r\n\r\n',
    b"HTTP/1.1 302 Found\r\nLocation: /a?b=c\r\nContent-Length: 3\r\n\r\nabc",
]
# Bytes that matter to HTTP framing, most likely to make a head mean something else.
SPECIAL = b'\r\n \t:\x00\x7f\x80\xff/?%#;,="\\0123456789aAzZ-_.'
CASES = int(os.environ.get("LABGATE_HEADS_FUZZ_CASES", "4000"))
pytestmark = [pytest.mark.heads_in_c, pytest.mark.usefixtures("c_heads")]
T = TypeVar("T")


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to three random edits."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(len(out) + 1)
        edit = rng.randrange(6)
        byte = rng.choice(SPECIAL) if rng.random() < 0.8 else rng.randrange(256)
        if edit == 0 and where < len(out):
            out[where] = byte
        elif edit == 1:
            out.insert(where, byte)
        elif edit == 2 and where < len(out):
            del out[where]
        elif edit == 3:
            lines = bytes(out).split(b"\r\n")
            pick = rng.randrange(len(lines))
            lines.insert(pick, lines[pick])  # a header (or the start line) twice
            out = bytearray(b"\r\n".join(lines))
        elif edit == 4:
            out[where:where] = rng.choice([b"\r\n", b"\n", b"\r", b"\r\n ", b": ", b"\r\n\r\n"])
        else:
            del out[where : where + rng.randint(1, 8)]
    return bytes(out)


class Seen:
    """What llhttp reports for one message."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        # Read as the router does, while the head is current (llhttp resets it after).
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.complete = True


def llhttp_request(data: bytes) -> tuple[Seen, httptools.HttpRequestParser]:
    seen = Seen()
    parser = httptools.HttpRequestParser(seen)
    seen.parser = parser
    parser.feed_data(data)  # raises on anything llhttp refuses
    return seen, parser


def accepted_mutants(
    seed: int, corpus: list[bytes], scan: Callable[[bytes], T | None]
) -> Iterator[tuple[bytes, T]]:
    """Mutants of ``corpus`` that ``scan`` answers for, with its answer; fails if too few."""
    rng = random.Random(seed)
    accepted = 0
    for _ in range(CASES):
        data = mutate(rng, rng.choice(corpus))
        scanned = scan(data)
        if scanned is not None:
            accepted += 1
            yield data, scanned
    # The mutations leave many heads whole: the checks have run on plenty.
    assert accepted > CASES // 20


def test_the_request_scanner_accepts_only_what_llhttp_reads_the_same() -> None:
    for data, scanned in accepted_mutants(20261205, REQUESTS, http.scan_request):
        end, method, target, http11 = scanned[:4]
        # The scanner reads one head; llhttp must read that same head, whole, first.
        seen, parser = llhttp_request(data[:end])
        assert seen.head_done and seen.complete, data
        assert parser.get_method() == method, data
        assert seen.url == target, data
        assert parser.get_http_version() == ("1.1" if http11 else "1.0"), data
        names = {name.lower() for name, _ in seen.headers}
        values = {name.lower(): value for name, value in seen.headers}
        for index, name in ((5, b"host"), (6, b"cookie"), (7, b"authorization")):
            assert scanned[index] == values.get(name), (data, name)
        for index, name in ((8, b"origin"), (9, b"sec-fetch-site")):
            assert scanned[index] == values.get(name), (data, name)
        connection = values.get(b"connection", b"").lower()
        assert scanned[4] == {b"": 0, b"keep-alive": 1, b"close": 2}[connection], data
        keep_alive = scanned[4] != 2 if http11 else scanned[4] == 1
        assert keep_alive == seen.keep_alive, data
        assert scanned[11] == (b"content-length" in names), data
        kept = scanned[12]
        for line in kept.split(b"\r\n")[:-1]:
            name, _, value = line.partition(b": ")
            assert (name, value) in seen.headers, (data, line)
        assert b"transfer-encoding" not in names and b"upgrade" not in names, data


def test_the_response_scanner_accepts_only_what_llhttp_reads_the_same() -> None:
    for data, scanned in accepted_mutants(20261206, RESPONSES, http.scan_response):
        end, cut, cut_end = scanned
        seen = Seen()
        parser = seen.parser = httptools.HttpResponseParser(seen)
        parser.feed_data(data)  # raises on anything llhttp refuses
        # The whole message, and nothing after it: the body ends where the scanner says.
        assert seen.head_done and seen.complete, data
        assert 200 <= parser.get_status_code() < 600, data
        assert seen.keep_alive, data
        names = [name.lower() for name, _ in seen.headers]
        assert names.count(b"content-length") == 1, data
        assert not {b"transfer-encoding", b"set-cookie", b"upgrade"} & set(names), data
        if cut_end:
            name, _, value = data[cut:cut_end].partition(b":")
            assert name.lower() == b"connection" and value.strip().lower() == b"keep-alive", data
            assert data[cut - 2 : cut] == b"\r\n" and data[cut_end - 2 : cut_end] == b"\r\n"
        assert end <= len(data)
