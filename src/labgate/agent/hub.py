"""The portal's end of the network sites: one :class:`SiteHub` holds every agent connection.

A network site is a ``sites`` row added with ``labgate site add`` (its
``kind`` is ``network``); its agent runs on the site's own machine and dials
out to the portal. The hub keeps one :class:`~labgate.agent.network.NetworkSiteLink`
per such site in the portal's ``links`` (connected or not), accepts agent
connections, and cuts them when the site's token is rotated or revoked.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class SiteHub:
    """Every network site's link, and the agent connections behind them."""

    async def register(self, name: str, backend: str, reach: str) -> None:
        """Make the link of a newly added network site (its agent may connect from now on)."""

    async def cut(self, name: str, reason: str) -> None:
        """Close the site's agent connection now, if it has one (token rotated or revoked)."""

    async def forget(self, name: str) -> None:
        """Cut the site's connection and drop its link (the site was removed)."""
