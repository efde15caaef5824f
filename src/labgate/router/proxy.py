"""The client side of the router: one asyncio protocol per browser or API connection.

Requests are parsed with httptools as bytes arrive. When a request head is
complete it is checked (framing, target, then for ``/i/<id>/…`` credentials,
route and access list) and either answered by the router itself or sent to
an upstream connection from the pool, with the body streamed after it.
Requests pipelined behind one in progress are queued and served in order;
reading pauses while they wait. Back-pressure runs both ways: a full write
buffer on one side pauses reading on the other. After a ``101`` the
connection becomes a tunnel to the upstream, bytes spliced both ways.

Reasons to stop reading from the client are bits of ``pauses``; reading
resumes only when none is left.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import httptools

from labgate.router import handoff, pages
from labgate.router.activity import Counter
from labgate.router.auth import Credentials, Identity
from labgate.router.context import NEVER, Context, log
from labgate.router.exchange import (
    Exchange,
    HeadMemo,
    instance_block,
    instance_head,
    portal_head,
)
from labgate.router.forwarded import client_address, is_trusted_proxy
from labgate.router.hosts import InstanceHosts
from labgate.router.http import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_TARGET,
    Buffer,
    nowhere,
    scan_request,
    wall_clock,
)
from labgate.router.upstream import UpstreamConnection
from labgate.security import HANDOFF_PATH, tossed_cookie_clearers
from labgate.wire.routes import NO_ENDPOINT, Route, UpstreamAddress
from labgate.wire.tunnel import TUNNEL_PATH

_TUNNEL_TARGET: Final = TUNNEL_PATH.encode()
_LABGATE_PATH: Final = b"/_labgate/"
_HANDOFF_TARGET: Final = HANDOFF_PATH.encode()

PAUSE_PIPELINE: Final = 1
PAUSE_UPSTREAM: Final = 2
PAUSE_BUFFER: Final = 4
PAUSE_UPGRADE: Final = 8
PAUSE_BROKEN: Final = 16


#: What :attr:`ClientConnection.seen_address` holds before the first route is seen.
_NO_ADDRESS: Final = UpstreamAddress()


class ClientConnection(asyncio.Protocol):
    """One downstream HTTP/1.1 connection."""

    __slots__ = (
        "allowed_identity",
        "allowed_route",
        "auth_authorization",
        "auth_cookie",
        "auth_creds",
        "auth_generation",
        "auth_identity",
        "block",
        "block_authorization",
        "block_client",
        "block_creds",
        "block_host",
        "block_identity",
        "block_prefixed",
        "block_route",
        "body_pieces",
        "broken",
        "closed",
        "closing",
        "connect_task",
        "counter",
        "ctx",
        "current",
        "deadline",
        "ex",
        "head_bytes",
        "in_feed",
        "in_next",
        "memo",
        "parser",
        "pauses",
        "peer",
        "proto",
        "queue",
        "raw_head",
        "reading_head",
        "seen_address",
        "seen_id",
        "seen_route",
        "seen_running",
        "stalled",
        "transport",
        "transport_write",
        "trusted_peer",
        "tunnel",
        "tunnel_creds",
        "tunnel_id",
        "tunnel_identity",
        "tunnel_on_host",
        "upgrade_buf",
        "upgrade_buffered",
        "upstream",
        "write_paused",
    )

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.transport_write: Callable[[Buffer], None] = nowhere
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.ex: Exchange | None = None
        self.current: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.upstream: UpstreamConnection | None = None
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_id = ""
        #: Who opened the tunnel (a WebSocket) to an instance, with the credentials that
        #: proved it and whether on the instance's own host: checked again when
        #: credentials change or the identity's time runs out (check_tunnel).
        self.tunnel_identity: Identity | None = None
        self.tunnel_creds: Credentials | None = None
        self.tunnel_on_host = False
        self.upgrade_buf: list[bytes] | None = None
        self.upgrade_buffered = 0
        self.counter: Counter | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.pauses = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        self.broken = False
        self.in_next = False
        self.in_feed = False
        self.reading_head = False
        self.head_bytes = 0
        self.raw_head = 0
        #: Body pieces parsed, and bytes read since the last one after a head: trailers
        #: are held to what a head may take.
        self.body_pieces = 0
        self.stalled = 0
        self.deadline = NEVER
        self.peer = b"unknown"
        self.trusted_peer = False
        self.proto = ctx.options.forwarded_proto.encode()
        # What this connection's last request decided, for the next one with the same
        # credentials (a kept-alive client sends the same ones every time): who sent them
        # (valid while the table's generation stays), that they may use the route (the
        # route and identity are immutable: the same pair gets the same answer), and
        # the lines of the head built from them (see labgate.router.exchange).
        self.auth_cookie: bytes | None = None
        self.auth_authorization: bytes | None = None
        self.auth_generation = -1
        self.auth_identity: Identity | None = None
        self.auth_creds: Credentials | None = None
        self.allowed_route: Route | None = None
        self.allowed_identity: Identity | None = None
        self.block = b""
        #: The route it last sent a request on, and what of it the hot path reads.
        self.seen_route: Route | None = None
        self.seen_id = ""
        self.seen_running = False
        self.seen_address = _NO_ADDRESS
        #: Its last request head's Host and target, as validated (:class:`HeadMemo`).
        self.memo = HeadMemo()
        self.block_route: Route | None = None
        self.block_identity: Identity | None = None
        self.block_creds: Credentials | None = None
        self.block_prefixed = False
        self.block_client = b""
        self.block_host: bytes | None = None
        self.block_authorization: bytes | None = None

    # --- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the sweeper; a first request head is due soon."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        #: Its ``write``, looked up once rather than on every response.
        self.transport_write = self.transport.write
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
            self.trusted_peer = is_trusted_proxy(self.peer, self.ctx.options.trusted_proxies)
        self.deadline = self.ctx.now + self.ctx.header_timeout
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Close whatever this connection had open upstream."""
        self.closed = self.closing = True
        self.ctx.connections.discard(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.close()
            self._tunnel_closed()
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            upstream.detach()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.queue.clear()
        self.current = self.ex = None
        self.parser = None

    def data_received(self, data: bytes) -> None:
        """Feed the parser, or the tunnel."""
        if self.tunnel is not None:
            self.tunnel.tunnel_send(data)
            counter = self.counter
            if counter is not None:
                counter.bytes_in += len(data)
                # WebSocket traffic is use of the instance (idle culling), to the sweep's second.
                if counter.last_request < self.ctx.wall:
                    counter.last_request = self.ctx.wall
            return
        if self.upgrade_buf is not None:
            # Bytes after an upgrade request wait for the upstream's answer.
            self.upgrade_buf.append(data)
            self.upgrade_buffered += len(data)
            if self.upgrade_buffered > self.ctx.buffer_limit:
                self._pause(PAUSE_UPGRADE)
            return
        parser = self.parser
        if parser is None or self.broken or self.closing:
            return
        if self.ex is None and self.ctx.heads_in_c and isinstance(data, bytes):
            # Between requests (httptools holds nothing): whole heads without a body are
            # read in one pass in C; the rest of the bytes go to httptools as always.
            data = self._scan_requests(data)
            if not data or self.parser is None or self.broken or self.closing:
                if self.upstream is not None:
                    self.upstream.flush_request()
                return
        if self.reading_head:
            self.raw_head += len(data)
        was_head, pieces = self.reading_head, self.body_pieces
        self.in_feed = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            self.upgrade_buf = [rest] if rest else []
            self.upgrade_buffered = len(rest)
        except httptools.HttpParserCallbackError:
            self._handling_failed()
        except httptools.HttpParserError as problem:
            self._malformed(400, f"malformed request: {problem}")
        else:
            # A head that never ends is refused before it can fill memory.
            if self.reading_head and self.raw_head > 4 * MAX_HEAD:
                self._malformed(431, "the request head is too large")
            elif was_head or self.ex is None or self.body_pieces != pieces:
                self.stalled = 0
            else:
                # Bytes that moved no body on: the trailers of a chunked body, say.
                self.stalled += len(data)
                if self.stalled > 4 * MAX_HEAD:
                    self._malformed(431, "the request's trailers are too large")
        finally:
            self.in_feed = False
        # Everything parsed from this read goes upstream in one write.
        if self.upstream is not None:
            self.upstream.flush_request()

    def eof_received(self) -> bool | None:
        """A half-closed client still gets the response it is waiting for."""
        if self.tunnel is None and self.current is not None and self.current.body_done:
            self.current.close_after = True
            return True
        return None

    def pause_writing(self) -> None:
        """The client is slow to read: stop reading from the upstream."""
        self.write_paused = True
        upstream = self.tunnel or self.upstream
        if upstream is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up."""
        self.write_paused = False
        upstream = self.tunnel or self.upstream
        if upstream is not None:
            upstream.resume_reading()

    # --- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        """A new request starts."""
        self.ex = Exchange()
        self.reading_head = True
        self.head_bytes = self.raw_head = 0
        if self.current is None:
            self.deadline = self.ctx.now + self.ctx.header_timeout

    def on_url(self, url: bytes) -> None:
        """(Part of) the request target."""
        ex = self.ex
        if ex is not None:
            ex.target += url
            self.head_bytes += len(url)
            if len(ex.target) > MAX_TARGET:
                ex.fail(414, "the request target is too long")
                ex.target = b"/"

    def on_header(self, name: bytes, value: bytes) -> None:
        """Pick out the headers the router decides on; keep the rest for forwarding."""
        ex = self.ex
        if ex is None or not self.reading_head:
            # Trailers of a chunked body: never forwarded (they would change a head
            # already checked and, when queued behind another request, not yet sent).
            return
        ex.header_count += 1
        self.head_bytes += len(name) + len(value)
        if ex.header_count > MAX_HEADERS or self.head_bytes > MAX_HEAD:
            ex.fail(431, "too many or too large request headers")
            return
        ex.add_header(name, value)

    def on_headers_complete(self) -> None:
        """Check the head, then serve it now or queue it behind the one in progress."""
        ex, parser = self.ex, self.parser
        if ex is None or parser is None:
            return
        self.reading_head = False
        ex.method = parser.get_method()
        version = parser.get_http_version()
        ex.http11 = version == "1.1"
        ex.keep_alive = parser.should_keep_alive()
        ex.is_upgrade = parser.should_upgrade()
        ex.is_head = ex.method == b"HEAD"
        if version not in ("1.0", "1.1"):
            ex.fail(400, f"HTTP/{version} is not supported here")
        self._head_read(ex)

    def _scan_requests(self, data: bytes) -> bytes:
        """Serve the requests at the start of ``data`` that ``scan_request`` reads whole.

        Each is what httptools' callbacks would have made of it, in the same
        order (head checked and served or queued, then its end). Returns the
        bytes from the first head it does not read (often none).
        """
        while data:
            scanned = scan_request(data)
            if scanned is None:
                return data
            (
                end,
                method,
                target,
                http11,
                connection,
                host,
                cookie,
                authorization,
                origin,
                fetch_site,
                browser,
                content_length_zero,
                kept,
            ) = scanned
            ex = Exchange()
            ex.method, ex.target, ex.http11, ex.is_head = method, target, http11, method == b"HEAD"
            ex.keep_alive = connection != 2 if http11 else connection == 1
            ex.host, ex.host_count = host, 1
            ex.cookie, ex.authorization = cookie, authorization
            ex.auth_count = 0 if authorization is None else 1
            ex.origin, ex.fetch_site, ex.browser = origin, fetch_site, browser
            if content_length_zero:
                ex.content_length, ex.cl_count = 0, 1
            ex.kept = kept
            self.ex = ex
            self.reading_head = False
            self.stalled = 0
            self.in_feed = True
            try:
                self._head_read(ex)
                if self.ex is ex:
                    self.on_message_complete()
            except Exception:  # what httptools reports as HttpParserCallbackError
                self._handling_failed()
                return b""
            finally:
                self.in_feed = False
            if self.parser is None or self.broken or self.closing or self.upgrade_buf is not None:
                return b""
            data = data[end:]
        return data

    def _handling_failed(self) -> None:
        """Code of the router's own failed on a request: logged, and answered 500."""
        log.exception("router: handling a request failed")
        self._malformed(500, "the router failed to handle this request")

    def _head_read(self, ex: Exchange) -> None:
        """A complete request head: serve it now or queue it behind the one in progress."""
        ex.validate(self.memo)
        if self.current is None:
            self.current = ex
            self.deadline = NEVER
            self._serve(ex)
        elif len(self.queue) >= self.ctx.options.max_pipelined:
            self._close()
        else:
            self.queue.append(ex)
            self._pause(PAUSE_PIPELINE)

    def on_body(self, data: bytes) -> None:
        """Stream, buffer or drop a piece of request body."""
        ex = self.ex
        if ex is None:
            return
        self.body_pieces += 1
        if ex.discard:
            ex.discarded += len(data)
            if ex.discarded > self.ctx.options.discard_limit:
                self._close()
            else:
                self.deadline = self.ctx.now + self.ctx.header_timeout
            return
        if ex is self.current and self.upstream is not None:
            self.upstream.send_body(data, ex.chunked)
            return
        if ex.body_buf is None:
            ex.body_buf = [data]
        else:
            ex.body_buf.append(data)
        ex.body_buffered += len(data)
        if ex.body_buffered > self.ctx.buffer_limit:
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        """The request body is complete."""
        ex = self.ex
        if ex is None:
            return
        self.ex = None
        ex.body_done = True
        if ex is not self.current:
            return
        if self.upstream is not None:
            self.upstream.end_body(ex.chunked)
        elif ex.response_done:
            self._finish(ex)

    # --- serving -------------------------------------------------------------
    def _client(self, ex: Exchange) -> bytes:
        """The client's address: the peer, or the one a trusted proxy names."""
        if not self.trusted_peer or ex.forwarded_for is None:
            return self.peer
        return client_address(self.peer, ex.forwarded_for, self.ctx.options.trusted_proxies)

    def _serve(self, ex: Exchange) -> None:
        if ex.error is not None:
            status, detail = ex.error
            self._reply(ex, status, detail)
            return
        if ex.is_upgrade:
            ex.close_after = True  # unless the upstream switches, the connection ends
        info = ex.target_info
        hosts = self.ctx.hosts
        if hosts is not None and ex.host is not None:
            host_instance = hosts.instance_of(ex.host)
            if host_instance is not None:
                self._serve_host(ex, hosts, host_instance)
                return
            if info is not None and info.instance_id:
                # Instances live on their own hosts: never under the portal's origin.
                location = hosts.url(info.instance_id).encode("latin-1") + (info.tail or b"/")
                self._answer(ex, lambda close: pages.redirect(location, 302, close=close))
                return
        if ex.target == _TUNNEL_TARGET:
            self._site_tunnel(ex)
            return
        if info is None or info.instance_id is None:
            ex.counter = self.ctx.portal_counter
            ex.head = portal_head(ex, self._client(ex), self.proto)
            self._proxy(ex, self.ctx.portal)
            return
        ctx = self.ctx
        now = wall_clock()
        identity, creds = self._check(ex, now)
        if identity is None:
            if ctx.auth.lacks_access_scope(creds, now):
                detail = "this API token lacks the instances:access scope"
                self._reply(ex, 403, detail, code="insufficient_scope")
            elif ex.browser and ex.method in (b"GET", b"HEAD"):
                login = ctx.options.login_path
                self._answer(ex, lambda close: pages.login_redirect(login, ex.target, close=close))
            else:
                detail = "log in, or send an API token with the instances:access scope"
                self._reply(ex, 401, detail)
            return
        instance_id = info.instance_id
        route = ctx.table.routes.get(instance_id) if instance_id else None
        if route is None or not self._may_access(identity, route):
            if route is not None and ctx.auth.needs_own_origin(identity, route):
                # An admin or a share with a portal session: told why, not "no such instance".
                self._reply(
                    ex,
                    403,
                    own_origin_detail(instance_id),
                    code="needs_instance_host",
                    title="Another user's instance",
                )
            else:
                self._reply(ex, 404, f"there is no instance {instance_id!r} of yours here")
            return
        if not info.tail:
            path, sep, query = ex.target.partition(b"?")
            location = path + b"/" + sep + query
            self._answer(ex, lambda close: pages.redirect(location, 302, close=close))
            return
        self._to_instance(ex, route, identity, creds, now, prefixed=True)

    def _serve_host(self, ex: Exchange, hosts: InstanceHosts, instance_id: str) -> None:
        """A request to an instance's own host name (``instance_host``)."""
        ctx = self.ctx
        ex.portal_base = ctx.options.portal_url
        route = ctx.table.routes.get(instance_id)
        if route is None:
            self._reply(ex, 404, f"there is no instance {instance_id!r} here")
            return
        secure = self.proto == b"https"
        now = wall_clock()
        if ex.target.startswith(_LABGATE_PATH):
            if ex.target.partition(b"?")[0] != _HANDOFF_TARGET or ex.method != b"GET":
                self._reply(ex, 404, "no such page")
                return
            done = handoff.finish(ctx.auth, hosts, route, ex.target, ex.cookie, now, secure=secure)
            if isinstance(done, handoff.Redirect):
                location, cookies = done
                self._answer(
                    ex,
                    lambda close: pages.redirect(location, 302, close=close, cookies=cookies),
                )
            else:
                self._reply(ex, *done)
            return
        identity, creds = ctx.auth.check_instance(
            instance_id, hosts, ex.cookie, ex.authorization, now
        )
        if identity is None:
            if ctx.auth.lacks_access_scope(creds, now):
                detail = "this API token lacks the instances:access scope"
                self._reply(ex, 403, detail, code="insufficient_scope")
            elif len(creds.sessions) > 1 and creds.token is None and ex.browser:
                # A sibling instance host tossed an instance cookie in (Domain=<parent>, any
                # Path): neither counts, and a hand-off would only come back here again.
                host = hosts.netloc(instance_id).partition(":")[0]
                name = ctx.auth.instance_cookie
                path = ex.target.decode("latin-1")
                cleared = tuple(
                    line.encode("latin-1")
                    for line in tossed_cookie_clearers(name, host, secure=secure, path=path)
                )
                detail = tossed_detail(name)
                self._reply(ex, 400, detail, title="Two instance cookies", cookies=cleared)
            elif ex.browser and ex.method in (b"GET", b"HEAD"):
                portal, target = ctx.options.portal_url, ex.target
                self._answer(
                    ex,
                    lambda close: handoff.start(
                        ctx.auth, hosts, portal, instance_id, target, secure=secure, close=close
                    ),
                )
            else:
                detail = "send an API token with the instances:access scope"
                self._reply(ex, 401, detail)
            return
        if not self._may_access(identity, route):
            self._reply(ex, 404, f"there is no instance {instance_id!r} of yours here")
            return
        self._to_instance(ex, route, identity, creds, now, prefixed=False)

    def _to_instance(
        self,
        ex: Exchange,
        route: Route,
        identity: Identity,
        creds: Credentials,
        now: float,
        *,
        prefixed: bool,
    ) -> None:
        """Send an authorized request on to its instance (or say why it cannot go yet)."""
        ctx = self.ctx
        if route is not self.seen_route:
            # A route is frozen: what the hot path reads of it is read once per route.
            self.seen_route = route
            self.seen_id = route.instance_id
            self.seen_running = route.state == "running"
            self.seen_address = route.address
        instance_id = self.seen_id
        if ex.from_elsewhere():
            self._reply(
                ex,
                403,
                f"a page of another site or instance may not open a WebSocket to instance "
                f"{instance_id} nor change anything there",
            )
            return
        if not self.seen_running:
            if route.state == "unreachable" and route.upstream != NO_ENDPOINT:
                ex.away = True  # its agent is away; the tool itself may still answer
            else:
                if route.state == "unreachable":
                    detail = away_detail(instance_id)
                else:
                    detail = f"instance {instance_id} is starting; this page reloads by itself"
                self._reply(ex, 503, detail, retry_after=ctx.options.retry_after)
                return
        counter = ctx.activity.counter(instance_id)
        counter.last_request = now
        counter.users[identity.user_id] = now
        ctx.requests += 1
        ex.started = now
        ex.counter = counter
        ex.instance_id = instance_id
        client = self._client(ex)
        if not (
            route is self.block_route
            and identity is self.block_identity
            and creds is self.block_creds
            and prefixed == self.block_prefixed
            and client == self.block_client
            and ex.host == self.block_host
            and ex.authorization == self.block_authorization
        ):
            self.block = instance_block(
                ex, route, identity, creds, client, self.proto, prefixed=prefixed
            )
            self.block_route, self.block_identity, self.block_creds = route, identity, creds
            self.block_prefixed, self.block_client = prefixed, client
            self.block_host, self.block_authorization = ex.host, ex.authorization
        ex.head = instance_head(
            ex, route, identity, creds, client, self.proto, prefixed=prefixed, block=self.block
        )
        self._proxy(ex, self.seen_address)

    def _check(self, ex: Exchange, now: float) -> tuple[Identity | None, Credentials]:
        """``Authenticator.check`` of ``ex``'s credentials, kept for the next request.

        Kept on the same terms as the authenticator's own cache: until the
        table's generation moves (a revocation cuts the next request) or the
        identity's own expiry passes.
        """
        ctx = self.ctx
        generation = ctx.table.generation
        creds = self.auth_creds
        identity = self.auth_identity
        if (
            creds is not None
            and generation == self.auth_generation
            and ex.cookie == self.auth_cookie
            and ex.authorization == self.auth_authorization
            and (identity is None or now < identity.valid_until)
        ):
            return identity, creds
        identity, creds = ctx.auth.check(ex.cookie, ex.authorization, now)
        self.auth_cookie, self.auth_authorization = ex.cookie, ex.authorization
        self.auth_generation, self.auth_identity, self.auth_creds = generation, identity, creds
        return identity, creds

    def _may_access(self, identity: Identity, route: Route) -> bool:
        """``Authenticator.may_access``, kept for the pair last allowed."""
        if route is self.allowed_route and identity is self.allowed_identity:
            return True
        if not self.ctx.auth.may_access(identity, route):
            return False
        self.allowed_route, self.allowed_identity = route, identity
        return True

    def _site_tunnel(self, ex: Exchange) -> None:
        """An agent's data connection: checked here, then this socket is the tunnel's."""
        admitted = self.ctx.site_tunnels.admit(ex.authorization, ex.upgrade)
        if isinstance(admitted, str):
            self.ctx.site_tunnels.refused += 1
            log.warning(
                "router: tunnel connection from %s refused: %s", self.peer.decode(), admitted
            )
            ex.close_after = True
            self._reply(ex, 403, admitted)
            return
        # The bytes after the head are collected once the parser returns: hand over then.
        asyncio.get_running_loop().call_soon(self._hand_over, admitted)

    def _hand_over(self, admitted: tuple[str, str]) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        rest = b"".join(self.upgrade_buf or [])
        self.upgrade_buf = None
        self.closed = self.closing = True  # this protocol is done with the socket
        self.ctx.connections.discard(self)
        self.parser = None
        self.current = self.ex = None
        self.transport = None
        self.transport_write = nowhere
        self.ctx.site_tunnels.adopt(transport, *admitted, rest)

    def _proxy(self, ex: Exchange, address: UpstreamAddress) -> None:
        ex.address = address
        conn = self.ctx.pool.acquire(address)
        if conn is not None:
            self._attach(ex, conn)
        else:
            loop = asyncio.get_running_loop()
            self.connect_task = loop.create_task(self._connect(ex, address))

    async def _connect(self, ex: Exchange, address: UpstreamAddress) -> None:
        ctx = self.ctx
        failure: OSError | None = None
        # Nothing of the request has left the router before a connection is open, so a
        # portal replica that refuses it (restarting, gone) is safely stood in for by the next.
        for candidate in ctx.portals_from(address):
            try:
                conn = await ctx.pool.connect(candidate)
            except OSError as problem:  # TimeoutError included
                failure = problem
                continue
            if candidate != address:
                log.warning("router: portal %s cannot be reached; using %s", address, candidate)
                ctx.portal = ex.address = candidate
            break
        else:
            self.connect_task = None
            if address.is_tunnel:
                # No data connection of the site's agent here (yet): to the user that is
                # the site not being connected, answered now (labgate.router.tunnel).
                ex.away = True
            if isinstance(failure, TimeoutError):
                seconds = ctx.options.connect_timeout
                self._upstream_error(
                    ex, 504, f"did not accept a connection within {seconds:g} seconds"
                )
            else:
                last = failure or OSError("no address")
                reason = (last.strerror or str(last) or type(last).__name__).lower()
                self._upstream_error(ex, 502, f"cannot be reached ({reason})")
            return
        self.connect_task = None
        if candidate in ctx.portals and ctx.portal_connected is not None:
            ctx.portal_connected()  # a portal answers: a route stream waiting may go now
        if self.closing or ex is not self.current:
            conn.close()
            return
        if conn.closed:
            self._upstream_error(ex, 502, "closed the connection at once")
            return
        self._attach(ex, conn)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.start(self, ex)
        if not self.in_feed:
            conn.flush_request()
        self._resume(PAUSE_BUFFER)

    def _answer(self, ex: Exchange, build: Callable[[bool], bytes]) -> None:
        """Answer ``ex`` from the router; ``build(close)`` makes the response bytes."""
        ex.response_started = ex.response_done = True
        if not ex.keep_alive:
            ex.close_after = True
        if not ex.body_done and ex.has_body:
            too_big = (ex.content_length or 0) > self.ctx.options.discard_limit
            if ex.expect_continue or too_big:
                ex.close_after = True  # do not wait for a body we will not use
            else:
                self._discard_body(ex)
        answer = build(ex.close_after)
        if ex.is_head:
            # A HEAD answer has no body, whatever page was built (a redirect's has one): a
            # client reads the bytes after its head as the start of the next response.
            answer = answer[: answer.find(b"\r\n\r\n") + 4]
        self.write(answer)
        if ex.close_after:
            self._close()
        elif ex.body_done:
            self._finish(ex)

    def _reply(
        self,
        ex: Exchange,
        status: int,
        detail: str,
        *,
        retry_after: int | None = None,
        code: str | None = None,
        title: str | None = None,
        cookies: tuple[bytes, ...] = (),
    ) -> None:
        browser, base = ex.browser, ex.portal_base
        self._answer(
            ex,
            lambda close: pages.error(
                status,
                detail,
                browser=browser,
                close=close,
                retry_after=retry_after,
                code=code,
                base=base,
                title=title,
                cookies=cookies,
            ),
        )

    def _upstream_error(self, ex: Exchange, status: int, reason: str) -> None:
        if ex is not self.current or self.closing:
            return
        if ex.response_started:
            self._close()  # the response is cut short; only closing says so
            return
        if ex.away:
            retry_after = self.ctx.options.retry_after
            self._reply(ex, 503, away_detail(ex.instance_id), retry_after=retry_after)
            return
        what = f"Instance {ex.instance_id}" if ex.instance_id else "The portal"
        self._reply(ex, status, f"{what} {reason}.")

    def _finish(self, ex: Exchange) -> None:
        self.current = None
        if ex.close_after or self.broken:
            self._close()
            return
        ctx = self.ctx
        timeout = ctx.header_timeout if self.reading_head else None
        self.deadline = ctx.now + (timeout or ctx.keepalive_timeout)
        self._resume(PAUSE_UPSTREAM)
        self._next()

    def _next(self) -> None:
        if self.in_next:
            return
        self.in_next = True
        try:
            while self.current is None and self.queue and not self.closing:
                ex = self.queue.popleft()
                if not self.queue:
                    self._resume(PAUSE_PIPELINE)
                self.current = ex
                self.deadline = NEVER
                self._serve(ex)
        finally:
            self.in_next = False

    def _malformed(self, status: int, detail: str) -> None:
        """Stop parsing; answer once the exchange in progress (if any) is over."""
        self.broken = True
        self._pause(PAUSE_BROKEN)
        current = self.current
        if current is not None and current is self.ex:
            # The request being served is itself broken (its body, say).
            if current.response_started:
                self._close()
                return
            if self.upstream is not None:
                upstream, self.upstream = self.upstream, None
                upstream.detach()
            current.close_after = True
            self._reply(current, status, detail)
            return
        bad = Exchange()
        bad.fail(status, detail)
        bad.body_done = bad.close_after = True
        if current is None:
            self.current = bad
            self._serve(bad)
        else:
            self.queue.append(bad)

    # --- called by the upstream side ----------------------------------------
    def write(self, data: Buffer) -> None:
        """Write to the client unless the connection is going away."""
        if not self.closing and self.transport is not None:
            self.transport_write(data)

    def write_pair(self, head: bytes, body: Buffer) -> None:
        """Write a head and a large body piece in one write, without joining them."""
        if not self.closing and self.transport is not None:
            self.transport.writelines((head, body))

    def response_complete(self, ex: Exchange) -> None:
        """The upstream finished its response (and let go of its connection)."""
        if ex is not self.current:
            return
        self.upstream = None
        ex.response_done = True
        self._resume(PAUSE_UPSTREAM)
        if ex.body_done:
            self._finish(ex)
        elif ex.close_after:
            self._close()
        else:
            # The upstream answered before the upload ended: read the rest and drop it.
            self._discard_body(ex)

    def _discard_body(self, ex: Exchange) -> None:
        """Read the rest of ``ex``'s body and drop it, as long as it keeps coming."""
        ex.discard = True
        ex.body_buf = None
        # Each piece must come within the head's timeout, or the connection ends.
        self.deadline = self.ctx.now + self.ctx.header_timeout

    def upstream_failed(self, conn: UpstreamConnection, ex: Exchange, reason: str) -> None:
        """The upstream connection broke before a complete response."""
        if ex is not self.current or self.closing:
            return
        self.upstream = None
        if conn.reused and not conn.got_bytes and not ex.retried and not ex.has_body:
            # A pooled connection the upstream had just closed: try once on a fresh one.
            ex.retried = True
            loop = asyncio.get_running_loop()
            self.connect_task = loop.create_task(self._connect(ex, conn.address))
            return
        self._upstream_error(ex, 502, reason)

    def upstream_timed_out(self, conn: UpstreamConnection, ex: Exchange, reason: str) -> None:
        """The upstream stayed silent too long."""
        if ex is self.current:
            self.upstream = None
            self._upstream_error(ex, 504, reason)

    def pause_for_upstream(self) -> None:
        """The upstream's write buffer is full."""
        self._pause(PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        """The upstream's write buffer drained."""
        self._resume(PAUSE_UPSTREAM)

    def tunnel_open(self, conn: UpstreamConnection, ex: Exchange, rest: Buffer) -> None:
        """The upstream switched protocols: splice the two connections."""
        self.tunnel, self.upstream, self.current = conn, None, None
        self.parser = None
        self.deadline = NEVER
        # Who opened it: the upgrade request was the last one sent to an instance, so the
        # head block was built (or kept) for its identity and credentials.
        identity, creds, on_host = self.block_identity, self.block_creds, not self.block_prefixed
        # No request follows on a tunnel: what was kept for the next one is let go.
        self.auth_creds = self.auth_identity = None
        self.auth_cookie = self.auth_authorization = None
        self.allowed_route = self.block_route = None
        self.allowed_identity = self.block_identity = None
        self.block_creds = None
        self.block = b""
        counter = self.counter = ex.counter
        if counter is not None:
            counter.bytes_out += len(rest)
            if ex.instance_id:
                counter.open_websockets += 1
                self.tunnel_id = ex.instance_id
                self.tunnel_identity, self.tunnel_creds = identity, creds
                self.tunnel_on_host = on_host
                self.ctx.tunnels.setdefault(ex.instance_id, set()).add(self)
                if identity is not None:
                    self._expire_at(identity.valid_until, time.time())
        if rest:
            self.write(rest)
        pending, self.upgrade_buf = self.upgrade_buf or [], None
        for piece in pending:
            conn.tunnel_send(piece)
            if counter is not None:
                counter.bytes_in += len(piece)
        self._resume(PAUSE_UPGRADE)
        if self.write_paused:
            conn.pause_reading()

    def send(self, data: Buffer) -> None:
        """Tunnelled bytes from the upstream."""
        self.write(data)
        counter = self.counter
        if counter is not None:
            counter.bytes_out += len(data)
            if counter.last_request < self.ctx.wall:
                counter.last_request = self.ctx.wall

    def tunnel_lost(self) -> None:
        """The upstream end of the tunnel closed."""
        self.tunnel = None
        self._tunnel_closed()
        self._close()

    def close(self) -> None:
        """Close this connection (flushing what is already written)."""
        self._close()

    def timeout(self) -> None:
        """Idle too long between requests, or too slow sending a head.

        For a WebSocket to an instance: the time its credentials held ran out.
        """
        if self.tunnel_identity is not None:
            self.check_tunnel(time.time())
        else:
            self._close()

    def check_tunnel(self, now: float) -> None:
        """Check the credentials that opened this WebSocket again, as a new request's.

        Closed when a request with them would no longer be let into the
        instance (``Authenticator.recheck``); otherwise it goes on until what
        they prove now runs out.
        """
        if self.tunnel is None or self.closing:
            return
        identity, creds, ctx = self.tunnel_identity, self.tunnel_creds, self.ctx
        again: Identity | None = None
        if identity is not None and creds is not None:
            route = ctx.table.routes.get(self.tunnel_id)
            hosts = ctx.hosts if self.tunnel_on_host else None
            again = ctx.auth.recheck(identity, creds, route, hosts, now)
        if again is None:
            self._close()
            return
        self.tunnel_identity = again
        self._expire_at(again.valid_until, now)

    # --- internals -----------------------------------------------------------
    def _expire_at(self, valid_until: float, now: float) -> None:
        """Time this WebSocket out (the sweeper's deadline) when ``valid_until`` passes."""
        if valid_until == NEVER:
            self.deadline = NEVER
        else:
            self.deadline = time.monotonic() + (valid_until - now)

    def _tunnel_closed(self) -> None:
        counter, self.counter = self.counter, None
        instance_id, self.tunnel_id = self.tunnel_id, ""
        self.tunnel_identity = self.tunnel_creds = None
        tunnels = self.ctx.tunnels.get(instance_id) if instance_id else None
        if tunnels is not None and self in tunnels:
            tunnels.discard(self)
            if counter is not None:
                counter.open_websockets -= 1
            if not tunnels:
                del self.ctx.tunnels[instance_id]

    def _pause(self, reason: int) -> None:
        if not self.pauses and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self.pauses |= reason

    def _resume(self, reason: int) -> None:
        if self.pauses & reason:
            self.pauses &= ~reason
            if not self.pauses and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            upstream.detach()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.transport is not None:
            self.transport.close()


def tossed_detail(name: str) -> str:
    """What a browser that sent an instance host two instance cookies called ``name`` is told."""
    return (
        f"This browser sent two {name} cookies to this instance: a page of another "
        "instance set one for a parent domain, so neither counts. The copies set for parent "
        "domains were cleared with this answer: open the instance again from labgate. If this "
        "page comes back, clear this site's cookies in your browser."
    )


def own_origin_detail(instance_id: str) -> str:
    """Why a portal session does not open another user's instance under ``/i/<id>/``."""
    return (
        f"Instance {instance_id} is not yours. Here instances open under the portal's own "
        "address, where a tool's pages could act on labgate in the name of whoever opens "
        "them, so labgate opens one in the browser only for its owner. Another user's "
        "instance (shared with you, or any for an administrator) opens in the browser only "
        "when each instance has an address of its own (the operator's instance_host "
        "setting). A script can reach it with an API token with the instances:access scope "
        "(Authorization: token lg_...)."
    )


def away_detail(instance_id: str) -> str:
    """What the 503 of an instance whose site's agent is away says."""
    return (
        f"instance {instance_id} cannot be reached: its site is not connected to "
        "labgate right now; it may still be running there. This page reloads by itself"
    )
