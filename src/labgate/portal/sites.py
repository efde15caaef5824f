"""Bringing up the network sites with the portal: the hub, the liveness rules, tunnels.

Called from the app's start-up after the instance manager exists: every
``sites`` row of kind ``network`` gets its link (not live until its agent
dials in), the route feed learns where tunneled instances are reached, and
:class:`~labgate.scheduler.liveness.SiteLiveness` marks the instances of the
sites that are away as ``unreachable`` until their agents return.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.convert import tool_json
from labgate.agent.hub import SiteHub
from labgate.agent.network import NetworkSiteLink
from labgate.datadir import private_dir
from labgate.db.models import Instance, Site
from labgate.portal.state import Portal
from labgate.scheduler.liveness import SiteLiveness

log = logging.getLogger(__name__)

#: A unix socket path must fit in 108 bytes: room for "/<32-char id>.sock".
MAX_TUNNEL_DIR = 108 - 40


def tunnel_dir(data_dir: Path) -> Path:
    """Where the portal listens for the router on behalf of tunneled instances (mode 0700).

    ``<data_dir>/tunnels`` when its socket paths fit, else a private directory in /tmp.
    """
    preferred = data_dir.resolve() / "tunnels"
    if len(str(preferred)) <= MAX_TUNNEL_DIR:
        private_dir(preferred)
        preferred.chmod(0o700)
        return preferred
    return Path(tempfile.mkdtemp(prefix="labgate-tunnels-"))


def network_sites(session: Session) -> list[tuple[str, str, str]]:
    """(name, backend, reach) of every network site."""
    rows = session.execute(
        select(Site.name, Site.backend, Site.reach).where(Site.kind == "network")
    )
    return [(name, backend, reach) for name, backend, reach in rows]


async def start_network_sites(portal: Portal) -> SiteLiveness:
    """Make the hub and a link per network site; returns the started liveness rules."""
    settings, manager = portal.settings, portal.instances
    hub = SiteHub(
        portal.links,
        lambda: [tool_json(tool) for tool in portal.catalog],
        heartbeat=settings.site_heartbeat_interval,
        command_timeout=settings.site_command_timeout,
        tunnel_dir=tunnel_dir(settings.data_dir),
    )
    portal.site_hub = hub
    for name, backend, reach in await portal.run_db(network_sites):
        await hub.register(name, backend, reach)
    if portal.routes is not None:
        portal.routes.upstream_of = lambda instance: tunnel_upstream(portal, instance)
    liveness = SiteLiveness(manager, hub, grace=settings.site_grace_period)
    hub.events = liveness
    await liveness.start()
    return liveness


def tunnel_upstream(portal: Portal, instance: Instance) -> str | None:
    """The router's upstream for an instance of a tunneled site (None: its endpoint)."""
    site = instance.site
    link = portal.links.get(site.name) if site is not None else None
    if not isinstance(link, NetworkSiteLink):
        return None
    path = link.tunnel_path(instance.id)
    return f"unix:{path}" if path is not None else None
