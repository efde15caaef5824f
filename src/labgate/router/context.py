"""What every connection of one router shares: options, state, pool, clock.

Timeouts are enforced by one sweeper per router that wakes every second and
closes whatever is past its ``deadline`` (a float per connection; ``inf``
means none). Setting a deadline is one attribute store on the hot path,
instead of a timer handle per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from labgate.aio import cancel_and_wait
from labgate.router.activity import ActivityLog, Counter
from labgate.router.auth import Authenticator
from labgate.router.hosts import InstanceHosts
from labgate.router.http import NEVER, log
from labgate.router.tunnel import SiteTunnels
from labgate.router.upstream import UpstreamPool
from labgate.security import TunnelTickets
from labgate.wire.routes import RouteTable, UpstreamAddress
from labgate.wire.stats import RouterStats

__all__ = ["NEVER", "Context", "RouterOptions", "log"]


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """Knobs of the proxy; the defaults suit a gateway in front of interactive tools."""

    login_path: str = "/login"
    """Portal page a browser without a session is sent to (with ``?next=``)."""
    forwarded_proto: str = "http"
    """``X-Forwarded-Proto`` value: the scheme of the public URL."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks of proxies in front whose ``X-Forwarded-For`` names the client."""
    connect_timeout: float = 10.0
    """Seconds to open a connection to an upstream before answering 504."""
    response_timeout: float = 300.0
    """Seconds an upstream may stay silent while a response is due or streaming."""
    header_timeout: float = 30.0
    """Seconds a client has to send a complete request head."""
    keepalive_timeout: float = 75.0
    """Seconds an idle client connection is kept between requests."""
    pool_idle_timeout: float = 3.0
    """Seconds an idle upstream connection is kept (below common tool keep-alives)."""
    pool_max_idle: int = 64
    """Idle connections kept per upstream."""
    buffer_limit: int = 256 * 1024
    """Bytes buffered per direction before reading from the other side pauses."""
    discard_limit: int = 1024 * 1024
    """Request body bytes read and dropped after an early answer before closing instead."""
    max_pipelined: int = 64
    """Pipelined requests queued on one connection before it is closed."""
    retry_after: int = 2
    """``Retry-After`` seconds (and page refresh) while an instance is starting."""
    sweep_interval: float = 1.0
    """Seconds between deadline checks."""
    worker_index: int = 0
    """Which of the router processes sharing the public port this is (0 first)."""
    worker_count: int = 1
    """How many router processes share the public port (agents' tunnels reach each)."""
    instance_host: str = ""
    """``instance_host`` template (``{id}.apps.example.org``); empty: instances under ``/i/``."""
    instance_base_url: str = ""
    """An instance's public URL with ``{id}`` in it (scheme, host, port) when on its own host."""
    portal_url: str = ""
    """The portal's public URL: where a browser on an instance host goes for the hand-off."""


class Timed(Protocol):
    """A connection the sweeper can time out."""

    deadline: float

    def timeout(self) -> None:
        """The deadline passed: answer or close."""


class Context:
    """State shared by the connections of one router (one per process)."""

    def __init__(
        self,
        table: RouteTable,
        auth: Authenticator,
        portal: UpstreamAddress,
        options: RouterOptions,
        activity: ActivityLog | None = None,
        tickets: TunnelTickets | None = None,
        other_portals: tuple[UpstreamAddress, ...] = (),
    ) -> None:
        self.table = table
        self.auth = auth
        #: Where portal traffic goes now: the first replica that accepted a connection.
        self.portal = portal
        #: Every portal replica, in the order given; a refused connection moves to the next.
        self.portals = (portal, *(p for p in other_portals if p != portal))
        self.options = options
        #: Instances on their own host names, or None (under ``/i/<id>/``).
        self.hosts = (
            InstanceHosts(options.instance_host, options.instance_base_url)
            if options.instance_host
            else None
        )
        self.activity = activity or ActivityLog()
        self.portal_counter = Counter()
        self.stats = RouterStats()
        self.now = time.monotonic()
        #: Wall clock as of the last sweep: tunnelled bytes mark activity with it, cheaply.
        self.wall = time.time()
        self.connections: set[Timed] = set()
        self.tunnels: dict[str, set[Timed]] = {}
        self.pool: UpstreamPool = UpstreamPool(self)
        #: Agents' data connections (tunneled network sites), by site.
        self.site_tunnels = SiteTunnels(
            table, tickets, f"{options.worker_index}/{options.worker_count}"
        )
        #: Called when a new connection to the portal opens (labgate.router.sync wakes
        #: a route stream waiting to reconnect: the portal is back).
        self.portal_connected: Callable[[], None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def portals_from(self, address: UpstreamAddress) -> tuple[UpstreamAddress, ...]:
        """The portal replicas to try for a request bound for ``address``, it first.

        Only a portal has stand-ins; an instance's address is tried alone.
        """
        if address not in self.portals or len(self.portals) == 1:
            return (address,)
        start = self.portals.index(address)
        return self.portals[start:] + self.portals[:start]

    def start(self) -> None:
        """Start the sweeper (needs a running loop)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop the sweeper and close pooled upstream connections."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        self.pool.close_all()
        self.site_tunnels.close()

    def sweep(self) -> None:
        """Time out every connection past its deadline."""
        self.now = now = time.monotonic()
        self.wall = time.time()
        late = [c for c in self.connections if c.deadline <= now]
        for connection in late:
            try:
                connection.timeout()
            except Exception:  # a bug must not stop the sweeper
                log.exception("router: timing out a connection failed")

    async def _sweep(self) -> None:
        interval = self.options.sweep_interval
        purge_every = max(1, int(60 / interval))
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            self.sweep()
            rounds += 1
            if rounds % purge_every == 0:
                self.table.purge_revoked()
