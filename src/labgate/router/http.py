"""HTTP/1.1 pieces the proxy needs: limits, header sets, target checks, head building.

The proxy parses with httptools (llhttp in strict mode) and adds the checks a
front door must make on top: one ``Host``, at most one ``Content-Length``, no
``Content-Length`` together with ``Transfer-Encoding``, only ``chunked`` as a
transfer coding, and request targets whose meaning cannot differ between the
router and a tool (no dot segments, no encoded route prefix). What cannot be
framed unambiguously is refused with 400, which closes the door on request
smuggling.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import quote, unquote_to_bytes

#: What ``scan_request`` makes of a head: ``(head_end, method, target, http11, connection,
#: host, cookie, authorization, origin, fetch_site, browser, content_length_zero, kept)``
#: (see ``_heads.c``).
RequestScan = tuple[
    int,
    bytes,
    bytes,
    bool,
    int,
    bytes,
    bytes | None,
    bytes | None,
    bytes | None,
    bytes | None,
    bool,
    bool,
    bytes,
]

try:  # The C scanners of common heads, built beside the compiled modules (_heads.c).
    from labgate.router._heads import scan_request as scan_request
    from labgate.router._heads import scan_response as scan_response

    HEADS_IN_C = True
except ImportError:  # the Python sources alone: httptools reads every head
    HEADS_IN_C = False

    def scan_request(data: object, /) -> RequestScan | None:
        """Without the C scanners: no head is read in one pass."""
        return None

    def scan_response(data: object, /) -> tuple[int, int, int] | None:
        """Without the C scanners: no head is read in one pass."""
        return None


log: Final = logging.getLogger("labgate.router")

#: The wall clock, held as a constant of the compiled modules (no lookup of ``time.time``
#: in its module on every request).
wall_clock: Final = time.time


def nowhere(data: Buffer) -> None:
    """What a connection writes with before it has a transport: nothing goes anywhere."""


#: A deadline that never comes (a timeout switched off).
NEVER: Final = math.inf

MAX_TARGET: Final = 8192
#: Bytes as they reach a protocol: from a socket, or from a site tunnel's frames (views).
#: (The compiled router checks argument types: ``bytes`` alone would refuse a view.)
Buffer = bytes | bytearray | memoryview
MAX_HEAD: Final = 65536
MAX_HEADERS: Final = 128

# Hop-by-hop headers (RFC 9110 7.6.1) plus the framing the proxy sets itself.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"content-length",
    }
)

# Request headers a client may not pass to a tool or the portal: identity and
# forwarding information is the router's to set.
FORGEABLE: Final[frozenset[bytes]] = frozenset({b"forwarded", b"x-real-ip", b"x-forwarded-for"})
FORGEABLE_PREFIXES: Final[tuple[bytes, ...]] = (b"x-forwarded-", b"x-labgate-")

_INSTANCE_ID: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_HOST: Final = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=:\[\]%-]{1,255}")
_SEPARATORS: Final = re.compile(rb"[/\\]")
INSTANCE_PREFIX: Final = b"/i/"


class TargetError(ValueError):
    """A request target the router refuses (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request target points.

    ``instance_id`` is set for ``/i/<id>…`` paths (``""`` when the id is not a
    possible id); ``tail`` is the path after ``/i/<id>`` with the query,
    empty when the path is exactly ``/i/<id>`` (answered with a redirect to
    the slash-terminated URL).
    """

    instance_id: str | None
    tail: bytes = b""


def is_forgeable(name: bytes) -> bool:
    """Whether a (lower-case) request header is the router's own to set."""
    return name in FORGEABLE or name.startswith(FORGEABLE_PREFIXES)


_TARGET_CACHE: Final[dict[bytes, Target]] = {}
_TARGET_CACHE_SIZE: Final = 8192


def check_target(target: bytes) -> Target:
    """Classify a raw request target (cached), or raise :class:`TargetError`."""
    known = _TARGET_CACHE.get(target)
    if known is not None:
        return known
    result = _check_target(target)
    if len(_TARGET_CACHE) >= _TARGET_CACHE_SIZE:
        _TARGET_CACHE.clear()
    _TARGET_CACHE[target] = result
    return result


def _check_target(target: bytes) -> Target:
    """Classify a raw request target, or raise :class:`TargetError`.

    Only origin-form targets (``/path?query``) are accepted. A path with a
    dot segment, plain or percent-encoded, even between encoded slashes, is
    refused: browsers never send one, and a tool (or anything between the
    router and it) resolving it differently from the router is how path
    tricks reach another instance. So is an encoded spelling of the route
    prefix (``/%69/<id>``) and a leading ``//``.
    """
    if not target.startswith(b"/"):
        raise TargetError("the request target must be a path")
    path, _, _query = target.partition(b"?")
    if path.startswith((b"//", b"/\\")):
        # Browsers read both as another host's address ("//host/...") in a Location.
        raise TargetError("the path must not start with // or /\\")
    # A raw dot segment follows a "/"; encoded or backslashed ones need "%" or "\\".
    if b"/." in path or b"%" in path or b"\\" in path:
        decoded = unquote_to_bytes(path)
        if b"\x00" in decoded:
            raise TargetError("the path contains a NUL byte")
        for segment in _SEPARATORS.split(decoded):
            if segment in (b".", b".."):
                raise TargetError("the path contains a dot segment")
        first = path[1:].split(b"/", 1)[0]
        if first != b"i" and _SEPARATORS.split(unquote_to_bytes(first), 1)[0] == b"i":
            raise TargetError("the path spells the instance prefix in an unusual way")
    if not path.startswith(INSTANCE_PREFIX):
        return Target(None)
    end = target.find(b"/", 3)
    query_at = target.find(b"?", 3)
    if end < 0 or 0 <= query_at < end:
        # "/i/<id>" or "/i/<id>?q": no slash after the id.
        raw_id = target[3:] if query_at < 0 else target[3:query_at]
        tail = b""
    else:
        raw_id = target[3:end]
        tail = target[end:]
    if not _INSTANCE_ID.fullmatch(raw_id):
        return Target("")
    return Target(raw_id.decode("ascii"), tail)


def valid_host(host: bytes) -> bool:
    """Whether a ``Host`` value is a plausible host[:port].

    Hosts found valid are remembered (a client sends the same one on every
    request); the set is emptied when full, so made-up hosts cannot grow it.
    """
    if host in _VALID_HOSTS:
        return True
    if _HOST.fullmatch(host) is None:
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_SIZE:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(host)
    return True


_VALID_HOSTS: Final[set[bytes]] = set()
_VALID_HOSTS_SIZE: Final = 1024


#: Methods a browser may send from another origin without changing anything (CORS's own
#: preflight is an OPTIONS).
SAFE_METHODS: Final[frozenset[bytes]] = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def same_origin(origin: bytes, host: bytes) -> bool:
    """Whether an ``Origin`` names the host the request was sent to (its ``Host``).

    ``http://a.example:8443`` is ``Host: a.example:8443`` or ``a.example``;
    ``null`` or another host is not. Ports and schemes are not compared: a
    proxy in front may pass ``Host`` without its port (nginx's ``$host``) or
    end TLS, and browsers share cookies across a host's ports anyway.
    """
    _, sep, authority = origin.strip().lower().partition(b"://")
    if not sep or not authority or b"/" in authority:
        return False
    return _hostname(authority) == _hostname(host.lower())


def _hostname(authority: bytes) -> bytes:
    """``host`` of ``host[:port]`` (an IPv6 literal keeps its brackets)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[: end + 1] if end > 0 else authority
    return authority.partition(b":")[0]


def connection_tokens(value: bytes) -> set[bytes]:
    """The lower-case tokens of a ``Connection`` header."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``."""
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def header_safe(text: str) -> bytes:
    """``text`` as a header value: printable ASCII kept, anything else percent-encoded."""
    raw = text.encode()
    if all(0x20 <= b < 0x7F for b in raw):
        return raw
    return quote(text, safe=" !#$&'()*+,/:;=?@[]~").encode()
