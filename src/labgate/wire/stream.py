"""The route stream: how a portal feeds routers in other processes.

Wire format: newline-delimited JSON (``application/x-ndjson``), one message
per line, served by the portal at ``GET /api/v1/router/stream`` (bearer
token of an admin or of the router). Every message has ``op`` and ``seq``
(increasing per publisher)::

    {"op": "snapshot", "seq": 7, "state": {<RouteTable.snapshot()>}}   always first
    {"op": "add_route", "seq": 8, "route": {<Route.to_dict()>}}
    {"op": "remove_route", "seq": 9, "instance_id": "abc123"}
    {"op": "set_user", "seq": 10, "user": {<UserInfo.to_dict()>}}
    {"op": "remove_user", "seq": 11, "user_id": 4}
    {"op": "set_token", "seq": 12, "token": {"token_hash", "user_id", "scopes", "expires_at"}}
    {"op": "remove_token", "seq": 13, "token_hash": "…"}
    {"op": "revoke_session", "seq": 14, "session_id": "…", "expires_at": 1700000000.0}
    {"op": "set_tunnel_site", "seq": 15, "site": "hpc", "epoch": "…"}
    {"op": "remove_tunnel_site", "seq": 16, "site": "hpc"}
    {"op": "ping", "seq": 17}                                            when idle

A ``snapshot`` may also come later (the portal resynced); it replaces
everything. A subscriber that falls too far behind is dropped; it
reconnects and starts again from a snapshot, so nothing is ever lost, only
repeated.

:class:`RoutePublisher` is the portal's side: a :class:`RouteTable` (so an
in-process router can read it directly) that also fans every change out.
The portal mounts one endpoint::

    @app.get("/api/v1/router/stream")
    async def router_stream(...):  # check the bearer token first
        return StreamingResponse(publisher.subscribe(), media_type=STREAM_MEDIA_TYPE)
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from labgate.aio import wait_for
from labgate.wire.routes import (
    Route,
    RouterControl,
    RouteTable,
    TableState,
    TokenInfo,
    UserInfo,
)

STREAM_MEDIA_TYPE = "application/x-ndjson"
STREAM_PATH = "/api/v1/router/stream"
#: The stream request's header naming where tunneled sites' agents dial the router.
TUNNEL_HEADER = "Labgate-Router-Tunnel"
ACTIVITY_PATH = "/api/v1/router/activity"


def tunnel_address(value: str) -> str:
    """A router's tunnel address as ``scheme://HOST[:PORT]``; ValueError unless http(s), no path."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a router's tunnel address must be http(s)://HOST[:PORT], not {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"a router's tunnel address takes no path or credentials: {value!r}")
    if len(value) > 255:
        raise ValueError("a router's tunnel address is longer than 255 characters")
    return f"{parts.scheme}://{parts.netloc}"


def encode(message: dict[str, Any]) -> bytes:
    """One wire line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def apply_message(control: RouterControl, message: dict[str, Any]) -> None:
    """Apply one decoded stream message to ``control``; unknown ops are ignored."""
    op = message.get("op")
    if op == "snapshot":
        control.resync(message["state"])
    elif op == "add_route":
        control.add_route(Route.from_dict(message["route"]))
    elif op == "remove_route":
        control.remove_route(str(message["instance_id"]))
    elif op == "set_user":
        control.set_user(UserInfo.from_dict(message["user"]))
    elif op == "remove_user":
        control.remove_user(int(message["user_id"]))
    elif op == "set_token":
        token = message["token"]
        control.set_token(str(token["token_hash"]), TokenInfo.from_dict(token))
    elif op == "remove_token":
        control.remove_token(str(message["token_hash"]))
    elif op == "revoke_session":
        control.revoke_session(str(message["session_id"]), float(message["expires_at"]))
    elif op == "set_tunnel_site":
        control.set_tunnel_site(str(message["site"]), str(message["epoch"]))
    elif op == "remove_tunnel_site":
        control.remove_tunnel_site(str(message["site"]))


class _Subscriber:
    """One stream consumer: a bounded queue filled from the loop that serves it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.limit = limit
        self.dropped = False

    def put(self, line: bytes) -> None:
        if self.dropped:
            return
        if self.queue.qsize() >= self.limit:
            # Too far behind: end its stream; it reconnects and resyncs.
            self.dropped = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(line)


