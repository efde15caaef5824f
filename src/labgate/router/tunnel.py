"""The router's end of the instance tunnel: agents' data connections, streams to instances.

A tunneled network site's agent dials a *data connection* to the router's
public port: ``GET /api/v1/agent/tunnel`` with ``Upgrade: labgate-tunnel``
and ``Authorization: Bearer <ticket>``. The ticket comes from the portal over
the agent's control connection (:class:`~labgate.security.TunnelTickets`);
the router checks it in memory (signature, expiry) and takes it only while
its epoch is the site's current one in the route table
(``RouteTable.tunnel_sites``, fed by the portal). Then the connection carries
tunnel frames (:mod:`labgate.wire.tunnel`) and nothing else.

A route whose upstream is ``tunnel:SITE/ID`` is reached through that site's
data connection: :meth:`SiteTunnels.connect` gives the proxy an ordinary
:class:`~labgate.router.upstream.UpstreamConnection` whose transport is a
:class:`Pipe` to a :class:`~labgate.wire.tunnel.TunnelStream`. So a tunneled
byte crosses this process once (read from the agent's socket, written to the
client's), in the router's own event loop, and the proxy's HTTP, WebSocket,
pooling and back-pressure work unchanged.

Only the router opens streams, and only for the instance its own route
names, on the connection of the route's own site: an agent cannot reach
another site's instances, nor any instance the route table does not send it.
A data connection is closed when its site's epoch changes or goes (the
agent's control connection ended, its token was rotated or revoked).

With several router processes (``router_workers``) each holds its own data
connection per site: the answer names the worker (``Labgate-Tunnel-Worker:
i/N``) and the agent keeps dialling until it has one to every worker. It
also says the router's receive window per stream (``Labgate-Tunnel-Window``,
:data:`~labgate.wire.tunnel.ROUTER_WINDOW`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from labgate.security import TunnelTickets
from labgate.wire.tunnel import (
    OPEN,
    OPENED,
    REFUSED,
    ROUTER_WINDOW,
    UPGRADE,
    WINDOW_HEADER,
    WORKER_HEADER,
    PipeStream,
    TunnelEnd,
    TunnelStream,
    roomy,
)

if TYPE_CHECKING:
    from labgate.router.upstream import UpstreamConnection
    from labgate.wire.routes import RouteTable, UpstreamAddress

log = logging.getLogger("labgate.router.tunnel")

#: Data connections kept per site and router process.
MAX_PER_SITE = 4


class Pipe:
    """A transport that hands what its owner writes straight to a peer protocol, in process.

    Two pipes join an :class:`UpstreamConnection` and a :class:`TunnelStream`:
    each is the other's transport. Pausing reading on one pauses writing of
    the other, as a socket pair's buffers would, without the socket pair.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.owner: asyncio.Protocol | None = None
        self.peer: asyncio.Protocol | None = None
        self.other: Pipe | None = None
        self.closed = False

    # --- asyncio.Transport, as the owner uses it ------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hand ``data`` to the peer at once."""
        if not self.closed and self.peer is not None:
            self.peer.data_received(data)  # type: ignore[arg-type]  # a Buffer, see http.Buffer

    def writelines(self, chunks: list[bytes]) -> None:
        """Hand several pieces to the peer."""
        self.write(b"".join(chunks))

    def pause_reading(self) -> None:
        """The owner wants no more for now: the peer stops writing."""
        if not self.closed and self.peer is not None:
            self.peer.pause_writing()

    def resume_reading(self) -> None:
        """The owner reads again."""
        if not self.closed and self.peer is not None:
            self.peer.resume_writing()

    def is_reading(self) -> bool:
        """Always (pausing is passed on)."""
        return not self.closed

    def can_write_eof(self) -> bool:
        """Yes: a half-close is passed on."""
        return True

    def write_eof(self) -> None:
        """The owner is done writing: the peer hears EOF (and closes unless it keeps open)."""
        if self.closed or self.peer is None:
            return
        if not self.peer.eof_received():
            self.close()

    def get_write_buffer_size(self) -> int:
        """Nothing is ever buffered here."""
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """No buffer, no limits."""

    def is_closing(self) -> bool:
        """Whether the pipe is closed."""
        return self.closed

    def close(self) -> None:
        """Close both directions; both protocols hear ``connection_lost`` soon."""
        if self.closed:
            return
        self.closed = True
        other = self.other
        if other is not None:
            other.closed = True
        for protocol in (self.owner, self.peer):
            if protocol is not None:
                self.loop.call_soon(protocol.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Nothing to tell (no socket, no peer address)."""
        return default


def join(loop: asyncio.AbstractEventLoop, a: asyncio.Protocol, b: asyncio.Protocol) -> None:
    """Connect two protocols with a pair of :class:`Pipe` (``a`` first hears connection_made)."""
    to_b, to_a = Pipe(loop), Pipe(loop)
    to_b.owner, to_b.peer, to_b.other = a, b, to_a
    to_a.owner, to_a.peer, to_a.other = b, a, to_b
    a.connection_made(cast(asyncio.Transport, to_b))
    b.connection_made(cast(asyncio.Transport, to_a))


class SiteTunnel(TunnelEnd, asyncio.BufferedProtocol):
    """One agent's data connection, on the router's side: it opens the streams.

    The connection is read into reused buffers (:meth:`TunnelEnd.get_buffer`):
    no bytes object per read, and a large DATA frame reaches its stream in
    one piece per read.
    """

    def __init__(self, tunnels: SiteTunnels, site: str, epoch: str) -> None:
        super().__init__(receive_window=ROUTER_WINDOW)
        self.tunnels = tunnels
        self.site = site
        self.epoch = epoch
        self.transport: asyncio.Transport | None = None
        self._next_id = 0

    # --- the data connection -----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Carry streams on this connection."""
        self.transport = cast(asyncio.Transport, transport)
        self.attach(self.transport.writelines, self.transport.get_write_buffer_size)

    def data_received(self, data: bytes) -> None:
        """Frames from the agent."""
        self.feed(data)

    def eof_received(self) -> bool | None:
        """The agent is gone: close."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream ends with the connection."""
        self.transport = None
        self.detach("the data connection closed")
        self.tunnels.gone(self)

    def lost(self, reason: str) -> None:
        """End the connection."""
        self.close(reason)

    def close(self, reason: str) -> None:
        """Close the data connection (its streams end at once)."""
        log.info("tunnel of site %s: closed (%s)", self.site, reason)
        transport = self.transport
        self.detach(reason)
        self.tunnels.gone(self)
        if transport is not None:
            transport.abort()

    # --- streams -------------------------------------------------------------
    def open(self, instance_id: str, upstream: UpstreamConnection) -> None:
        """A new stream to ``instance_id`` with ``upstream`` as its near end."""
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        while self._next_id in self.streams:  # after 2**32 streams
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        stream = PipeStream(self, self._next_id, instance_id, opening=True)
        join(asyncio.get_running_loop(), stream, upstream)

    def opening(self, stream: TunnelStream) -> bool:
        """Announce a stream (False: no connection, refuse)."""
        if self._write is None:
            return False
        self.streams[stream.id] = stream
        self.streams_opened += 1
        self.put(OPEN, stream.id, json.dumps({"instance_id": stream.instance_id}).encode())
        return True

    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        """OPENED and REFUSED from the agent; anything else ends the connection."""
        if kind == OPENED:
            return
        if kind == REFUSED:
            if stream is not None:
                self.streams_refused += 1
                log.info(
                    "tunnel of site %s: the agent refused a stream to %s: %s",
                    self.site,
                    stream.instance_id,
                    body.decode("utf-8", "replace"),
                )
                stream.refused()
            return
        super().control(kind, stream_id, stream, body)


class SiteTunnels:
    """The data connections of one router process, one per site."""

    def __init__(self, table: RouteTable, tickets: TunnelTickets | None, worker: str = "0/1"):
        self.table = table
        self.tickets = tickets
        self.worker = worker
        #: Per site, its open data connections, newest last (new streams go there).
        self.sites: dict[str, list[SiteTunnel]] = {}
        self.refused = 0
        table.on_tunnel_site_changed(self._epoch_changed)

    def admit(self, authorization: bytes | None, upgrade: bytes | None) -> tuple[str, str] | str:
        """``(site, epoch)`` of a data connection request, or why it is refused."""
        if upgrade is None or upgrade.strip().lower() != UPGRADE.encode():
            return f"this path takes only Upgrade: {UPGRADE}"
        if self.tickets is None:
            return "this router takes no tunnels"
        scheme, _, ticket = (authorization or b"").decode("latin-1").partition(" ")
        claim = self.tickets.check(ticket.strip()) if scheme.lower() == "bearer" else None
        if claim is None:
            return "no valid tunnel ticket"
        site, epoch = claim
        if self.table.tunnel_sites.get(site) != epoch:
            return f"the ticket's connection of site {site} is not the current one"
        return site, epoch

    def adopt(self, transport: asyncio.Transport, site: str, epoch: str, rest: bytes) -> None:
        """Answer 101 and make ``transport`` site ``site``'s data connection."""
        if self.table.tunnel_sites.get(site) != epoch:  # changed since admitted
            transport.abort()
            return
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
            + UPGRADE.encode()
            + b"\r\n"
            + WORKER_HEADER.encode()
            + b": "
            + self.worker.encode()
            + b"\r\n"
            + WINDOW_HEADER.encode()
            + b": %d\r\n\r\n" % ROUTER_WINDOW
        )
        tunnel = SiteTunnel(self, site, epoch)
        # An older one keeps the streams it carries (an agent redialling to reach
        # another router process lands here again now and then), up to a few.
        open_ = self.sites.setdefault(site, [])
        open_.append(tunnel)
        while len(open_) > MAX_PER_SITE:
            open_.pop(0).close("too many data connections")
        roomy(transport)
        transport.set_protocol(tunnel)
        tunnel.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()
        if rest:
            tunnel.data_received(rest)
        log.info("tunnel of site %s: data connection open", site)

    def connect(self, address: UpstreamAddress, make: Callable[[], UpstreamConnection]) -> Any:
        """An upstream connection to a tunneled instance; raises OSError when the site is away."""
        open_ = self.sites.get(address.site)
        tunnel = open_[-1] if open_ else None
        if tunnel is None or not tunnel.connected:
            raise ConnectionRefusedError(f"the tunnel of site {address.site} is not connected")
        upstream = make()
        tunnel.open(address.instance, upstream)
        return upstream

    def gone(self, tunnel: SiteTunnel) -> None:
        """A data connection closed."""
        open_ = self.sites.get(tunnel.site)
        if open_ and tunnel in open_:
            open_.remove(tunnel)
            if not open_:
                del self.sites[tunnel.site]

    def _epoch_changed(self, site: str) -> None:
        epoch = self.table.tunnel_sites.get(site)
        for tunnel in list(self.sites.get(site, ())):
            if tunnel.epoch != epoch:
                tunnel.close("the agent's control connection ended")

    def close(self) -> None:
        """Close every data connection."""
        for open_ in list(self.sites.values()):
            for tunnel in list(open_):
                tunnel.close("the router is stopping")
        self.sites.clear()
