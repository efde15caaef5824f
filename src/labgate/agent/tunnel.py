"""The agent's end of the instance tunnel: data connections to the router, streams to instances.

For a site with ``reach = "tunnel"`` the router reaches instances through
*data connections* the agent dials out to the router's public port (the
format and flow control are :mod:`labgate.wire.tunnel`; the router's end is
:mod:`labgate.router.tunnel`). The portal hands the agent a short-lived
ticket over the control connection (:class:`~labgate.wire.agent.TunnelTicket`),
with the addresses of the routers to reach (several ``labgate router``
processes: every one may receive a user's request); :class:`TunnelDialer`
keeps one data connection per router and router process with it, redialling
after any loss (a growing pause, up to :data:`MAX_PAUSE`) while the control
connection lives, and drops a router the portal no longer lists.

On each data connection (:class:`AgentTunnel`) the router opens streams;
the agent opens a connection to the instance's endpoint, as its own records
say (the router never names an address), and refuses streams to instances
it does not hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from labgate.aio import cancel_and_wait, wait_for
from labgate.safefs import connectable
from labgate.wire.routes import parse_upstream
from labgate.wire.tunnel import (
    MAX_OPEN,
    OPEN,
    OPENED,
    REFUSED,
    TUNNEL_PATH,
    UPGRADE,
    WINDOW,
    WINDOW_HEADER,
    WINDOW_RANGE,
    WORKER_HEADER,
    SocketStream,
    TunnelEnd,
    TunnelStream,
    roomy,
)

__all__ = ["AgentTunnel", "RouterDialer", "TunnelDialer", "TunnelRefused"]

log = logging.getLogger(__name__)

#: Seconds the agent waits for an instance to accept a connection.
CONNECT_TIMEOUT = 10.0
#: Seconds a data connection may take to open (TCP, TLS and the router's answer).
DIAL_TIMEOUT = 15.0
#: Longest pause between failed dials of one router.
MAX_PAUSE = 5.0
#: Largest answer head the router sends before switching.
MAX_ANSWER = 16 * 1024

Resolve = Callable[[str], str | None]


def peer_window(said: str) -> int:
    """The router's receive window from its answer's header (:data:`WINDOW` when it says
    none, or a figure outside :data:`WINDOW_RANGE`)."""
    low, high = WINDOW_RANGE
    if said.isascii() and said.isdigit() and len(said) <= 9 and low <= int(said) <= high:
        return int(said)
    return WINDOW


def open_instance(body: bytes) -> str:
    """The instance id an OPEN's body names; raises ValueError, KeyError, TypeError or
    RecursionError (a body nested too deeply) when it names none.

    A body longer than :data:`MAX_OPEN` is not parsed at all.
    """
    if len(body) > MAX_OPEN:
        raise ValueError(f"{len(body)} bytes, more than {MAX_OPEN}")
    instance_id = json.loads(body)["instance_id"]
    if not isinstance(instance_id, str):
        raise TypeError("instance_id is not a string")
    return instance_id


class TunnelRefused(Exception):
    """The router did not take the data connection (its answer says why)."""


class AgentTunnel(TunnelEnd, asyncio.Protocol):
    """One data connection, on the agent's side: opens a connection to the instance per OPEN.

    ``resolve(instance_id)`` is the agent's own record of the instance's
    endpoint (``http://HOST:PORT`` or ``unix:/path``), None when it has none.
    The connection starts with the upgrade request; :attr:`switched` resolves
    to the router's worker (``i/N``) once it answered 101.
    """

    def __init__(self, resolve: Resolve) -> None:
        super().__init__()
        self.resolve = resolve
        self.transport: asyncio.Transport | None = None
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self._head = b""
        self.worker = ""
        loop = asyncio.get_running_loop()
        self.switched: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # --- the data connection -----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; the caller sends the upgrade request."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """The router's answer, then frames."""
        if self._write is not None:
            self.feed(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_ANSWER:
                self._refused("an answer head too large")
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            body = rest.decode("utf-8", "replace").strip()
            self._refused(f"{lines[0]}: {body[:200]}")
            return
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        self.worker = headers.get(WORKER_HEADER.lower(), "0/1")
        self.send_window = peer_window(headers.get(WINDOW_HEADER.lower(), ""))
        transport = self.transport
        if transport is None:
            return
        self.attach(transport.writelines, transport.get_write_buffer_size)
        if not self.switched.done():
            self.switched.set_result(self.worker)
        if rest:
            self.feed(rest)

    def _refused(self, why: str) -> None:
        if not self.switched.done():
            self.switched.set_exception(TunnelRefused(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream ends with the connection."""
        self.transport = None
        self.detach("the data connection closed")
        if not self.switched.done():
            self.switched.set_exception(TunnelRefused(f"the connection closed ({exc})"))
        if not self.closed.done():
            self.closed.set_result(None)

    def lost(self, reason: str) -> None:
        """End the connection."""
        self.close()

    def close(self) -> None:
        """Close the data connection (its streams end at once)."""
        transport = self.transport
        self.detach("closed")
        if transport is not None:
            transport.abort()

    def detach(self, reason: str) -> None:
        """The connection is gone: stop connecting to instances too."""
        for task in list(self._connecting.values()):
            task.cancel()
        super().detach(reason)

    # --- streams -------------------------------------------------------------
    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        """OPEN from the router; anything else ends the connection."""
        if kind != OPEN:
            super().control(kind, stream_id, stream, body)
            return
        try:
            instance_id = open_instance(body)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            self._refuse(stream_id, "?", f"bad OPEN: {exc}")
            return
        if stream is not None:
            self._refuse(stream_id, instance_id, "stream id in use")
            return
        endpoint = self.resolve(instance_id)
        if endpoint is None:
            self._refuse(stream_id, instance_id, f"no instance {instance_id} on this site")
            return
        try:
            address = parse_upstream(endpoint)
            if address.is_tunnel:
                raise ValueError("an instance's endpoint cannot be a tunnel")
        except ValueError as exc:
            self._refuse(stream_id, instance_id, f"bad endpoint: {exc}")
            return
        stream = SocketStream(self, stream_id, instance_id, opening=False)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        task = asyncio.get_running_loop().create_task(
            self._connect(stream, address.host, address.port, address.path)
        )
        self._connecting[stream_id] = task
        task.add_done_callback(lambda _: self._connecting.pop(stream_id, None))

    def _refuse(self, stream_id: int, instance_id: str, reason: str) -> None:
        self.streams_refused += 1
        log.warning("tunnel: refused a stream to instance %s: %s", instance_id, reason)
        self.put(REFUSED, stream_id, reason.encode())

    async def _connect(self, stream: SocketStream, host: str, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            if path:
                # Not by its path: the instance's uid owns the socket's directory.
                with connectable(path) as where:
                    connecting = loop.create_unix_connection(lambda: stream, where)
                    await wait_for(connecting, CONNECT_TIMEOUT)
            else:
                connecting = loop.create_connection(lambda: stream, host, port)
                await wait_for(connecting, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            if self.streams.get(stream.id) is stream:
                self.forget(stream)
                self._refuse(stream.id, stream.instance_id, f"cannot connect: {exc}")
            return
        if self.streams.get(stream.id) is stream:
            self.put(OPENED, stream.id)

    def forget(self, stream: TunnelStream) -> None:
        """Drop a finished stream (and stop connecting it)."""
        super().forget(stream)
        task = self._connecting.get(stream.id)
        if task is not None and stream.transport is None:
            task.cancel()


async def dial(url: str, ticket: str, resolve: Resolve) -> AgentTunnel:
    """Open one data connection to the router at ``url`` (the portal's public address)."""
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    loop = asyncio.get_running_loop()
    tunnel = AgentTunnel(resolve)
    context = ssl.create_default_context() if secure else None
    transport, _ = await wait_for(
        loop.create_connection(lambda: tunnel, host, port, ssl=context), DIAL_TIMEOUT
    )
    roomy(transport)
    authority = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/")
    if path.endswith("/api/v1/agent/connect"):
        path = path[: -len("/api/v1/agent/connect")]
    transport.write(
        (
            f"GET {path}{TUNNEL_PATH} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\n"
            f"Authorization: Bearer {ticket}\r\n\r\n"
        ).encode()
    )
    try:
        await wait_for(asyncio.shield(tunnel.switched), DIAL_TIMEOUT)
    except BaseException:
        tunnel.close()
        raise
    return tunnel


class TunnelDialer:
    """Keeps a data connection to every router (each of its processes) while there is a ticket.

    :meth:`update` with each ticket the portal sends (the latest is used for
    the next dial) and the routers it lists (empty: ``url``, the address the
    agent reaches the portal at); a router no longer listed loses its data
    connections. :meth:`stop` when the control connection ends (the routers
    close the data connections themselves then, too).
    """

    def __init__(self, url: str, resolve: Resolve, *, retry: float = 0.5) -> None:
        self.url = url
        self.resolve = resolve
        self.retry = retry
        self.ticket = ""
        #: One dialler per router address.
        self.routers: dict[str, RouterDialer] = {}
        self.dials = 0
        self.last_error = ""
        self._stopping: set[asyncio.Task[None]] = set()

    def update(self, ticket: str, routers: list[str] | None = None) -> None:
        """A fresh ticket and the routers to reach: dial with it from now on."""
        self.ticket = ticket
        wanted = list(dict.fromkeys(routers or [])) or [self.url]
        for url in [u for u in self.routers if u not in wanted]:
            log.info("agent: router %s is no longer listed: closing its data connections", url)
            task = asyncio.get_running_loop().create_task(self.routers.pop(url).stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for url in wanted:
            self.routers.setdefault(url, RouterDialer(self, url)).start()

    async def stop(self) -> None:
        """Close every data connection and stop dialling."""
        self.ticket = ""
        routers, self.routers = list(self.routers.values()), {}
        for router in routers:
            await router.stop()
        if self._stopping:
            await asyncio.wait(list(self._stopping))

    @property
    def tunnels(self) -> dict[tuple[str, str], AgentTunnel]:
        """Every data connection, by router address and router process (``i/N``)."""
        return {
            (url, worker): tunnel
            for url, router in self.routers.items()
            for worker, tunnel in router.tunnels.items()
        }

    @property
    def streams_refused(self) -> int:
        """Streams refused on every data connection (tests)."""
        return sum(t.streams_refused for t in self.tunnels.values())


class RouterDialer:
    """The data connections to one router address: one per router process behind it."""

    def __init__(self, owner: TunnelDialer, url: str) -> None:
        self.owner = owner
        self.url = url
        #: Data connections by router worker (``i/N``).
        self.tunnels: dict[str, AgentTunnel] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Dial (again) unless dialling already."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"tunnel-dialer {self.url}"
            )

    async def stop(self) -> None:
        """Close this router's data connections and stop dialling it."""
        await cancel_and_wait(self._task)
        self._task = None
        for tunnel in list(self.tunnels.values()):
            tunnel.close()
        self.tunnels.clear()

    async def _run(self) -> None:
        owner = self.owner
        wanted = 1
        pause = owner.retry
        while owner.ticket:
            for worker in [w for w, t in self.tunnels.items() if not t.connected]:
                del self.tunnels[worker]
            if len(self.tunnels) >= wanted:
                closed = [t.closed for t in self.tunnels.values()]
                await asyncio.wait(closed, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                owner.dials += 1
                tunnel = await dial(self.url, owner.ticket, owner.resolve)
            except (OSError, TimeoutError, TunnelRefused) as exc:
                error = f"{self.url}: {exc or type(exc).__name__}"
                # A router that stays unreachable is said once, not every few seconds.
                level = logging.DEBUG if error == owner.last_error else logging.WARNING
                owner.last_error = error
                log.log(level, "agent: tunnel data connection failed: %s", error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue
            pause = owner.retry
            _, _, count = tunnel.worker.partition("/")
            wanted = int(count) if count.isdigit() and int(count) > 0 else 1
            if tunnel.worker in self.tunnels:
                # SO_REUSEPORT sent it to a router process that has one: dial again.
                tunnel.close()
                await asyncio.sleep(0.01)
                continue
            self.tunnels[tunnel.worker] = tunnel
            log.info(
                "agent: tunnel data connection to router %s (%s) open", self.url, tunnel.worker
            )