class RoutePublisher(RouteTable):
    """A route table that also publishes every change to stream subscribers.

    The portal calls the :class:`RouterControl` methods (from any thread;
    deliveries are handed to each subscriber's loop). ``heartbeat`` seconds
    of silence produce a ``ping`` so subscribers can tell a dead stream.
    """

    def __init__(self, *, heartbeat: float = 15.0, queue_limit: int = 100_000) -> None:
        super().__init__()
        self.heartbeat = heartbeat
        self.queue_limit = queue_limit
        self.seq = 0
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.RLock()

    @property
    def subscriber_count(self) -> int:
        """Streams currently open."""
        return len(self._subscribers)

    def _publish(self, message: dict[str, Any]) -> None:
        """Number and deliver one message; the caller holds ``_lock``."""
        self.seq += 1
        message["seq"] = self.seq
        line = encode(message)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for sub in self._subscribers:
            if running is sub.loop:
                sub.put(line)
            elif not sub.loop.is_closed():
                sub.loop.call_soon_threadsafe(sub.put, line)

    # --- RouterControl, publishing ------------------------------------------
    def add_route(self, route: Route) -> None:
        """Add or replace a route and publish it."""
        with self._lock:
            super().add_route(route)
            self._publish({"op": "add_route", "route": route.to_dict()})

    def remove_route(self, instance_id: str) -> None:
        """Withdraw a route and publish that."""
        with self._lock:
            super().remove_route(instance_id)
            self._publish({"op": "remove_route", "instance_id": instance_id})

    def set_user(self, user: UserInfo) -> None:
        """Add or replace a user and publish it."""
        with self._lock:
            super().set_user(user)
            self._publish({"op": "set_user", "user": user.to_dict()})

    def remove_user(self, user_id: int) -> None:
        """Forget a user and publish that."""
        with self._lock:
            super().remove_user(user_id)
            self._publish({"op": "remove_user", "user_id": user_id})

    def set_token(self, token_hash: str, info: TokenInfo) -> None:
        """Add or replace a token and publish it."""
        with self._lock:
            super().set_token(token_hash, info)
            self._publish({"op": "set_token", "token": info.to_dict(token_hash)})

    def remove_token(self, token_hash: str) -> None:
        """Forget a token and publish that."""
        with self._lock:
            super().remove_token(token_hash)
            self._publish({"op": "remove_token", "token_hash": token_hash})

    def revoke_session(self, session_id: str, expires_at: float) -> None:
        """Revoke a session and publish that."""
        with self._lock:
            super().revoke_session(session_id, expires_at)
            self._publish(
                {"op": "revoke_session", "session_id": session_id, "expires_at": expires_at}
            )

    def set_tunnel_site(self, site: str, epoch: str) -> None:
        """Name a site's current tunnel epoch and publish it."""
        with self._lock:
            super().set_tunnel_site(site, epoch)
            self._publish({"op": "set_tunnel_site", "site": site, "epoch": epoch})

    def remove_tunnel_site(self, site: str) -> None:
        """Close a site's tunnel and publish that."""
        with self._lock:
            super().remove_tunnel_site(site)
            self._publish({"op": "remove_tunnel_site", "site": site})

    def replace(self, state: TableState) -> None:
        """Replace everything and send subscribers the new snapshot."""
        with self._lock:
            super().replace(state)
            if self._subscribers:
                self._publish({"op": "snapshot", "state": self.snapshot()})
            else:
                # No one to send it to (a portal starting): a subscriber's stream
                # begins with a snapshot of its own, so the table is not encoded.
                self.seq += 1

    def disconnect_all(self) -> None:
        """End every open stream (portal shutdown); routers reconnect and resync."""
        with self._lock:
            for sub in self._subscribers:
                sub.dropped = True
                if not sub.loop.is_closed():
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, None)

    # --- subscribing ---------------------------------------------------------
    async def subscribe(self) -> AsyncIterator[bytes]:
        """Wire lines for one subscriber: a snapshot, then every change, pings when idle."""
        sub = _Subscriber(asyncio.get_running_loop(), self.queue_limit)
        with self._lock:
            # Snapshot and registration together: no change falls between them.
            first = encode({"op": "snapshot", "seq": self.seq, "state": self.snapshot()})
            self._subscribers.add(sub)
        try:
            yield first
            while True:
                try:
                    line = await wait_for(sub.queue.get(), self.heartbeat)
                except TimeoutError:
                    yield encode({"op": "ping", "seq": self.seq})
                    continue
                if line is None:
                    return
                yield line
        finally:
            with self._lock:
                self._subscribers.discard(sub)
