"""``labgate serve`` (everything in one process), ``labgate portal`` and ``labgate router``.

In ``serve`` the router owns the public port and the portal (FastAPI under
uvicorn) listens on a private unix socket behind it; both, and the local
sites, share one uvloop event loop. The router reads the portal's route
table directly. With ``router_workers > 1`` more router processes share the
public port (SO_REUSEPORT) and follow the portal's route stream; a
:class:`~labgate.router.supervisor.WorkerSupervisor` replaces any that die.

Stopping serve leaves instances running; the next start re-attaches to them
and the route table is rebuilt from the database before the first request.

``labgate portal`` is the portal alone (API, UI, the network sites' hub) on
``host:port``, one of several replicas on one PostgreSQL database: no router
in process, no sites of its own, and the loops that run once only while it
leads (:mod:`labgate.scheduler.leader`). Routers (``labgate router``) and
agents (``labgate agent``) reach it over the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from labgate.config import Settings
from labgate.errors import ConfigError
from labgate.gcpause import resume as resume_gc
from labgate.portal.app import build_portal, create_app
from labgate.portal.state import Portal
from labgate.router import WorkerSupervisor, start_router, worker_config
from labgate.router.workers import WorkerConfig, run_router_process
from labgate.security import router_token
from labgate.startup import check_data_dir, check_startup, check_tools_dir

log = logging.getLogger(__name__)


def configure_logging(level: int = logging.INFO) -> None:
    """Plain, timestamped log lines on stderr."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # httpx logs every request at INFO: the health and liveness checks of every
    # instance would fill the log. Its warnings and errors still show.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def portal_server(app: FastAPI, socket_path: Path) -> uvicorn.Server:
    """uvicorn serving the portal on a unix socket, trusting the router's X-Forwarded-*."""
    config = uvicorn.Config(
        app,
        uds=str(socket_path),
        log_level="warning",
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips="*",
        lifespan="off",  # serve() runs the app's lifespan itself
        ws="websockets-sansio",
        ws_per_message_deflate=False,  # agent connections: small JSON, deflate buys nothing
        timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS,
    )
    return _PortalServer(config, app.state.portal)


#: Seconds a stopping portal waits for requests in flight before cancelling them; below
#: the units' TimeoutStopSec (30), so the leadership is still handed over in time.
GRACEFUL_STOP_SECONDS = 20


class _PortalServer(uvicorn.Server):
    """uvicorn without its signal handling: ``serve`` owns SIGTERM and SIGINT.

    Its graceful stop waits for every connection to finish; the portal's
    streams (the routers' route stream, event streams) are ended as soon as it
    stops listening (``portal.end_streams``), so that wait is for ordinary
    requests only.
    """

    def __init__(self, config: uvicorn.Config, portal: Portal) -> None:
        super().__init__(config)
        self.portal = portal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop listening, end the streams, then uvicorn's own graceful stop."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self.portal.end_streams()
        await super().shutdown(sockets)


