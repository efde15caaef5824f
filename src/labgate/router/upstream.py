"""The upstream side: one connection to a tool (or the portal), and the pool of idle ones.

An :class:`UpstreamConnection` serves one exchange at a time for the
:class:`~labgate.router.proxy.ClientConnection` attached to it. It parses the
response with httptools, rewrites the head (hop-by-hop headers out, framing
chosen for the client) and streams the body straight to the client
transport. It goes back to the pool only after a complete response to a
completely sent request, with keep-alive on both ends; anything else closes
it. After a ``101 Switching Protocols`` it becomes one half of a tunnel.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from labgate.aio import wait_for
from labgate.router.http import (
    HOP_BY_HOP,
    LAST_CHUNK,
    MAX_HEAD,
    NEVER,
    Buffer,
    chunk,
    connection_tokens,
    log,
    nowhere,
    scan_response,
    status_line,
    wall_clock,
)
from labgate.safefs import connectable
from labgate.security import HANDOFF_COOKIE, INSTANCE_COOKIES, SESSION_COOKIES
from labgate.wire.routes import UpstreamAddress

if TYPE_CHECKING:
    from labgate.router.activity import Counter
    from labgate.router.context import Context
    from labgate.router.exchange import Exchange
    from labgate.router.proxy import ClientConnection

# A tool may not set (or clear) any of labgate's own cookies: the session and instance
# cookies under both their names (``labgate-session``, ``__Host-labgate-session``...),
# whichever is in use.
_LABGATE_COOKIES: Final = frozenset(
    name.encode() for name in (*SESSION_COOKIES, *INSTANCE_COOKIES, HANDOFF_COOKIE)
)
_NO_BODY_STATUS: Final = frozenset({204, 304})
# A ``Connection`` value with nothing to remove from the response beyond itself.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
_OK_LINE: Final = b"HTTP/1.1 200 OK\r\n"
_COLON: Final = b": "
_CRLF: Final = b"\r\n"
# A header whose name has none of these lengths is neither hop-by-hop, nor Content-Length,
# nor Set-Cookie: it is passed on without lower-casing its name (most headers).
_WATCHED_LENGTHS: Final = frozenset(len(name) for name in HOP_BY_HOP | {b"set-cookie"})
# A body piece this large is written beside the head rather than joined to it (a copy).
_JOIN_BELOW: Final = 64 * 1024


def _cookie_name(set_cookie: bytes) -> bytes:
    """The name a ``Set-Cookie`` value sets, as browsers read it (whitespace around it dropped).

    A value without ``=`` is a nameless cookie to browsers; its whole first
    part is returned, so that it is matched against labgate's names too.
    """
    return set_cookie.partition(b";")[0].partition(b"=")[0].strip(b" \t")


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection to one upstream."""

    __slots__ = (
        "address",
        "body_allowed",
        "body_left",
        "body_progress",
        "client",
        "closed",
        "counter",
        "ctx",
        "deadline",
        "done",
        "ex",
        "got_bytes",
        "head_read",
        "head_size",
        "in_head",
        "interim",
        "keep_alive",
        "key",
        "out",
        "parser",
        "reading_paused",
        "reason",
        "rechunk",
        "req_out",
        "requests",
        "resp_chunked",
        "resp_conn",
        "resp_headers",
        "resp_length",
        "resp_te",
        "reused",
        "stalled",
        "strip_session",
        "switching",
        "transport",
        "transport_write",
        "tunnel",
    )

    def __init__(self, ctx: Context, address: UpstreamAddress) -> None:
        self.ctx = ctx
        self.address = address
        #: The pool's key for ``address``, read once here rather than on every release.
        self.key = address.key
        self.transport: asyncio.Transport | None = None
        self.transport_write: Callable[[Buffer], None] = nowhere
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.counter: Counter | None = None
        self.tunnel: ClientConnection | None = None
        self.deadline = NEVER
        self.closed = False
        self.reused = False
        #: Requests this connection has carried (see ``pool_max_requests``).
        self.requests = 0
        self.reading_paused = False
        self.strip_session = False
        self.out: list[bytes] = []
        self.req_out: list[bytes] = []
        self._reset_response()

    def _reset_response(self) -> None:
        self.done = False
        self.got_bytes = False
        self.interim = False
        self.keep_alive = False
        self.body_allowed = True
        #: Bytes of a ``Content-Length`` body still to come once its head was read.
        self.body_left = 0
        self.rechunk = False
        self.switching = False  # a 101 to an upgrade request was passed on
        self.reason = b""
        self.in_head = True
        #: The head's bytes as read (while unfinished), and as its headers were parsed.
        self.head_read = 0
        self.head_size = 0
        self.resp_headers: list[bytes] = []
        self.resp_length: bytes | None = None
        self.resp_chunked = False
        self.resp_te: bytes | None = None
        self.resp_conn: bytes | None = None
        #: Body pieces parsed so far, and bytes read since the last one after the head: a
        #: trailer section is held to MAX_HEAD as the head is.
        self.body_progress = 0
        self.stalled = 0

    # --- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and register with the sweeper."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        #: Its ``write``, looked up once rather than on every request.
        self.transport_write = self.transport.write
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Tell the client side; a close-delimited body ends here."""
        self.closed = True
        self.ctx.connections.discard(self)
        self.ctx.pool.discard(self)
        if self.tunnel is not None:
            self.tunnel.tunnel_lost()
            return
        client, ex = self.client, self.ex
        if client is None or ex is None:
            return
        if ex.response_started and not self.done and self._close_delimited():
            if self.rechunk:
                self._to_client(LAST_CHUNK)
                self._flush()
            self.done = True
        if self.done:
            self._complete()
            return
        self.client = self.ex = None
        client.upstream_failed(self, ex, "closed the connection" if self.got_bytes else "hung up")

    def data_received(self, data: Buffer) -> None:
        """Parse the response and stream it to the client."""
        if self.tunnel is not None:
            self.tunnel.send(data)
            return
        if self.client is None:
            # Nothing is due on an idle connection: whatever this is, drop it.
            self.close()
            return
        if self.body_left:
            self._counted_body(data)
            return
        if not self.got_bytes and self.ctx.heads_in_c and isinstance(data, bytes):
            ex = self.ex
            if (
                ex is not None
                and ex.http11
                and ex.keep_alive
                and not (ex.close_after or ex.is_head or ex.is_upgrade or self.done)
            ):
                scanned = scan_response(data)
                if scanned is not None:
                    self._whole_response(data, ex, scanned[1], scanned[2])
                    return
        self.got_bytes = True
        self.deadline = self.ctx.now + self.ctx.response_timeout
        was_head, progress = self.in_head, self.body_progress
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.switching:
                self._switch(data[upgrade.args[0] :])
            elif self.done:
                # A 101 after the response asked for: extra bytes, dropped like any.
                self._complete()
            else:
                self._broken("switched protocols without being asked")
            return
        except httptools.HttpParserError as problem:
            self._broken(f"sent an invalid response ({problem})")
            return
        if self.done:
            self._complete()
            return
        if self.in_head:
            # A head still unfinished after MAX_HEAD bytes: llhttp would keep a header
            # value without end in memory.
            self.head_read += len(data)
            if self.head_read > MAX_HEAD:
                self._broken(f"sent a response head larger than {MAX_HEAD} bytes")
                return
        elif was_head or self.body_progress != progress:
            self.stalled = 0
        else:
            # Bytes that moved no body on (a trailer section that never ends, say).
            self.stalled += len(data)
            if self.stalled > MAX_HEAD:
                self._broken(f"sent more than {MAX_HEAD} bytes of trailers")
                return
        if self.out:
            self._flush()

    def eof_received(self) -> bool | None:
        """Let the transport close; :meth:`connection_lost` finishes the work."""
        return None

    def pause_writing(self) -> None:
        """The upstream is slow to read: stop reading from the client."""
        peer = self.tunnel or self.client
        if peer is not None:
            peer.pause_for_upstream()

    def resume_writing(self) -> None:
        """The upstream caught up."""
        peer = self.tunnel or self.client
        if peer is not None:
            peer.resume_for_upstream()

    # --- driven by the client side ------------------------------------------
    def start(self, client: ClientConnection, ex: Exchange) -> None:
        """Queue ``ex``'s head and whatever body is buffered (see :meth:`flush_request`)."""
        self.client, self.ex, self.counter = client, ex, ex.counter
        self.requests += 1
        self.strip_session = bool(ex.instance_id)
        self._reset_response()
        self.out.clear()
        self.deadline = self.ctx.now + self.ctx.response_timeout
        if client.write_paused:
            self.pause_reading()
        pending = self.req_out
        pending.append(ex.head)
        sent = len(ex.head)
        if ex.body_buf is not None:
            for piece in ex.body_buf:
                pending.append(chunk(piece) if ex.chunked else piece)
                sent += len(piece)
            ex.body_buf = None
            ex.body_buffered = 0
        if ex.body_done and ex.chunked:
            pending.append(LAST_CHUNK)
        if self.counter is not None:
            self.counter.bytes_in += sent

    def send_body(self, data: bytes, chunked: bool) -> None:
        """Queue a piece of request body."""
        self.req_out.append(chunk(data) if chunked else data)
        if self.counter is not None:
            self.counter.bytes_in += len(data)

    def end_body(self, chunked: bool) -> None:
        """The request body is complete."""
        if chunked:
            self.req_out.append(LAST_CHUNK)

    def flush_request(self) -> None:
        """Write what was queued for the upstream, in one syscall."""
        pending = self.req_out
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self.transport is not None and not self.closed:
            self.transport_write(data)

    def pause_reading(self) -> None:
        """Stop reading the response (the client is slow)."""
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the response again."""
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def detach(self) -> None:
        """The client went away mid-exchange: this connection cannot be reused."""
        self.client = self.ex = None
        self.close()

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def timeout(self) -> None:
        """Idle in the pool too long, or the upstream stopped answering."""
        client, ex = self.client, self.ex
        self.client = self.ex = None
        self.close()
        if client is not None and ex is not None:
            seconds = self.ctx.options.response_timeout
            client.upstream_timed_out(self, ex, f"did not answer within {seconds:g} seconds")

    # --- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        """A response (or an unexpected extra one) starts."""
        if self.done:
            # Bytes after the response we waited for: never reuse this connection, and pass
            # on nothing of them (every callback below ignores them).
            self.keep_alive = False

    def on_status(self, reason: bytes) -> None:
        """The reason phrase."""
        if not self.done:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep end-to-end headers; note framing and connection ones."""
        if self.done:
            return
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            raise httptools.HttpParserError(f"a response head larger than {MAX_HEAD} bytes")
        if len(name) not in _WATCHED_LENGTHS:
            headers = self.resp_headers
            headers.append(name)
            headers.append(_COLON)
            headers.append(value)
            headers.append(_CRLF)
            return
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"content-length":
                self.resp_length = value
            elif lname == b"transfer-encoding":
                self.resp_te = value if self.resp_te is None else self.resp_te + b"," + value
            elif lname == b"connection":
                self.resp_conn = value if self.resp_conn is None else self.resp_conn + b"," + value
            return
        if (
            self.strip_session
            and lname == b"set-cookie"
            and _cookie_name(value) in _LABGATE_COOKIES
        ):
            return  # a tool may not set (or clear) labgate's own cookies
        headers = self.resp_headers
        headers.append(name)
        headers.append(_COLON)
        headers.append(value)
        headers.append(_CRLF)

    def on_headers_complete(self) -> None:
        """Send the rewritten response head to the client."""
        if self.done:
            return  # an extra response after the one asked for: never passed on
        self.in_head = False  # until an interim response ends (_reset_response)
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        status = self.parser.get_status_code()
        if self.resp_te is not None:
            # Only chunked framing can be passed on: llhttp reads a body with any other coding
            # to the close, and the client could not undo the coding.
            if self.resp_te.strip().lower() != b"chunked":
                raise httptools.HttpParserError("a Transfer-Encoding other than chunked")
            self.resp_chunked = True
        headers = self._filtered_headers()
        if status < 200:
            if self.resp_chunked or (self.resp_length is not None and int(self.resp_length)):
                # llhttp would read it as a body and hand it on, bypassing the head's checks.
                raise httptools.HttpParserError(f"a {status} response with a body")
            if status == 101:
                if not ex.is_upgrade:
                    raise httptools.HttpParserError("101 to a request that did not ask for it")
                self.switching = True
                self._to_client(
                    b"".join([status_line(101, self.reason), *headers])
                    + b"Connection: Upgrade\r\nUpgrade: "
                    + (ex.upgrade or b"")
                    + b"\r\n\r\n"
                )
            else:
                self.interim = True
                if ex.http11:
                    self._to_client(b"".join([status_line(status, self.reason), *headers, b"\r\n"]))
            return
        self._observe(ex)
        self.keep_alive = self.parser.should_keep_alive()
        self.body_allowed = not (ex.is_head or status in _NO_BODY_STATUS)
        ok = status == 200 and self.reason == b"OK"
        head = [_OK_LINE if ok else status_line(status, self.reason), *headers]
        if not self.body_allowed:
            if self.resp_length is not None:
                head += [b"Content-Length: ", self.resp_length, b"\r\n"]
        elif self.resp_length is not None and not self.resp_chunked:
            head += [b"Content-Length: ", self.resp_length, b"\r\n"]
            self.body_left = int(self.resp_length)
        elif ex.http11:
            self.rechunk = True
            head.append(b"Transfer-Encoding: chunked\r\n")
        else:
            ex.close_after = True  # an HTTP/1.0 client reads to the end of the connection
        if ex.close_after or not ex.keep_alive:
            ex.close_after = True
            head.append(b"Connection: close\r\n")
        elif not ex.http11:
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        ex.response_started = True
        # The head's pieces go out joined with the body's, in the one write of this read.
        self.out += head
        if self.counter is not None:
            size = 0
            for piece in head:
                size += len(piece)
            self.counter.bytes_out += size
        if not self.body_allowed:
            # llhttp cannot be told a HEAD response has no body; finish here and
            # give this connection a fresh parser if it is reused.
            self.done = True
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        """Stream a piece of response body."""
        self.body_progress += 1
        if self.body_left:
            self.body_left -= len(data)
        if self.body_allowed and not self.done:
            self._to_client(chunk(data) if self.rechunk else data)
        else:
            # Body bytes where none may be (after a HEAD, a 204, a 304, or the response
            # asked for): dropped, and the connection is not reused.
            self.keep_alive = False

    def on_message_complete(self) -> None:
        """The response ended (or an interim one did)."""
        if self.interim:
            self._reset_response()
            self.got_bytes = True
            return
        if self.done:
            return
        if self.rechunk:
            self._to_client(LAST_CHUNK)
        self.done = True

    # --- internals -----------------------------------------------------------
    def _counted_body(self, data: Buffer) -> None:
        """Bytes of a ``Content-Length`` body: to the client as read.

        llhttp would hand them on as a copy (a new bytes object per read); the
        body's length is known, so they need no parsing. The parser, left
        waiting for them, is replaced when the body is complete. Bytes past
        the body's end are dropped, and the connection is not reused: the
        upstream said more than it was asked for.
        """
        self.deadline = self.ctx.now + self.ctx.response_timeout
        self.body_progress += 1
        self.stalled = 0
        left = self.body_left
        if len(data) > left:
            data = data[:left]
            self.keep_alive = False
        left = self.body_left = left - len(data)
        if self.counter is not None:
            self.counter.bytes_out += len(data)
        client = self.client
        if client is not None:
            client.write(data)
        if not left:
            self.done = True
            self.parser = httptools.HttpResponseParser(self)
            self._complete()

    def _whole_response(self, data: bytes, ex: Exchange, cut: int, cut_end: int) -> None:
        """A whole response in one read that ``scan_response`` passed: on to the client as is.

        The bytes read, less a ``Connection: keep-alive`` line
        (``data[cut:cut_end]``). What the httptools callbacks would send means
        the same: they rebuild each header line as ``Name: value`` and put
        ``Content-Length`` last, where these keep the tool's own lines, spacing
        and order.
        """
        self.got_bytes = True
        self.in_head = False
        self._observe(ex)
        self.keep_alive = True
        ex.response_started = True
        self._to_client(data[:cut] + data[cut_end:] if cut_end else data)
        self.done = True
        self._complete()

    def _observe(self, ex: Exchange) -> None:
        """Count the response's latency (a request routed to an instance has ``started``)."""
        if ex.started:
            self.ctx.observe(wall_clock() - ex.started)

    def _filtered_headers(self) -> list[bytes]:
        if self.resp_conn is None or self.resp_conn.lower() in _PLAIN_CONNECTION:
            return self.resp_headers
        listed = connection_tokens(self.resp_conn)
        listed -= {b"close", b"keep-alive", b"upgrade"}
        if not listed:
            return self.resp_headers
        kept: list[bytes] = []
        headers = self.resp_headers
        for i in range(0, len(headers), 4):
            if headers[i].lower() not in listed:
                kept += headers[i : i + 4]
        return kept

    def _close_delimited(self) -> bool:
        return self.body_allowed and self.resp_length is None and not self.resp_chunked

    def _to_client(self, data: bytes) -> None:
        # Collected while parsing and written once per read: one syscall, not one per piece.
        self.out.append(data)
        if self.counter is not None:
            self.counter.bytes_out += len(data)

    def _flush(self) -> None:
        out = self.out
        if not out:
            return
        client = self.client
        if len(out) == 1:
            data = out[0]
        elif len(out[-1]) >= _JOIN_BELOW and client is not None:
            # A large body piece after the head goes as it is, beside the joined head.
            body = out.pop()
            client.write_pair(b"".join(out), body)
            out.clear()
            return
        else:
            data = b"".join(out)
        out.clear()
        if client is not None:
            client.write(data)

    def _complete(self) -> None:
        self._flush()
        client, ex = self.client, self.ex
        self.client = self.ex = None
        self.counter = None
        if client is None or ex is None:
            self.close()
            return
        if self.keep_alive and ex.body_done and not ex.is_upgrade and not self.closed:
            self.ctx.pool.release(self)
        else:
            self.close()
        client.response_complete(ex)

    def _broken(self, reason: str) -> None:
        self._flush()
        client, ex = self.client, self.ex
        self.client = self.ex = None
        self.close()
        if client is not None and ex is not None:
            client.upstream_failed(self, ex, reason)

    def _switch(self, rest: Buffer) -> None:
        self._flush()
        client, ex = self.client, self.ex
        if (
            client is None
            or ex is None
            or not ex.is_upgrade
            or self.parser.get_status_code() != 101
        ):
            self._broken("switched protocols without being asked")
            return
        self.client = self.ex = None
        self.tunnel = client
        self.deadline = NEVER
        client.tunnel_open(self, ex, rest)

    def tunnel_send(self, data: Buffer) -> None:
        """Forward tunnelled bytes from the client."""
        if self.transport is not None and not self.closed:
            self.transport_write(data)


