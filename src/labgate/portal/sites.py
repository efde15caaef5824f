"""Bringing up the network sites with the portal: the hub, the liveness rules, tunnel routes.

Called from the app's start-up after the instance manager exists: every
``sites`` row of kind ``network`` gets its link (not live until its agent
dials in), the route feed learns where tunneled instances are reached
(``tunnel:SITE/ID``: through the data connections the site's agent keeps with
the routers, :mod:`labgate.router.tunnel`), and
:class:`~labgate.scheduler.liveness.SiteLiveness` marks the instances of the
sites that are away as ``unreachable`` until their agents return.
"""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from labgate.agent.convert import tool_json
from labgate.agent.hub import SiteHub
from labgate.agent.network import NetworkSiteLink, Relay
from labgate.db.models import Site
from labgate.portal.routefeed import Routable, route_sources
from labgate.portal.state import Portal
from labgate.portal.tunnel_routers import TunnelRouters
from labgate.scheduler.liveness import SiteLiveness
from labgate.security import TunnelTickets
from labgate.wire.routes import NO_ENDPOINT

log = logging.getLogger(__name__)


def network_sites(session: Session) -> list[tuple[str, str, str]]:
    """(name, backend, reach) of every network site."""
    rows = session.execute(
        select(Site.name, Site.backend, Site.reach).where(Site.kind == "network")
    )
    return [(name, backend, reach) for name, backend, reach in rows]


async def start_network_sites(portal: Portal, relay: Relay | None = None) -> SiteLiveness:
    """Make the hub and a link per network site; returns the started liveness rules.

    ``relay`` reaches agents connected to another portal on the same database.
    """
    settings, manager = portal.settings, portal.instances
    hub = SiteHub(
        portal.links,
        lambda: [tool_json(tool) for tool in portal.catalog],
        heartbeat=settings.site_heartbeat_interval,
        command_timeout=settings.site_command_timeout,
        routes=portal.routes.table if portal.routes is not None else None,
        tickets=TunnelTickets(settings.signing_key()),
    )
    hub.relay = relay
    portal.site_hub = hub
    # Several routers: each agent dials every one; every portal's routers take its epoch.
    routers = portal.tunnel_routers = TunnelRouters(portal, settings.site_heartbeat_interval)
    hub.router_urls = routers.urls
    hub.epoch_changed = routers.epoch_changed
    routers.start()
    for name, backend, reach in await portal.run_db(network_sites):
        await hub.register(name, backend, reach)
    if portal.routes is not None:
        portal.routes.upstream_of = lambda instance: network_upstream(portal, instance)
        portal.routes.own_epochs = lambda: dict(hub.epochs)
        # The table was loaded before these links existed: a tunneled site's instances
        # are reached through its tunnel, never at endpoints nothing can connect to.
        await reroute(portal, Site.kind == "network", Site.reach == "tunnel")
        hub.registered = lambda site: reroute(portal, Site.name == site)
    liveness = SiteLiveness(
        manager,
        hub,
        grace=settings.site_grace_period,
        reconnect_window=settings.site_reconnect_window,
        shared=portal.replicated,
    )
    hub.events = liveness
    await liveness.start()
    return liveness


async def reroute(portal: Portal, *sites: ColumnElement[bool]) -> None:
    """Route again the active instances of the sites matching ``sites``: their links changed.

    At start-up the table is loaded before the links exist; later, another
    replica's site becomes known here a sync after it was added
    (``SiteLiveness``). Routes made without the link went to the instances'
    endpoints, which for a tunneled site nothing may be able to connect to.
    """
    if portal.routes is None:
        return
    for instance in await portal.run_db(lambda s: route_sources(s, *sites)):
        portal.routes.instance_changed(instance)


def network_upstream(portal: Portal, instance: Routable) -> str | None:
    """The router's upstream for an instance of a network site when it is not the
    instance's endpoint (None: its endpoint).

    A tunneled site's instances: its tunnel. A Unix socket at a site reached
    directly (the instance started while the site was tunneled; or an agent's
    lie, accepted then): :data:`~labgate.wire.routes.NO_ENDPOINT`, never a
    path the router would look up on its own host.
    """
    link = portal.links.get(instance.site_name or "")
    if not isinstance(link, NetworkSiteLink):
        return None
    tunneled = link.tunnel_upstream(instance.id)
    if tunneled is None and (instance.endpoint or "").startswith("unix:"):
        return NO_ENDPOINT
    return tunneled
