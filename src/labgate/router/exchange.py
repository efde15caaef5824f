"""One request/response exchange on a client connection, and the head sent upstream.

An :class:`Exchange` collects what the request parser saw (the headers the
router cares about are picked out as they arrive; the rest are kept in order
for forwarding) and tracks where the exchange stands on both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from labgate.router.activity import Counter
from labgate.router.http import (
    FORGEABLE_PREFIXES,
    SAFE_METHODS,
    Target,
    TargetError,
    check_target,
    same_origin,
    valid_host,
)
from labgate.wire.routes import UpstreamAddress

if TYPE_CHECKING:
    from labgate.router.auth import Credentials, Identity
    from labgate.wire.routes import Route

CRLF: Final = b"\r\n"
_HOST_LINE: Final = b" HTTP/1.1\r\nHost: "
_ZERO_LENGTH: Final = b"Content-Length: 0\r\n"

# Request headers handled one by one in ``on_header``; the rest are forwarded
# unless the router owns them (X-Forwarded-*, X-Labgate-*).
_SPECIAL: Final = frozenset(
    {
        b"host",
        b"cookie",
        b"authorization",
        b"accept",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"expect",
        b"upgrade",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-for",
        b"origin",
        b"sec-fetch-site",
    }
)


class HeadMemo:
    """One client connection's last request head, as :meth:`Exchange.validate` found it.

    A kept-alive client sends the same ``Host`` and often the same target
    again and again: comparing the bytes with the last ones costs less than
    hashing them for the router-wide caches (:func:`valid_host`,
    :func:`check_target`), which a fresh ``bytes`` object of each request
    would need every time.
    """

    def __init__(self) -> None:
        self.host: bytes | None = None
        self.target: bytes | None = None
        self.target_info: Target | None = None

    def valid_host(self, host: bytes) -> bool:
        """:func:`valid_host`, remembered for the last host found valid."""
        if host == self.host:
            return True
        if not valid_host(host):
            return False
        self.host = host
        return True

    def check_target(self, target: bytes) -> Target:
        """:func:`check_target`, remembered for the last target read; raises ``TargetError``."""
        info = self.target_info
        if info is not None and target == self.target:
            return info
        info = check_target(target)
        self.target, self.target_info = target, info
        return info


class Exchange:
    """Per-request state; a fresh one for every request on a connection."""

    __slots__ = (
        "address",
        "auth_count",
        "authorization",
        "away",
        "body_buf",
        "body_buffered",
        "body_done",
        "browser",
        "chunked",
        "cl_count",
        "close_after",
        "conn_tokens",
        "content_length",
        "cookie",
        "counter",
        "discard",
        "discarded",
        "error",
        "expect_continue",
        "fetch_site",
        "forwarded_for",
        "head",
        "header_count",
        "headers",
        "host",
        "host_count",
        "http11",
        "instance_id",
        "is_head",
        "is_upgrade",
        "keep_alive",
        "kept",
        "method",
        "origin",
        "portal_base",
        "response_done",
        "response_started",
        "retried",
        "started",
        "target",
        "target_info",
        "te",
        "te_count",
        "upgrade",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.target_info: Target | None = None
        self.http11 = True
        self.keep_alive = True
        #: The headers to forward as httptools read them (None: none yet).
        self.headers: list[tuple[bytes, bytes]] | None = None
        #: The same as ``Name: value\r\n`` lines, when the head was read in one pass (_heads.c).
        self.kept = b""
        self.header_count = 0
        self.host: bytes | None = None
        self.host_count = 0
        self.cookie: bytes | None = None
        self.authorization: bytes | None = None
        self.auth_count = 0
        self.browser = False
        self.content_length: int | None = None
        self.cl_count = 0
        self.te: bytes | None = None
        self.te_count = 0
        self.chunked = False
        self.conn_tokens: bytes | None = None
        self.upgrade: bytes | None = None
        #: Believed only from a trusted proxy (see ``labgate.router.forwarded``).
        self.forwarded_for: bytes | None = None
        self.expect_continue = False
        #: The browser's word on where the request comes from (None: not a browser's).
        self.origin: bytes | None = None
        self.fetch_site: bytes | None = None
        self.is_upgrade = False
        self.is_head = False
        self.error: tuple[int, str] | None = None
        # Body, response and lifecycle.
        #: Body pieces read before the upstream connection is there (None: none).
        self.body_buf: list[bytes] | None = None
        self.body_buffered = 0
        self.body_done = False
        self.discard = False
        self.discarded = 0
        self.response_started = False
        self.response_done = False
        self.close_after = False
        self.retried = False
        #: Sent to an instance whose site's agent is away: no answer there is a 503 "away".
        self.away = False
        #: Wall-clock time the request was routed to an instance (for the latency histogram).
        self.started = 0.0
        self.instance_id = ""
        #: The portal's URL for the router's pages, on an instance's own host ("" elsewhere).
        self.portal_base = ""
        self.head = b""
        self.address: UpstreamAddress | None = None
        self.counter: Counter | None = None

    @property
    def has_body(self) -> bool:
        """Whether the request announced a body."""
        return self.chunked or bool(self.content_length)

    def from_elsewhere(self) -> bool:
        """Whether a browser sent this WebSocket or state-changing request from another origin.

        A tool behind the router gets its instance token with every request
        and so skips its own origin and XSRF checks (Jupyter does): a page of
        another instance (a sibling host of one site) or of another site must
        not open a WebSocket to it nor send it a POST in its visitor's name.
        Safe methods (GET, HEAD, OPTIONS) pass; so does a request without
        ``Origin`` (not a browser's, or a same-origin GET), unless
        ``Sec-Fetch-Site`` says it came from elsewhere.
        """
        if not self.is_upgrade and self.method in SAFE_METHODS:
            return False
        site = self.fetch_site
        if site is not None and site.strip().lower() in (b"cross-site", b"same-site"):
            return True
        origin = self.origin
        return origin is not None and not same_origin(origin, self.host or b"")

    def _keep(self, name: bytes, value: bytes) -> None:
        """Keep a header to forward (the list is made at the first: most heads are read
        whole in C and keep theirs in :attr:`kept`)."""
        headers = self.headers
        if headers is None:
            self.headers = [(name, value)]
        else:
            headers.append((name, value))

    def add_header(self, name: bytes, value: bytes) -> None:
        """Pick out a header the router decides on, or keep it for forwarding."""
        lname = name.lower()
        if lname not in _SPECIAL:
            if not lname.startswith(FORGEABLE_PREFIXES):
                self._keep(name, value)
            return
        if lname == b"host":
            self.host_count += 1
            self.host = value
        elif lname == b"cookie":
            self.cookie = value if self.cookie is None else self.cookie + b"; " + value
        elif lname == b"authorization":
            self.auth_count += 1
            self.authorization = value
        elif lname == b"accept":
            self._keep(name, value)
            if b"text/html" in value:
                self.browser = True
        elif lname == b"content-length":
            self.cl_count += 1
            if value.isdigit() and len(value) < 19:
                self.content_length = int(value)
            else:
                self.fail(400, "invalid Content-Length")
        elif lname == b"transfer-encoding":
            self.te_count += 1
            self.te = value
        elif lname == b"connection":
            self.conn_tokens = (
                value if self.conn_tokens is None else self.conn_tokens + b"," + value
            )
        elif lname == b"expect":
            self._keep(name, value)
            self.expect_continue = value.strip().lower() == b"100-continue"
        elif lname == b"upgrade":
            self.upgrade = value
        elif lname == b"origin":
            self._keep(name, value)
            # Two Origin headers are no browser's: the mismatch refuses the request.
            self.origin = value if self.origin is None else b"\0"
        elif lname == b"sec-fetch-site":
            self._keep(name, value)
            self.fetch_site = value
        elif lname == b"x-forwarded-for":
            self.forwarded_for = (
                value if self.forwarded_for is None else self.forwarded_for + b"," + value
            )
        # Other special headers are hop-by-hop or the router's own: dropped.

    def validate(self, memo: HeadMemo) -> None:
        """Check the complete head; problems end up in ``error``.

        ``memo``: the client connection's, to skip what its last head settled.
        """
        if self.method == b"CONNECT":
            self.fail(405, "CONNECT is not supported: this is not a forward proxy")
        if self.host_count != 1:
            self.fail(400, "a request needs exactly one Host header")
        elif self.host is not None and not memo.valid_host(self.host):
            self.fail(400, "invalid Host header")
        if self.cl_count > 1:
            self.fail(400, "more than one Content-Length header")
        if self.te_count:
            if self.cl_count:
                self.fail(400, "both Content-Length and Transfer-Encoding")
            elif self.te_count > 1 or (self.te or b"").strip().lower() != b"chunked":
                self.fail(400, "only Transfer-Encoding: chunked is accepted")
            elif not self.http11:
                self.fail(400, "Transfer-Encoding needs HTTP/1.1")
            else:
                self.chunked = True
        if self.auth_count > 1:
            self.fail(400, "more than one Authorization header")
        if self.is_upgrade and self.has_body:
            self.fail(400, "an upgrade request cannot carry a body")
        try:
            self.target_info = memo.check_target(self.target)
        except TargetError as problem:
            self.fail(400, str(problem))
        if self.error is not None:
            self.close_after = True

    def fail(self, status: int, detail: str) -> None:
        """Record the first problem found with the request head."""
        if self.error is None:
            self.error = (status, detail)


def _framing(ex: Exchange) -> bytes:
    """The head's lines on how the body (or an upgrade) follows."""
    if ex.is_upgrade:
        return b"Connection: Upgrade\r\nUpgrade: " + (ex.upgrade or b"") + CRLF
    if ex.chunked:
        return b"Transfer-Encoding: chunked\r\n"
    length = ex.content_length
    if length is None:
        return b""
    return _ZERO_LENGTH if length == 0 else b"Content-Length: %d\r\n" % length


def _forwarded(ex: Exchange, peer: bytes, proto: bytes) -> list[bytes]:
    parts = [b"X-Forwarded-For: ", peer, b"\r\nX-Forwarded-Proto: ", proto, CRLF]
    if ex.host is not None:
        parts += [b"X-Forwarded-Host: ", ex.host, CRLF]
    return parts


def _start(ex: Exchange, target: bytes) -> list[bytes]:
    parts = [ex.method, b" ", target, b" HTTP/1.1\r\n"]
    if ex.host is not None:
        parts += [b"Host: ", ex.host, CRLF]
    if ex.kept:
        parts.append(ex.kept)
    headers = ex.headers
    if headers is None:
        return parts
    if ex.conn_tokens is not None:
        from labgate.router.http import connection_tokens

        listed = connection_tokens(ex.conn_tokens)
        headers = [(n, v) for n, v in headers if n.lower() not in listed]
    for name, value in headers:
        parts += [name, b": ", value, CRLF]
    return parts


def portal_head(ex: Exchange, peer: bytes, proto: bytes) -> bytes:
    """The head sent to the portal: the client's own credentials stay (the portal checks them)."""
    parts = _start(ex, ex.target)
    if ex.cookie is not None:
        parts += [b"Cookie: ", ex.cookie, CRLF]
    if ex.authorization is not None:
        parts += [b"Authorization: ", ex.authorization, CRLF]
    parts += _forwarded(ex, peer, proto)
    parts.append(_framing(ex))
    parts.append(CRLF)
    return b"".join(parts)


def instance_head(
    ex: Exchange,
    route: Route,
    identity: Identity,
    creds: Credentials,
    peer: bytes,
    proto: bytes,
    *,
    prefixed: bool = True,
    block: bytes | None = None,
) -> bytes:
    """The head sent to an instance.

    Labgate's credentials never reach the tool: its cookies are cut out of
    ``Cookie`` and a labgate token in ``Authorization`` is dropped. The tool
    gets the route's own token instead, and the user's name. An instance on
    its own host (not ``prefixed``) gets the path as sent and no
    ``X-Forwarded-Prefix``. ``block`` is what :func:`instance_block` made of
    the same arguments, when the caller kept it from an earlier request.
    """
    if prefixed and not route.keep_prefix:
        target = ex.target_info.tail if ex.target_info is not None else b"/"
    else:
        target = ex.target
    if block is None:
        block = instance_block(ex, route, identity, creds, peer, proto, prefixed=prefixed)
    host = ex.host
    if ex.headers is None and host is not None:
        # The common head (read whole in C): one join of a tuple.
        framing = _framing(ex)
        return b"".join(
            (ex.method, b" ", target, _HOST_LINE, host, CRLF, ex.kept, block, framing, CRLF)
        )
    parts = _start(ex, target)
    parts.append(block)
    parts.append(_framing(ex))
    parts.append(CRLF)
    return b"".join(parts)


def instance_block(
    ex: Exchange,
    route: Route,
    identity: Identity,
    creds: Credentials,
    peer: bytes,
    proto: bytes,
    *,
    prefixed: bool,
) -> bytes:
    """The lines of :func:`instance_head` after the client's headers, before the framing.

    They depend only on the arguments (of ``ex``: its ``Authorization`` and
    ``Host``), which stay the same from one request to the next on a
    kept-alive connection: the proxy builds them once and keeps them.
    """
    parts: list[bytes] = []
    if creds.cookie_rest is not None:
        parts += [b"Cookie: ", creds.cookie_rest, CRLF]
    if not route.upstream_token and ex.authorization is not None and creds.token is None:
        parts += [b"Authorization: ", ex.authorization, CRLF]
    lines = route.head_lines
    if not prefixed:
        lines = lines[route.prefix_line_length :]
    parts += [lines, identity.head_line, b"X-Forwarded-For: ", peer]
    parts += [b"\r\nX-Forwarded-Proto: ", proto, CRLF]
    if ex.host is not None:
        parts += [b"X-Forwarded-Host: ", ex.host, CRLF]
    return b"".join(parts)