class UpstreamPool:
    """Idle keep-alive connections per upstream address, most recently used first."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.idle: dict[str, list[UpstreamConnection]] = {}

    def acquire(self, address: UpstreamAddress) -> UpstreamConnection | None:
        """An idle connection to ``address``, or None."""
        idle = self.idle.get(address.key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Keep ``conn`` for reuse, or close it when enough are idle."""
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = []
        if len(idle) >= self.ctx.pool_max_idle or conn.requests >= self.ctx.pool_max_requests:
            conn.close()
            return
        conn.resume_reading()  # to notice the upstream closing it
        conn.deadline = self.ctx.now + self.ctx.pool_idle_timeout
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a closed connection."""
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self.idle[conn.key]

    async def connect(self, address: UpstreamAddress) -> UpstreamConnection:
        """A new connection to ``address``; raises ``OSError`` or ``TimeoutError``."""
        if address.is_tunnel:
            conn: UpstreamConnection = self.ctx.site_tunnels.connect(
                address, lambda: UpstreamConnection(self.ctx, address)
            )
            return conn
        loop = asyncio.get_running_loop()
        timeout = self.ctx.options.connect_timeout
        if address.is_unix:
            # Not by its path: a local site's instance uid owns its socket's directory.
            with connectable(address.path) as where:
                _, conn = await wait_for(
                    loop.create_unix_connection(
                        lambda: UpstreamConnection(self.ctx, address), where
                    ),
                    timeout,
                )
        else:
            transport, conn = await wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self.ctx, address), address.host, address.port
                ),
                timeout,
            )
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # pragma: no cover - not a TCP socket after all
                    log.debug("router: TCP_NODELAY not set")
        return conn

    def close_all(self) -> None:
        """Close every idle connection."""
        for idle in list(self.idle.values()):
            for conn in list(idle):
                conn.close()
        self.idle.clear()
