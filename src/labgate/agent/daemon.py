"""``labgate agent`` as a process: settings in, a :class:`~labgate.agent.remote.RemoteAgent` run.

The agent's own settings (environment, TOML file) say where its data lives
(``data_dir``: workspaces, logs, snapshots of this site) and how it runs
tools (``sandbox``, ``instance_uid_base``); the portal's welcome says which
backend and options the site has. The portal address and the token come
from the command line or the settings ``agent_portal`` and ``agent_token``
(for systemd: ``LABGATE_AGENT_PORTAL``, ``LABGATE_AGENT_TOKEN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from labgate.agent.remote import RemoteAgent, TokenRefused
from labgate.agent.site import SiteAgent
from labgate.config import Settings, SiteConfig
from labgate.datadir import prepare_data_dir
from labgate.errors import ConfigError
from labgate.startup import build_backend
from labgate.wire.agent import Welcome
from labgate.wire.site import Reporter

log = logging.getLogger("labgate.agent")


def build_site_agent(settings: Settings, config: SiteConfig, reporter: Reporter) -> SiteAgent:
    """The agent of one site: its backend from ``config``, its paths from ``settings``."""
    return SiteAgent(
        config.name,
        build_backend(settings, config),
        reporter,
        workspaces_dir=settings.workspaces_dir.resolve(),
        poll_interval=settings.poll_interval,
        stop_grace=settings.stop_grace_seconds,
        log_tail_lines=settings.log_tail_lines,
    )


def agent_factory(settings: Settings) -> Callable[[Welcome, Reporter], SiteAgent]:
    """Builds the site agent from the portal's welcome and this machine's settings."""

    def make(welcome: Welcome, reporter: Reporter) -> SiteAgent:
        config = SiteConfig(
            name=welcome.site,
            backend=welcome.backend,
            options=welcome.options,
            data_root=welcome.data_root,
        )
        return build_site_agent(settings, config, reporter)

    return make


def remote_agent(settings: Settings) -> RemoteAgent:
    """The agent of these settings; a :class:`ConfigError` when the portal or token is missing."""
    portal, token = settings.agent_portal, settings.agent_token.get_secret_value()
    if not portal:
        raise ConfigError("no portal address: give --portal or set LABGATE_AGENT_PORTAL")
    if not token:
        raise ConfigError("no site token: give --token or set LABGATE_AGENT_TOKEN")
    try:
        return RemoteAgent(
            portal,
            token,
            agent_factory(settings),
            reconnect_max=settings.agent_reconnect_max,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def serve_agent(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; raises :class:`TokenRefused` when the portal refuses."""
    prepare_data_dir(settings.data_dir)
    agent = remote_agent(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop()))
    log.info("agent: dialing %s", agent.url)
    await agent.run()


def run_agent(settings: Settings) -> None:
    """Entry point of ``labgate agent`` (uvloop when present)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve_agent(settings))
    else:
        uvloop.run(serve_agent(settings))


__all__ = ["TokenRefused", "build_site_agent", "run_agent", "serve_agent"]
