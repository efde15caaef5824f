"""``labgate router`` as its own process, and N of them on one port.

Each worker process runs uvloop, its own :class:`~labgate.router.server.Router`
and its own :class:`~labgate.router.sync.RouteSync` following the portal's
route stream. Workers share the public port through SO_REUSEPORT, so the
kernel spreads connections across them and each uses one core. A worker
waits (up to ``sync_wait`` seconds) for its first snapshot before it
accepts connections, so a restarted router never answers from an empty
table while the portal is up. A spawned worker stops by itself when the
process that spawned it dies (even by SIGKILL): an orphan would keep the
public port and answer from a stale route table, revoked sessions included.

The portal (``labgate serve`` with ``router_workers > 1``) or ``labgate
router`` calls::

    config = worker_config(settings, portal_url="unix:/run/portal.sock", stream_token=tok)
    processes = spawn_workers(config, settings.router_workers)   # returns at once
    ...
    stop_workers(processes)

(:class:`~labgate.router.supervisor.WorkerSupervisor` does this and replaces
workers that die),

or, in the foreground of one process, ``run_router_process(config)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from pathlib import Path

from labgate.aio import cancel_and_wait, wait_for
from labgate.config import Settings
from labgate.gcpause import pause as pause_gc
from labgate.gcpause import resume as resume_gc
from labgate.router.context import RouterOptions
from labgate.router.server import Router, options_from_settings
from labgate.router.sync import ActivityReporter, RouteSync
from labgate.router.tls import CertificateWatcher
from labgate.security import SessionSigner
from labgate.wire.routes import RouteTable

log = logging.getLogger("labgate.router")

#: Seconds a stopping router process gives the requests in flight (below the
#: TimeoutStopSec of deploy/systemd/labgate-router@.service).
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a router worker needs; picklable, so it crosses into spawned processes.

    ``portal_url`` is where the route stream and activity endpoint are
    (``http://HOST:PORT`` or ``unix:/path``); ``portal_upstream`` is where
    non-instance requests are proxied (usually the same place).
    ``other_portals`` are more portal replicas on one database: stream,
    activity and (without ``portal_upstream``) portal traffic move to the next
    one when the one in use fails.
    """

    host: str
    port: int
    portal_url: str
    stream_token: str
    signing_key: str
    session_max_age: int
    portal_upstream: str = ""
    reuse_port: bool = True
    options: RouterOptions = field(default_factory=RouterOptions)
    sync_wait: float = 30.0
    activity_interval: float = 30.0
    #: The spawning process; the worker stops when it is gone (0: not watched).
    parent_pid: int = 0
    #: HTTPS: the certificate and key files (empty: plain HTTP), checked for renewal so often.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_reload_interval: float = 10.0
    other_portals: tuple[str, ...] = ()
    #: Where tunneled sites' agents dial this router, told to the portal on the route
    #: stream (``labgate router``); empty: not told (``labgate serve``: the public URL).
    tunnel_url: str = ""

    @property
    def upstream(self) -> str:
        """Where portal traffic goes."""
        return self.portal_upstream or self.portal_url


def worker_config(
    settings: Settings,
    *,
    portal_url: str,
    stream_token: str,
    portal_upstream: str = "",
    host: str | None = None,
    port: int | None = None,
    other_portals: tuple[str, ...] = (),
    tunnel_url: str = "",
) -> WorkerConfig:
    """A worker config from labgate's settings."""
    return WorkerConfig(
        other_portals=other_portals,
        tunnel_url=tunnel_url,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        portal_url=portal_url,
        stream_token=stream_token,
        signing_key=settings.signing_key(),
        session_max_age=settings.session_max_age,
        portal_upstream=portal_upstream,
        options=options_from_settings(settings),
        tls_cert_file=str(settings.tls_cert_file or ""),
        tls_key_file=str(settings.tls_key_file or ""),
        tls_reload_interval=settings.tls_reload_interval,
    )


