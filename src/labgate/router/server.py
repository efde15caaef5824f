"""A router: listening sockets plus the context their connections share.

In-process use (``labgate serve``, tests)::

    table = RoutePublisher()            # or RouteTable(); the portal feeds it
    router = await start_router(table, "127.0.0.1", 8000, "unix:/run/portal.sock", settings)
    ...
    router.activity("abc123")           # -> Activity | None
    await router.close()

Several processes may listen on one port with ``reuse_port=True``
(SO_REUSEPORT: the kernel spreads connections); see :mod:`labgate.router.workers`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from labgate.config import Settings
from labgate.errors import ConfigError
from labgate.router.activity import Activity, ActivityLog
from labgate.router.auth import Authenticator
from labgate.router.context import Context, RouterOptions
from labgate.router.proxy import ClientConnection
from labgate.router.tls import CertificateWatcher, start_redirect
from labgate.security import (
    SessionSigner,
    TunnelTickets,
    instance_cookie_name,
    session_cookie_name,
)
from labgate.wire.routes import Route, RouteTable, parse_upstream


class Router:
    """The proxy for one process: serves connections from one or more listening sockets."""

    def __init__(
        self,
        table: RouteTable,
        signer: SessionSigner,
        portal_upstream: str,
        options: RouterOptions | None = None,
        *,
        other_portals: tuple[str, ...] = (),
    ) -> None:
        """``other_portals``: more portal replicas, used in turn when one refuses connections."""
        self.table = table
        self.options = options or RouterOptions()
        self.activity_log = ActivityLog()
        self.ctx = Context(
            table,
            Authenticator(
                table,
                signer,
                session_cookie=self.options.session_cookie,
                instance_cookie=self.options.instance_cookie,
                share_on_portal_origin=self.options.share_on_portal_origin,
            ),
            parse_upstream(portal_upstream),
            self.options,
            self.activity_log,
            TunnelTickets(signer.key),
            tuple(parse_upstream(other) for other in other_portals),
        )
        self.servers: list[asyncio.Server] = []
        #: The TLS certificate in use and its reloading, when the router serves HTTPS.
        self.tls: CertificateWatcher | None = None
        table.on_route_removed(self._route_removed)
        table.on_access_narrowed(self._access_narrowed)
        table.on_credentials_changed(self._credentials_changed)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def listen(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        backlog: int = 4096,
    ) -> asyncio.Server:
        """Accept connections on ``host:port`` (port 0: any free one) or on ``sock``.

        With :attr:`tls` set the connections are HTTPS, with its certificate.
        """
        loop = self._loop = asyncio.get_running_loop()
        self.ctx.start()
        tls = self.tls.context if self.tls is not None else None
        if sock is not None:
            server = await loop.create_server(
                lambda: ClientConnection(self.ctx), sock=sock, backlog=backlog, ssl=tls
            )
        else:
            server = await loop.create_server(
                lambda: ClientConnection(self.ctx),
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=backlog,
                ssl=tls,
            )
        self.servers.append(server)
        return server

    @property
    def port(self) -> int:
        """The TCP port of the first listening socket."""
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        raise RuntimeError("the router is not listening on TCP")

    def activity(self, instance_id: str) -> Activity | None:
        """What one instance has seen through this router, or None when nothing yet."""
        return self.activity_log.get(instance_id)

    def activities(self) -> dict[str, Activity]:
        """Activity of every instance that has seen traffic through this router."""
        return self.activity_log.all()

    @property
    def open_connections(self) -> int:
        """Client and upstream connections currently open (tests check for leaks)."""
        return len(self.ctx.connections)

    async def drain(self, grace: float) -> None:
        """Stop listening and let requests in flight finish (up to ``grace`` s); then close().

        A stopping router (SIGTERM) answers what it was asked before it goes:
        idle keep-alive connections are closed at once, WebSockets and other
        upgraded connections too (they would never end by themselves), and
        connections with a request under way as soon as it is answered.
        """
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            busy = False
            for conn in list(self.ctx.connections):
                if not isinstance(conn, ClientConnection) or conn.closing:
                    continue
                if conn.tunnel is None and (conn.current or conn.queue or conn.reading_head):
                    busy = True
                else:
                    conn.close()
            if not busy or loop.time() >= deadline:
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for server in self.servers:
            server.close()
        for conn in list(self.ctx.connections):
            if isinstance(conn, ClientConnection):
                conn.close()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        if self.tls is not None:
            await self.tls.stop()
        await self.ctx.stop()
        # Let transports finish closing before the loop can go away.
        await asyncio.sleep(0)

    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the router's loop: now if this is it, else as soon as it can.

        The portal may change the table from a worker thread (in-process
        router); the connections belong to the router's loop.
        """
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            callback()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    def _access_narrowed(self, route: Route) -> None:
        """A share was revoked: close the WebSockets of whoever lost access, at once."""
        self._on_loop(lambda: self._close_unallowed(route.instance_id))

    def _close_unallowed(self, instance_id: str) -> None:
        now = time.time()
        for conn in list(self.ctx.tunnels.get(instance_id, ())):
            if isinstance(conn, ClientConnection):
                conn.check_tunnel(now)

    def _credentials_changed(self, user_id: int | None, session_id: str | None) -> None:
        """Credentials may have stopped holding: check the WebSockets they opened, at once.

        Those of one user (``user_id``), of one portal session
        (``session_id``), or, with neither, every one; each as a new request
        with its credentials would be checked now, access to its instance
        included. The others are not touched.
        """
        self._on_loop(lambda: self._check_tunnels(user_id, session_id))

    def _check_tunnels(self, user_id: int | None, session_id: str | None) -> None:
        now = time.time()
        for tunnels in list(self.ctx.tunnels.values()):
            for conn in list(tunnels):
                if not isinstance(conn, ClientConnection):
                    continue
                identity = conn.tunnel_identity
                if identity is not None and (
                    (user_id is not None and identity.user.id != user_id)
                    or (session_id is not None and identity.session_id != session_id)
                ):
                    continue
                conn.check_tunnel(now)

    def _route_removed(self, instance_id: str) -> None:
        """A withdrawn route takes its open WebSockets with it."""
        for conn in list(self.ctx.tunnels.get(instance_id, ())):
            if isinstance(conn, ClientConnection):
                conn.close()
        self.activity_log.forget(instance_id)


