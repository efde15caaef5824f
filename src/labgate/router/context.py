"""What every connection of one router shares: options, state, pool, clock.

Timeouts are enforced by one sweeper per router that wakes every second and
closes whatever is past its ``deadline`` (a float per connection; ``inf``
means none). Setting a deadline is one attribute store on the hot path,
instead of a timer handle per request.

This module is compiled with the rest of the hot path (``_native.MODULES``):
the connections read the context's attributes on every request, which is a
struct load on a compiled class and a dict probe on a Python one. The
options stay a Python dataclass in :mod:`labgate.router.options` (worker
processes are sent them pickled); the ones read per request are copied onto
the context.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, Protocol

from labgate.aio import cancel_and_wait
from labgate.router.activity import ActivityLog, Counter
from labgate.router.auth import Authenticator
from labgate.router.hosts import InstanceHosts
from labgate.router.http import HEADS_IN_C, NEVER, log
from labgate.router.options import RouterOptions
from labgate.router.tunnel import SiteTunnels
from labgate.router.upstream import UpstreamPool
from labgate.security import TunnelTickets
from labgate.wire.routes import RouteTable, UpstreamAddress
from labgate.wire.stats import LATENCY_BOUNDS, RouterStats

#: The histogram's bounds as a constant of this module (read on every response).
_BOUNDS: Final[tuple[float, ...]] = LATENCY_BOUNDS

__all__ = ["NEVER", "Context", "RouterOptions", "log"]


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
        # The options read on every request, as plain attributes of this compiled class.
        self.header_timeout = options.header_timeout
        self.keepalive_timeout = options.keepalive_timeout
        self.response_timeout = options.response_timeout
        self.pool_idle_timeout = options.pool_idle_timeout
        self.pool_max_idle = options.pool_max_idle
        self.pool_max_requests = options.pool_max_requests
        self.buffer_limit = options.buffer_limit
        #: Whether whole request and response heads are first tried with the C scanners
        #: (``labgate.router._heads``, built with the compiled modules); tests switch it off
        #: to hold both readings to the same bytes.
        self.heads_in_c = HEADS_IN_C
        #: Instances on their own host names, or None (under ``/i/<id>/``).
        self.hosts = (
            InstanceHosts(options.instance_host, options.instance_base_url)
            if options.instance_host
            else None
        )
        self.activity = activity or ActivityLog()
        self.portal_counter = Counter()
        #: Requests routed to instances and their latency histogram (see :meth:`observe`),
        #: kept as this compiled class's own numbers; :attr:`stats` hands out a copy.
        self.requests = 0
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
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

    def observe(self, seconds: float) -> None:
        """A response head arrived ``seconds`` after its request was routed: counted in the
        first bucket whose bound is at least ``seconds`` (Prometheus' ``le``)."""
        bucket = 0
        for bound in _BOUNDS:
            if seconds <= bound:
                break
            bucket += 1
        self.latency_buckets[bucket] += 1
        self.latency_sum += seconds

    @property
    def stats(self) -> RouterStats:
        """The request count and latency histogram so far, as the route stream reports them."""
        stats = RouterStats()
        stats.requests = self.requests
        stats.buckets = list(self.latency_buckets)
        stats.latency_sum = self.latency_sum
        return stats

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