async def serve_worker(config: WorkerConfig, stop: asyncio.Event) -> None:
    """Run one worker in the current loop until ``stop`` is set."""
    table = RouteTable()
    signer = SessionSigner(config.signing_key, config.session_max_age)
    others = config.other_portals
    router = Router(
        table,
        signer,
        config.upstream,
        config.options,
        other_portals=() if config.portal_upstream else others,
    )
    # A big table is a million long-lived objects; frozen, the cyclic GC stops
    # walking them on every full collection (which doubled CPU per request at
    # 100,000 routes in benchmarks/router.py).
    sync = RouteSync(
        table,
        config.portal_url,
        config.stream_token,
        on_snapshot=gc.freeze,
        other_portals=others,
        tunnel_url=config.tunnel_url,
    )
    router.ctx.portal_connected = sync.portal_answered
    reporter = ActivityReporter(
        router.activities,
        config.portal_url,
        config.stream_token,
        interval=config.activity_interval,
        stats=lambda: router.ctx.stats,
        other_portals=others,
    )
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(sync.run()), loop.create_task(reporter.run())]
    if config.parent_pid:
        _stop_with_parent(config.parent_pid, stop)
    try:
        with contextlib.suppress(TimeoutError):
            await wait_for(sync.synced.wait(), config.sync_wait)
        if not sync.synced.is_set():
            log.warning("router: no route snapshot yet (%s); serving anyway", sync.last_error)
        if config.tls_cert_file and config.tls_key_file:
            router.tls = CertificateWatcher(
                Path(config.tls_cert_file), Path(config.tls_key_file), config.tls_reload_interval
            )
            router.tls.start()
        await router.listen(config.host, config.port, reuse_port=config.reuse_port)
        resume_gc()  # paused by run_router_process or the CLI
        await stop.wait()
        # Asked to stop: what is being answered is answered first.
        await router.drain(DRAIN_SECONDS)
    finally:
        await cancel_and_wait(*tasks)
        await router.close()


def _stop_with_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once the spawning process exits (even by SIGKILL).

    A pidfd of the parent becomes readable when it exits. Not
    PR_SET_PDEATHSIG: that fires when the spawning *thread* ends, and workers
    may be spawned from a short-lived thread.
    """

    def gone() -> None:
        log.warning("router worker %d: the process that started it is gone", os.getpid())
        stop.set()

    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        gone()
        return
    if os.getppid() != parent_pid:  # the pid was reused by another process already
        os.close(pidfd)
        gone()
        return
    loop = asyncio.get_running_loop()

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        gone()

    loop.add_reader(pidfd, on_exit)


def run_router_process(config: WorkerConfig) -> None:
    """Run one worker in the foreground (uvloop) until SIGTERM or SIGINT."""
    pause_gc()  # until it listens with its routes: labgate.gcpause
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_worker(config, stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def spawn_workers(config: WorkerConfig, count: int) -> list[BaseProcess]:
    """Start ``count`` worker processes sharing ``config.port`` (SO_REUSEPORT).

    ``config.port`` must be a fixed port: with 0 every worker would get its own.
    """
    if count > 1 and config.port == 0:
        raise ValueError("several workers need a fixed port to share")
    return [spawn_worker(config, index) for index in range(count)]


def spawn_worker(config: WorkerConfig, index: int) -> BaseProcess:
    """Start one worker process (a fresh interpreter) on ``config.port``, shared."""
    # The process of `labgate serve` (or the first `labgate router`) is worker 0.
    options = replace(config.options, worker_index=index + 1)
    config = replace(config, reuse_port=True, parent_pid=os.getpid(), options=options)
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=run_router_process, args=(config,), name=f"labgate-router-{index}", daemon=True
    )
    process.start()
    return process


def stop_workers(processes: list[BaseProcess], timeout: float = 10.0) -> None:
    """Ask workers to stop (SIGTERM), then kill any that linger."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
