"""Tunneled sites with several routers: which routers agents dial, and whose tickets they take.

A tunneled site's instances are reached through data connections its agent
dials to the routers (:mod:`labgate.router.tunnel`). With several routers
(``labgate router`` processes behind a load balancer) every router that may
receive a user's request needs one, so:

- each router names, on the route stream it follows, the address agents
  dial it at (``Labgate-Router-Tunnel``, its ``router_tunnel_url`` or its
  listen address); the portal serving that stream keeps a ``tunnel_routers``
  row for it fresh (``seen_at``, every heartbeat interval) while the stream
  is open and deletes it when the stream ends; a row not refreshed for
  :data:`FRESH_BEATS` heartbeat intervals (its portal died too) counts no
  more;
- the portal holding a site's agent sends the fresh addresses with every
  tunnel ticket (:class:`~labgate.wire.agent.TunnelTicket`); the agent keeps
  a data connection to each and drops those no longer listed
  (:class:`~labgate.agent.tunnel.TunnelDialer`);
- the epoch of the agent's connection is written to its site's row
  (``sites.tunnel_epoch``), which every portal follows (``site`` changes,
  :mod:`labgate.portal.replicas`) into its own route table, so the routers
  of every portal take the site's tickets, and cut its data connections when
  the epoch goes.

No list of router addresses is ever sent to a user: it travels only from
routers (holding the router token) to portals and from portals to agents
(over their authenticated control connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from datetime import timedelta
from functools import partial

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from labgate.aio import cancel_and_wait
from labgate.db.models import Site, TunnelRouter, utcnow
from labgate.portal.state import Portal

log = logging.getLogger(__name__)

#: A router row not refreshed for this many heartbeat intervals is no longer listed.
FRESH_BEATS = 3


class TunnelRouters:
    """This portal's part: the rows of routers following it, the list for its agents, epochs."""

    def __init__(self, portal: Portal, heartbeat: float) -> None:
        self.portal = portal
        self.heartbeat = heartbeat
        #: Route streams open here per router address (a router's workers may each hold one).
        self.streams: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None
        self._forgetting: set[asyncio.Task[None]] = set()
        #: The last list read, and when (monotonic): one read serves a burst of tickets.
        self._cached: tuple[float, list[str]] = (-1e9, [])

    @property
    def replica(self) -> str:
        """This portal's name (the rows say which portal keeps them)."""
        return self.portal.leader.replica

    def start(self) -> None:
        """Keep the rows of the routers following this portal fresh, every heartbeat."""
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="tunnel-routers")

    async def close(self) -> None:
        """Stop refreshing (the rows expire if no other portal takes the routers' streams)."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._forgetting:
            await asyncio.wait(list(self._forgetting), timeout=2)

    # --- routers ---------------------------------------------------------------------
    async def opened(self, url: str) -> None:
        """A router with tunnel address ``url`` follows this portal's route stream."""
        self.streams[url] += 1
        await self.portal.run_db(lambda s: _seen(s, [url], self.replica))
        self._cached = (-1e9, [])
        log.info("router %s follows this portal; agents of tunneled sites dial it", url)

    def closed(self, url: str) -> None:
        """That stream ended; the row goes when no other stream of the router is open here.

        Not a coroutine: a stream ends in a cancelled task, where nothing more is awaited;
        the row is deleted by a task of its own.
        """
        self.streams[url] -= 1
        if self.streams[url] > 0:
            return
        del self.streams[url]
        self._cached = (-1e9, [])
        task = asyncio.get_running_loop().create_task(self._forget(url))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget(self, url: str) -> None:
        with contextlib.suppress(Exception):  # the row expires anyway
            await self.portal.run_db(lambda s: _forget(s, url, self.replica))

    async def urls(self) -> list[str]:
        """The addresses of every live router (any portal's), for the agents.

        Read at most once per half heartbeat interval: every agent's ticket carries it.
        """
        now = asyncio.get_running_loop().time()
        read_at, urls = self._cached
        if now - read_at < self.heartbeat / 2:
            return urls
        fresh = FRESH_BEATS * self.heartbeat
        try:
            urls = await self.portal.run_db(lambda s: _fresh(s, fresh))
        except Exception:
            log.exception("reading the routers' addresses failed")
            return urls
        if urls and not self.portal.replicated:
            # `labgate serve` with routers of its own besides: its in-process router is one.
            urls = list(dict.fromkeys([self.portal.settings.effective_public_url, *urls]))
        self._cached = (now, urls)
        return urls

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            urls = list(self.streams)
            # Rows long stale (a router gone for good, its portal too) are tidied by anyone.
            stale = 10 * FRESH_BEATS * self.heartbeat
            try:
                await self.portal.run_db(
                    partial(_seen, urls=urls, replica=self.replica, stale=stale)
                )
            except Exception:
                log.exception("refreshing the routers' rows failed")

    # --- epochs ------------------------------------------------------------------------
    async def epoch_changed(self, site: str, epoch: str | None, old: str | None) -> None:
        """Write site ``site``'s tunnel epoch (None: gone) unless another connection's is there.

        Every portal's routers follow the row (a ``site`` change). A connection
        that ends clears only its own epoch: the agent may be connected to
        another portal already.
        """
        try:
            await self.portal.run_db(lambda s: _write_epoch(s, site, epoch, old))
        except Exception:
            log.exception("site %s: recording its tunnel epoch failed", site)


# --- database work (worker threads) -----------------------------------------------------
def _seen(session: Session, urls: list[str], replica: str, stale: float = 0.0) -> None:
    now = utcnow()
    if stale:
        session.execute(
            delete(TunnelRouter).where(TunnelRouter.seen_at < now - timedelta(seconds=stale))
        )
    for url in urls:
        row = session.get(TunnelRouter, url)
        if row is None:
            session.add(TunnelRouter(url=url, replica=replica, seen_at=now))
        else:
            row.replica, row.seen_at = replica, now


def _forget(session: Session, url: str, replica: str) -> None:
    session.execute(
        delete(TunnelRouter).where(TunnelRouter.url == url, TunnelRouter.replica == replica)
    )


def _fresh(session: Session, seconds: float) -> list[str]:
    since = utcnow() - timedelta(seconds=seconds)
    query = select(TunnelRouter.url).where(TunnelRouter.seen_at > since).order_by(TunnelRouter.url)
    return list(session.scalars(query))


def _write_epoch(session: Session, site: str, epoch: str | None, old: str | None) -> None:
    row = session.scalar(select(Site).where(Site.name == site))
    if row is None:
        return
    if epoch is None and row.tunnel_epoch != old:
        return  # another connection of the agent wrote its own since
    row.tunnel_epoch = epoch
