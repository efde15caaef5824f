"""The agent endpoint: where network sites' agents dial in (``/api/v1/agent/connect``).

A WebSocket, through the router's public port like every portal path. The
agent authenticates with its site's token (``Authorization: Bearer lgs_…``),
compared by hash with the ``sites`` row of a network site; anything else is
refused before the upgrade (HTTP 403). The site is the token's, never one the
agent names; the hub (:mod:`labgate.agent.hub`) serves the connection.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, WebSocket
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.websockets import WebSocketDisconnect

from labgate.agent.hub import SiteInfo
from labgate.agent.network import ChannelClosed
from labgate.db.models import Site
from labgate.portal.api.sites import site_info
from labgate.portal.state import Portal
from labgate.security import hash_token

log = logging.getLogger(__name__)

router = APIRouter(tags=["sites"])


class WebSocketChannel:
    """A Starlette WebSocket as the hub's :class:`~labgate.agent.hub.Channel`."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send_text(self, data: str) -> None:
        """Send one text message."""
        try:
            await self.websocket.send_text(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    async def receive(self) -> str | bytes:
        """The next message."""
        try:
            message = await self.websocket.receive()
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None
        if message["type"] == "websocket.disconnect":
            raise ChannelClosed(f"closed ({message.get('code')})")
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def close(self, code: int, reason: str) -> None:
        """End the connection."""
        with contextlib.suppress(RuntimeError, OSError):
            await self.websocket.close(code, reason)


def site_of_token(session: Session, token: str) -> SiteInfo | None:
    """The network site a token belongs to, or None."""
    if not token.startswith("lgs_"):
        return None
    site = session.scalar(
        select(Site).where(Site.token_hash == hash_token(token), Site.kind == "network")
    )
    return None if site is None else site_info(site)


@router.websocket("/agent/connect")
async def agent_connect(websocket: WebSocket) -> None:
    """A network site's agent: authenticate by the site's token, then serve the connection."""
    portal: Portal = websocket.app.state.portal
    header = websocket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    site = None
    if scheme.lower() == "bearer" and token:
        site = await portal.run_db(lambda s: site_of_token(s, token.strip()))
    hub = portal.site_hub
    if site is None or hub is None:
        client = websocket.client.host if websocket.client else "?"
        log.warning("agent connection from %s refused: no network site has that token", client)
        await websocket.close(code=4401)
        return
    if site.name not in portal.links:
        # Added through another portal replica since this one started.
        await hub.register(site.name, site.backend, site.reach)
    await websocket.accept()
    await hub.serve(site, WebSocketChannel(websocket))
