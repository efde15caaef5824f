"""Request-target checks and small HTTP helpers."""

from __future__ import annotations

import pytest

from labgate.router.http import (
    Target,
    TargetError,
    check_target,
    chunk,
    connection_tokens,
    header_safe,
    is_forgeable,
    status_line,
    valid_host,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/", Target(None)),
        (b"/login?next=/i/x/", Target(None)),
        (b"/i/abc/", Target("abc", b"/")),
        (b"/i/abc/lab/tree?x=1", Target("abc", b"/lab/tree?x=1")),
        (b"/i/abc", Target("abc", b"")),
        (b"/i/abc?x=/y", Target("abc", b"")),
        (b"/i/a%62c/", Target("")),
        (b"/i//abc/", Target("")),
        (b"/i/abc/files/a%2Fb.txt", Target("abc", b"/files/a%2Fb.txt")),
        (b"/i/abc/.well-known/x", Target("abc", b"/.well-known/x")),
        (b"/i/abc/a..b/...", Target("abc", b"/a..b/...")),
        (b"/I/abc/", Target(None)),
    ],
)
def test_targets(target: bytes, expected: Target) -> None:
    assert check_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"*",
        b"http://host/i/abc/",
        b"//i/abc/",
        b"/i/abc/../def/",
        b"/i/abc/%2e%2e/def/",
        b"/i/abc/.%2E/def/",
        b"/i/abc/..%2fdef/",
        b"/i/abc/%5c..%5cdef/",
        b"/i/abc/..\\def/",
        b"/i/abc/.",
        b"/%69/abc/",
        b"/i%5cabc/",
        b"/i/abc/%00/",
    ],
)
def test_refused_targets(target: bytes) -> None:
    with pytest.raises(TargetError):
        check_target(target)


def test_helpers() -> None:
    assert valid_host(b"example.org:8000")
    assert valid_host(b"[::1]:80")
    assert not valid_host(b"a b")
    assert not valid_host(b"")
    assert connection_tokens(b"Keep-Alive, Upgrade ,") == {b"keep-alive", b"upgrade"}
    assert status_line(404) == b"HTTP/1.1 404 Not Found\r\n"
    assert status_line(599) == b"HTTP/1.1 599 \r\n"
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert header_safe("ada") == b"ada"
    assert b"\n" not in header_safe("a\nb")
    assert is_forgeable(b"x-forwarded-for")
    assert is_forgeable(b"x-labgate-user")
    assert is_forgeable(b"forwarded")
    assert not is_forgeable(b"x-requested-with")