async def serve(settings: Settings) -> None:
    """Run portal, sites and router until SIGINT or SIGTERM.

    A configuration this machine cannot run (see :mod:`labgate.startup`)
    raises :class:`~labgate.errors.ConfigError` before anything listens.
    """
    check_startup(settings)
    portal = build_portal(settings)
    app = create_app(settings, portal)
    run_dir = Path(tempfile.mkdtemp(prefix="labgate-"))
    try:
        # The portal's start-up runs here rather than inside uvicorn, so a bad
        # site or backend option is raised to the CLI (one line), not logged
        # by uvicorn as a traceback.
        async with app.router.lifespan_context(app):
            await _serve_started(settings, portal, app, run_dir / "portal.sock")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def _serve_started(
    settings: Settings, portal: Portal, app: FastAPI, socket_path: Path
) -> None:
    """Portal on its socket, routers on the public port, until a stop signal."""
    if portal.routes is None:
        raise RuntimeError("the portal is not started: it has no route table")
    server = portal_server(app, socket_path)
    portal_task = asyncio.create_task(server.serve(), name="portal")
    router = None
    supervisor = None
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, signum, received, stop)
    try:
        while not server.started:
            if portal_task.done():
                portal_task.result()
                return
            await asyncio.sleep(0.02)
        many = settings.router_workers > 1
        try:
            router = await start_router(
                portal.routes.table,
                settings.host,
                settings.port,
                f"unix:{socket_path}",
                settings,
                reuse_port=many,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {settings.host}:{settings.port} (host, port): "
                f"{exc.strerror or exc}"
            ) from None
        portal.activity.local = router.activities
        portal.activity.local_stats = lambda: router.ctx.stats
        if many:
            config = worker_config(
                settings,
                portal_url=f"unix:{socket_path}",
                stream_token=router_token(settings.signing_key()),
            )
            supervisor = WorkerSupervisor(config, settings.router_workers - 1)
            supervisor.start()
        resume_gc()
        log.info(
            "labgate serving on %s (%d router process%s)",
            settings.effective_public_url,
            settings.router_workers,
            "es" if many else "",
        )
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({stop_wait, portal_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        log.info(
            "labgate stopping (%s); instances keep running and are re-attached at the next start",
            received[0] if received else "the portal ended",
        )
    finally:
        portal.begin_shutdown()  # before the router closes the agents' connections
        if supervisor is not None:
            await supervisor.close()
        if router is not None:
            await router.close()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await portal_task


def _on_stop_signal(signum: signal.Signals, received: list[str], stop: asyncio.Event) -> None:
    """Note the first stop signal's name (for the log) and start shutting down."""
    if not received:
        received.append(signum.name)
    stop.set()


def _run_in_loop(main: Coroutine[Any, Any, None], stopped: str) -> None:
    """Run ``main`` on uvloop (asyncio without it) with labgate's logging; log ``stopped``."""
    configure_logging()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)
    log.info(stopped)


def run(settings: Settings) -> None:
    """Entry point of ``labgate serve``."""
    _run_in_loop(serve(settings), "labgate stopped")


async def serve_portal(settings: Settings) -> None:
    """Run one portal replica on ``host:port`` until SIGINT or SIGTERM.

    Refuses SQLite and the ``sites`` setting (:func:`~labgate.portal.app.refuse_unreplicable`)
    with a :class:`~labgate.errors.ConfigError` before anything listens.
    """
    check_data_dir(settings)
    check_tools_dir(settings)
    portal = build_portal(settings, replicated=True)
    app = create_app(settings, portal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # Routers say who the client is; only loopback and trusted_proxies are believed.
        proxy_headers=True,
        forwarded_allow_ips=["127.0.0.1", "::1", *settings.trusted_proxies],
        lifespan="off",  # run below, so a bad start is one line, not a traceback
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS,
    )
    server = _PortalServer(config, portal)
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_stop_signal, signum, received, stop)
    async with app.router.lifespan_context(app):
        try:
            listener = config.bind_socket()
        except SystemExit:  # uvicorn logged why (address in use, no such address)
            raise ConfigError(
                f"cannot listen on {settings.host}:{settings.port} (host, port)"
            ) from None
        task = asyncio.create_task(server.serve(sockets=[listener]), name="portal")
        resume_gc()
        stop_wait = asyncio.create_task(stop.wait())
        log.info(
            "labgate portal %s serving on http://%s:%d (%s)",
            portal.leader.replica,
            settings.host,
            listener.getsockname()[1],
            "leading" if portal.leader.leading else "not leading",
        )
        try:
            await asyncio.wait({stop_wait, task}, return_when=asyncio.FIRST_COMPLETED)
            log.info(
                "labgate portal stopping (%s); instances keep running",
                received[0] if received else "the server ended",
            )
        finally:
            stop_wait.cancel()
            portal.begin_shutdown()  # the agents' connections close with it: no departures
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task


def run_portal(settings: Settings) -> None:
    """Entry point of ``labgate portal``."""
    _run_in_loop(serve_portal(settings), "labgate portal stopped")


def router_config(settings: Settings, portal_url: str, *others: str) -> WorkerConfig:
    """How a stand-alone router reaches its portal (stream, activity and upstream).

    ``others`` are more portal replicas, used in turn when the one in use fails.
    """
    return worker_config(
        settings,
        portal_url=portal_url,
        stream_token=router_token(settings.signing_key()),
        other_portals=others,
        tunnel_url=tunnel_url(settings),
    )


def tunnel_url(settings: Settings) -> str:
    """Where tunneled sites' agents dial this router: ``router_tunnel_url``, or where it listens."""
    if settings.router_tunnel_url:
        return settings.router_tunnel_url
    scheme = "https" if settings.serves_tls else "http"
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{settings.port}"


def run_router(settings: Settings, portal_urls: list[str]) -> None:
    """Entry point of ``labgate router``: one router process in the foreground."""
    configure_logging()
    run_router_process(router_config(settings, *portal_urls))
