"""The portal's end of the network sites: one :class:`SiteHub` holds every agent connection.

A network site is a ``sites`` row added with ``labgate site add`` (its
``kind`` is ``network``); its agent runs on the site's own machine and dials
out to the portal. The hub keeps one :class:`~labgate.agent.network.NetworkSiteLink`
per such site in the portal's ``links`` (connected or not), serves each
agent connection (:meth:`SiteHub.serve`), and cuts it when the site's token
is rotated or revoked.

What a connection brings is handed up through :class:`SiteEvents` (the
scheduler implements it): connected (with the hello), heartbeat, report,
disconnected. The hub never touches the database.

For a tunneled site the hub opens the instance tunnel's door at the router
and no more: each connection gets a random *epoch*, published to the routers
(``RouterControl.set_tunnel_site``) and withdrawn when the connection ends,
and the agent gets tickets for it (:class:`~labgate.security.TunnelTickets`)
after its hello and with every heartbeat. The tunnel's bytes go between the
agent and the router (:mod:`labgate.router.tunnel`), never through here.
With several routers the app gives the hub two callbacks
(:mod:`labgate.portal.tunnel_routers`): the addresses of the live routers,
sent with every ticket (the agent keeps a data connection to each), and where
each connection's epoch is recorded so that every portal's routers take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from labgate.agent import convert
from labgate.agent.link import SiteLink
from labgate.agent.network import ChannelClosed, NetworkSiteLink, Relay, Session
from labgate.aio import cancel_and_wait, wait_for
from labgate.wire.agent import (
    Ack,
    Heartbeat,
    Hello,
    ProtocolError,
    ReportEnvelope,
    Result,
    TunnelTicket,
    Welcome,
    dump,
    parse,
)
from labgate.wire.routes import RouterControl
from labgate.wire.site import Report

if TYPE_CHECKING:
    from labgate.security import TunnelTickets

log = logging.getLogger(__name__)

#: Close codes the portal ends a connection with (4000-4999: the application's own).
CLOSE_REVOKED = 4401
CLOSE_PROTOCOL = 4400
CLOSE_REPLACED = 4409
CLOSE_SILENT = 4408
CLOSE_SHUTDOWN = 4503
#: The site's reach changed: the agent connects again at once and is set up for the new one.
CLOSE_RECONFIGURED = 4205


class Channel(Protocol):
    """One agent connection as the hub uses it (a WebSocket, in the portal)."""

    async def send_text(self, data: str) -> None:
        """Send one text message."""

    async def receive(self) -> str | bytes:
        """The next message; raises :class:`ChannelClosed` when the connection is gone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """End the connection."""


class SiteEvents(Protocol):
    """What the hub tells the scheduler about its sites."""

    async def site_connected(self, site: str, hello: Hello) -> None:
        """An agent said hello: reconcile what it holds with what the portal knows."""

    async def site_heartbeat(self, site: str, beat: Heartbeat) -> None:
        """An agent is alive."""

    async def site_report(self, site: str, report: Report) -> None:
        """An agent reported on one of its site's instances."""

    async def site_disconnected(self, site: str, reason: str) -> None:
        """An agent's connection is gone."""


@dataclass(frozen=True)
class SiteInfo:
    """What the portal tells an agent about its site in the welcome."""

    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    group_root: str | None = None
    reach: str = "direct"


@dataclass
class _Connection:
    channel: Channel
    task: asyncio.Task[None] | None = None
    close_reason: str = ""