def options_from_settings(settings: Settings, **overrides: object) -> RouterOptions:
    """Router options derived from labgate's settings (the public URL's scheme)."""
    scheme = urlsplit(settings.effective_public_url).scheme or "http"
    values: dict[str, object] = {
        "forwarded_proto": scheme,
        "trusted_proxies": tuple(settings.trusted_proxies),
        "worker_count": settings.router_workers,
        "portal_url": settings.effective_public_url,
        "session_cookie": session_cookie_name(settings.effective_cookie_secure),
        "instance_cookie": instance_cookie_name(settings.effective_cookie_secure),
        "share_on_portal_origin": settings.share_on_portal_origin,
    }
    if settings.instance_host:
        values["instance_host"] = settings.instance_host
        values["instance_base_url"] = settings.instance_url("{id}")
    values.update(overrides)
    return RouterOptions(**values)  # type: ignore[arg-type]


async def start_router(
    table: RouteTable,
    host: str,
    port: int,
    portal_upstream: str,
    settings: Settings,
    *,
    reuse_port: bool = False,
    options: RouterOptions | None = None,
) -> Router:
    """Start a router on ``host:port`` in front of ``portal_upstream``, fed by ``table``.

    ``portal_upstream`` is ``unix:/path`` or ``http://HOST:PORT``. The session
    signer uses ``settings.signing_key()`` and ``settings.session_max_age``.
    """
    signer = SessionSigner(settings.signing_key(), settings.session_max_age)
    router = Router(table, signer, portal_upstream, options or options_from_settings(settings))
    router.tls = certificate_watcher(settings)
    await router.listen(host, port, reuse_port=reuse_port)
    if router.tls is not None:
        router.tls.start()
    if settings.http_redirect_port is not None:
        redirect = await start_redirect(
            host, settings.http_redirect_port, settings.effective_public_url
        )
        router.servers.append(redirect)
    return router


def certificate_watcher(settings: Settings) -> CertificateWatcher | None:
    """The TLS certificate of the settings, loaded; None without TLS. ConfigError when bad."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        return CertificateWatcher(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_reload_interval
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate (tls_cert_file, tls_key_file): {exc}"
        ) from None
