"""The router's side of the route stream: follow the portal, resync after every reconnect.

:class:`RouteSync` keeps one ``GET <portal>/api/v1/router/stream`` open
(bearer token), applies the first message (always a snapshot) with
``resync`` and every later one as a delta. When the stream ends, breaks or
stays silent longer than ``read_timeout`` (the portal pings every 15 s), it
reconnects with capped exponential backoff and jitter (0.2 s doubling to
2 s), at once when :meth:`RouteSync.portal_answered` says a request reached
the portal again, and the new snapshot replaces everything: a route added or
removed while the router was cut off is never missed. While disconnected the
router keeps serving its last known table.

:class:`ActivityReporter` posts this process's activity to
``<portal>/api/v1/router/activity`` every ``interval`` seconds as
``{"worker": "<host>:<pid>", "activity": {"<instance_id>": Activity.to_dict()}}``.

A ``labgate router`` names on the stream request (``Labgate-Router-Tunnel``)
where tunneled sites' agents dial it; the portal lists it to them while the
stream is open (:mod:`labgate.portal.tunnel_routers`).

The portal URL is ``http://HOST:PORT`` or ``unix:/path/portal.sock``. Given
several portal replicas (``other_portals``), both follow one of them and move
to the next when it fails: replicas sharing one database serve the same
stream, so any of them will do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence

import httpx

from labgate.aio import wait_for
from labgate.router.activity import Activity
from labgate.wire.routes import RouterControl
from labgate.wire.stats import RouterStats
from labgate.wire.stream import ACTIVITY_PATH, STREAM_PATH, TUNNEL_HEADER, apply_message

log = logging.getLogger("labgate.router.sync")


def portal_client(portal_url: str, token: str, *, read_timeout: float) -> httpx.AsyncClient:
    """An HTTP client for the portal at ``portal_url`` (TCP or unix socket)."""
    timeout = httpx.Timeout(10.0, read=read_timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if portal_url.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=portal_url[5:])
        return httpx.AsyncClient(
            base_url="http://portal", transport=transport, timeout=timeout, headers=headers
        )
    return httpx.AsyncClient(base_url=portal_url, timeout=timeout, headers=headers)


class StreamError(Exception):
    """The stream said something a router cannot follow."""


class RouteSync:
    """Follows the portal's route stream into a :class:`RouterControl`."""

    def __init__(
        self,
        control: RouterControl,
        portal_url: str,
        token: str,
        *,
        read_timeout: float = 45.0,
        min_backoff: float = 0.2,
        max_backoff: float = 2.0,
        on_snapshot: Callable[[], None] | None = None,
        other_portals: Sequence[str] = (),
        tunnel_url: str = "",
    ) -> None:
        self.control = control
        #: Where agents dial this router (said on the stream; the portal lists it to them).
        self.tunnel_url = tunnel_url
        self.on_snapshot = on_snapshot
        #: The replica followed now; after a failure the next of :attr:`portals` is tried.
        self.portal_url = portal_url
        self.portals = [portal_url, *(url for url in other_portals if url != portal_url)]
        self.token = token
        self.read_timeout = read_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.synced = asyncio.Event()
        self.connected = False
        self.snapshots = 0
        self.messages = 0
        self.last_error = ""
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Follow the stream until cancelled."""
        backoff = self.min_backoff
        while True:
            try:
                await self._follow()
                self.last_error = "the stream ended"
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError, StreamError, ValueError, KeyError) as problem:
                self.last_error = f"{type(problem).__name__}: {problem}"
            if self.connected:
                backoff = self.min_backoff
            self.connected = False
            failed = self.portal_url
            self.portal_url = self._next_portal(failed)
            log.warning(
                "router: route stream from %s lost (%s); reconnecting to %s",
                failed,
                self.last_error,
                self.portal_url,
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), backoff * (0.5 + random.random()))
            backoff = min(self.max_backoff, backoff * 2)

    def _next_portal(self, failed: str) -> str:
        """The replica after ``failed`` (itself when it is the only one)."""
        return self.portals[(self.portals.index(failed) + 1) % len(self.portals)]

    def portal_answered(self) -> None:
        """A connection to the portal opened: a stream waiting to reconnect tries now.

        After a portal restart, the table must not stay stale for a backoff's
        length while the portal already answers (new instances would be 404).
        """
        if not self.connected:
            self._wake.set()

    def _headers(self) -> dict[str, str]:
        return {TUNNEL_HEADER: self.tunnel_url} if self.tunnel_url else {}

    async def _follow(self) -> None:
        async with (
            portal_client(self.portal_url, self.token, read_timeout=self.read_timeout) as client,
            client.stream("GET", STREAM_PATH, headers=self._headers()) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                raise StreamError(f"the portal answered {response.status_code}")
            first = True
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise StreamError("a stream message is not an object")
                if first:
                    if message.get("op") != "snapshot":
                        raise StreamError("the stream did not start with a snapshot")
                    first = False
                    self.connected = True
                if message.get("op") == "snapshot":
                    self.snapshots += 1
                apply_message(self.control, message)
                self.messages += 1
                if message.get("op") == "snapshot":
                    self.synced.set()
                    if self.on_snapshot is not None:
                        self.on_snapshot()


class ActivityReporter:
    """Posts this router process's activity to the portal now and then."""

    def __init__(
        self,
        activities: Callable[[], dict[str, Activity]],
        portal_url: str,
        token: str,
        *,
        interval: float = 30.0,
        stats: Callable[[], RouterStats] | None = None,
        other_portals: Sequence[str] = (),
    ) -> None:
        self.activities = activities
        #: Request counts and latency (labgate.wire.stats), sent along for /metrics.
        self.stats = stats
        self.portal_url = portal_url
        #: Every replica a report may go to, the one that took the last report first.
        self.portals = [portal_url, *(url for url in other_portals if url != portal_url)]
        self.token = token
        self.interval = interval
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def payload(self) -> dict[str, object]:
        """What one report carries."""
        payload: dict[str, object] = {
            "worker": self.worker,
            "activity": {k: v.to_dict() for k, v in self.activities().items()},
        }
        if self.stats is not None:
            payload["stats"] = self.stats().to_dict()
        return payload

    async def report(self, client: httpx.AsyncClient) -> bool:
        """Send one report; False when the portal did not take it."""
        try:
            response = await client.post(ACTIVITY_PATH, json=self.payload())
        except httpx.HTTPError as problem:
            log.debug("router: activity report failed: %s", problem)
            return False
        return response.status_code < 300

    async def run(self) -> None:
        """Report every ``interval`` seconds until cancelled, to the first replica that takes it."""
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(portal_client(url, self.token, read_timeout=30.0))
                for url in self.portals
            ]
            while True:
                await asyncio.sleep(self.interval)
                for _ in range(len(clients)):
                    with contextlib.suppress(Exception):
                        if await self.report(clients[0]):
                            break
                    # The replica did not take it: the next one is asked (and asked first).
                    clients.append(clients.pop(0))