class SiteHub:
    """Every network site's link, and the agent connections behind them."""

    def __init__(
        self,
        links: dict[str, SiteLink],
        tools: Callable[[], list[dict[str, Any]]],
        *,
        heartbeat: float = 10.0,
        command_timeout: float = 30.0,
        routes: RouterControl | None = None,
        tickets: TunnelTickets | None = None,
    ) -> None:
        self.links = links
        self.tools = tools
        self.heartbeat = heartbeat
        self.command_timeout = command_timeout
        #: Where tunneled sites' epochs are published (the routers follow it).
        self.routes = routes
        self.tickets = tickets
        #: A tunnel ticket lives this long; a fresh one goes with every heartbeat.
        self.ticket_ttl = max(30.0, heartbeat * 6)
        #: The current epoch of each tunneled site whose agent is connected.
        self.epochs: dict[str, str] = {}
        #: Set by the app: where connections, reports and losses go.
        self.events: SiteEvents | None = None
        #: Set by the app: how links reach an agent connected to another portal.
        self.relay: Relay | None = None
        #: Set by the app: the addresses of the routers the agents dial (empty: the
        #: address the agent dialled the portal at).
        self.router_urls: Callable[[], Awaitable[list[str]]] | None = None
        #: Set by the app: records a site's epoch (site, new or None, the old one).
        self.epoch_changed: Callable[[str, str | None, str | None], Awaitable[None]] | None = None
        #: Set by the app: a site's link was made or remade (its instances' routes change
        #: with how the site is reached).
        self.registered: Callable[[str], Awaitable[None]] | None = None
        self._connections: dict[str, _Connection] = {}
        #: The last report applied per site: (boot, seq); a report at or below it is a resend.
        self._applied: dict[str, tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        #: Held while the links change: a replica's follow (read the rows, then apply
        #: them) and this portal's own adds and removals never interleave.
        self._changing = asyncio.Lock()

    # --- sites -----------------------------------------------------------------
    async def register(self, name: str, backend: str, reach: str) -> None:
        """Make the link of a network site (its agent may connect from now on)."""
        async with self._changing:
            await self._register(name, backend, reach)

    async def forget(self, name: str) -> None:
        """Cut the site's connection and drop its link (the site was removed)."""
        async with self._changing:
            await self._forget(name)

    async def follow(self, read: Callable[[], Awaitable[dict[str, tuple[str, str]]]]) -> None:
        """Make the links ``read`` says (name: backend, reach) and drop the network sites' others.

        What another replica added or removed. The read and what is made of it
        are one step: a site added here while the rows were read, not in them,
        is not dropped (its agent would hear it was revoked, and stop).
        """
        async with self._changing:
            rows = await read()
            for name, (backend, reach) in rows.items():
                await self._register(name, backend, reach)
            for name, link in list(self.links.items()):
                if isinstance(link, NetworkSiteLink) and name not in rows:
                    await self._forget(name)

    async def _register(self, name: str, backend: str, reach: str) -> None:
        link = self.links.get(name)
        if isinstance(link, NetworkSiteLink):
            if link.reach != reach:
                await self._reach_changed(name, link, reach)
            return
        if link is not None:
            await self._forget(name)
        self.links[name] = NetworkSiteLink(
            name,
            backend,
            reach=reach,
            command_timeout=self.command_timeout,
            relay=self.relay,
        )
        if self.registered is not None:
            await self.registered(name)

    async def cut(self, name: str, reason: str) -> None:
        """Close the site's agent connection now, if it has one (token rotated or revoked)."""
        connection = await self._close(name, CLOSE_REVOKED, reason)
        if connection is not None and connection.task is not None:
            connection.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection.task

    async def _close(self, name: str, code: int, reason: str) -> _Connection | None:
        """Close the site's agent connection with ``code`` and ``reason``; the connection."""
        connection = self._connections.get(name)
        if connection is not None:
            connection.close_reason = reason
            with contextlib.suppress(Exception):
                await connection.channel.close(code, reason)
        return connection

    async def _reach_changed(self, name: str, link: NetworkSiteLink, reach: str) -> None:
        """The site is reached another way now: its routes change, its agent reconnects.

        The link (and what waits on it) stays. The agent's connection is
        closed, not revoked: it dials again at once, and the new connection
        is set up for the new reach (a tunnel epoch and tickets, or none),
        while the old one's epoch is withdrawn as it ends.
        """
        log.info("site %s: reach %s -> %s; its agent reconnects", name, link.reach, reach)
        link.reach = reach
        await self._close(name, CLOSE_RECONFIGURED, f"the site's reach changed to {reach}")
        if self.registered is not None:
            await self.registered(name)

    async def _forget(self, name: str) -> None:
        await self.cut(name, "the site was removed")
        link = self.links.pop(name, None)
        if link is not None:
            await link.close()

    # --- a connection ------------------------------------------------------------
    async def serve(self, site: SiteInfo, channel: Channel) -> None:
        """Run one agent connection until it ends (the caller authenticated it for ``site``)."""
        link = self.links.get(site.name)
        if not isinstance(link, NetworkSiteLink):
            await channel.close(CLOSE_REVOKED, f"site {site.name} is not a network site")
            return
        previous = self._connections.get(site.name)
        if previous is not None:
            previous.close_reason = "a new connection"
            with contextlib.suppress(Exception):
                await previous.channel.close(CLOSE_REPLACED, "replaced by a new connection")
        connection = _Connection(channel, asyncio.current_task())
        self._connections[site.name] = connection
        session: Session | None = None
        reason = "the connection closed"
        epoch = ""
        try:
            hello = await self._handshake(site, channel)
            session = Session(send=channel.send_text, hello=hello)
            link.attach(session)
            if link.reach == "tunnel" and self.routes is not None and self.tickets is not None:
                epoch = secrets.token_hex(8)
                self.epochs[site.name] = epoch
                self.routes.set_tunnel_site(site.name, epoch)
                if self.epoch_changed is not None:
                    await self.epoch_changed(site.name, epoch, None)
                await self._ticket(site.name, epoch, channel)
            log.info(
                "site %s: agent %s connected from %s",
                site.name,
                hello.agent_version,
                hello.hostname,
            )
            self._spawn(self._connected(site.name, hello))
            await self._run(site.name, link, session, channel, epoch)
        except ChannelClosed:
            pass
        except ProtocolError as exc:
            reason = str(exc)
            log.warning("site %s: %s", site.name, exc)
            with contextlib.suppress(Exception):
                await channel.close(CLOSE_PROTOCOL, reason[:120])
        except asyncio.CancelledError:
            reason = connection.close_reason or "cancelled"
        finally:
            if connection.close_reason:
                reason = connection.close_reason
            if self._connections.get(site.name) is connection:
                del self._connections[site.name]
            if epoch and self.epochs.get(site.name) == epoch:
                # The door closes with the connection: the routers cut its data connections.
                del self.epochs[site.name]
                if self.routes is not None:
                    self.routes.remove_tunnel_site(site.name)
                if self.epoch_changed is not None:
                    self._spawn(self.epoch_changed(site.name, None, epoch))
            if session is not None:
                link.detach(session, reason)
                if link.session is None and self.events is not None and not self._closing:
                    log.info("site %s: agent disconnected (%s)", site.name, reason)
                    self._spawn(self.events.site_disconnected(site.name, reason))

    def _welcome(self, site: SiteInfo) -> Welcome:
        return Welcome(
            site=site.name,
            backend=site.backend,
            options=site.options,
            data_root=site.data_root,
            group_root=site.group_root,
            reach=site.reach,
            heartbeat=self.heartbeat,
            tools=self.tools(),
        )

    async def reconfigure(self, site: SiteInfo) -> bool:
        """Send the site's connected agent its settings again, in a new welcome.

        The agent applies what it can while connected (where its group
        volumes are, listed from its next heartbeat on) and says in its log
        what needs a restart (a changed backend or options). False when its
        agent is not connected to this portal (it gets them when it next
        connects).
        """
        connection = self._connections.get(site.name)
        if connection is None:
            return False
        try:
            await connection.channel.send_text(dump(self._welcome(site)))
        except Exception as exc:  # a connection going away: it reconnects with them
            log.info("site %s: new settings not sent (%s)", site.name, exc)
            return False
        return True

    async def _handshake(self, site: SiteInfo, channel: Channel) -> Hello:
        await channel.send_text(dump(self._welcome(site)))
        try:
            raw = await wait_for(channel.receive(), self.heartbeat * 3)
        except TimeoutError:
            raise ProtocolError("the agent sent no hello") from None
        message = parse(raw) if isinstance(raw, str) else None
        if not isinstance(message, Hello):
            raise ProtocolError("the agent's first message was not a hello")
        if message.site != site.name:
            raise ProtocolError(
                f"the agent says it is site {message.site!r}, but its token is site {site.name!r}"
            )
        return message

    async def _ticket(self, name: str, epoch: str, channel: Channel) -> None:
        """Send the agent a fresh ticket for its tunnel's data connections."""
        if self.tickets is not None:
            ticket = self.tickets.issue(name, epoch, self.ticket_ttl)
            routers = await self.router_urls() if self.router_urls is not None else []
            await channel.send_text(dump(TunnelTicket(ticket=ticket, routers=routers)))

    async def _run(
        self, name: str, link: NetworkSiteLink, session: Session, channel: Channel, epoch: str
    ) -> None:
        loop = asyncio.get_running_loop()
        heard = [loop.time()]  # when the agent was last heard from
        beats = asyncio.create_task(
            self._beat(name, channel, heard, epoch), name=f"heartbeat-{name}"
        )
        try:
            while True:
                # No timeout per message: the heartbeat task closes a connection
                # that is silent for three heartbeats.
                raw = await channel.receive()
                heard[0] = loop.time()
                if isinstance(raw, bytes):
                    raise ProtocolError("a binary message (protocol 2 carries none)")
                await self._message(name, link, session, channel, parse(raw))
        finally:
            await cancel_and_wait(beats)

    async def _message(
        self, name: str, link: NetworkSiteLink, session: Session, channel: Channel, message: Any
    ) -> None:
        events = self.events
        if isinstance(message, Result):
            session.resolve(message)
        elif isinstance(message, Heartbeat):
            link.reported_health = message.health
            if message.tools is not None:
                link.tools_changed(message.tools)
            if events is not None:
                await events.site_heartbeat(name, message)
        elif isinstance(message, ReportEnvelope):
            boot, seq = session.hello.boot, message.seq
            last = self._applied.get(name)
            if last is None or last[0] != boot or seq > last[1]:
                report = convert.report_of(message.report)
                if events is not None:
                    await events.site_report(name, report)
                self._applied[name] = (boot, seq)
            await channel.send_text(dump(Ack(seq=seq)))
        else:
            raise ProtocolError(f"unexpected {type(message).__name__} from the agent")

    async def _beat(self, name: str, channel: Channel, heard: list[float], epoch: str) -> None:
        """Send a heartbeat (and a fresh ticket) every interval; close a silent connection."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat)
            if loop.time() - heard[0] > self.heartbeat * 3:
                # Silent for three heartbeats: the agent or the path to it is gone.
                with contextlib.suppress(Exception):
                    await channel.close(CLOSE_SILENT, "no heartbeat")
                return
            with contextlib.suppress(Exception):
                await channel.send_text(dump(Heartbeat(time=time.time())))
                if epoch:
                    await self._ticket(name, epoch, channel)

    async def _connected(self, name: str, hello: Hello) -> None:
        if self.events is not None:
            await self.events.site_connected(name, hello)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("site hub task failed", exc_info=task.exception())

    def draining(self) -> None:
        """Portal shutdown begins: a connection that ends from now on is not reported gone."""
        self._closing = True

    async def close(self) -> None:
        """Portal shutdown: end every agent connection (agents reconnect to the next portal)."""
        self._closing = True
        for name, connection in list(self._connections.items()):
            connection.close_reason = "portal shutdown"
            with contextlib.suppress(Exception):
                await connection.channel.close(CLOSE_SHUTDOWN, "the portal is shutting down")
            if connection.task is not None:
                connection.task.cancel()
            self._connections.pop(name, None)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
