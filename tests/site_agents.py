"""Site agents for tests, in the test's own process: a real RemoteAgent dialing a real portal."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from helpers import TEST_SECRET_KEY
from labgate.agent.daemon import build_site_agent
from labgate.agent.remote import RemoteAgent
from labgate.agent.site import SiteAgent
from labgate.config import Settings, SiteConfig
from labgate.datadir import prepare_data_dir


def site_settings(data_dir: Path) -> Settings:
    """The settings of a site's machine: its own data dir, quick polling."""
    settings = Settings(
        data_dir=data_dir,
        secret_key=TEST_SECRET_KEY,
        poll_interval=0.2,
        stop_grace_seconds=2,
        sandbox="none" if os.geteuid() != 0 else "auto",
    )
    prepare_data_dir(settings.data_dir)
    return settings


def make_agent_for(
    settings: Settings, site: str, reporter: Any, backend: str = "process"
) -> SiteAgent:
    """A site agent with a real backend, as ``labgate agent`` builds it."""
    return build_site_agent(settings, SiteConfig(name=site, backend=backend), reporter)


@contextlib.asynccontextmanager
async def remote_agent(
    portal_url: str,
    token: str,
    data_dir: Path,
    prepare: Callable[[SiteAgent], None] | None = None,
) -> AsyncIterator[RemoteAgent]:
    """A RemoteAgent dialing ``portal_url`` until the block ends (instances are left running).

    ``prepare`` is given each site agent it makes (a test changes its backend there).
    """
    settings = site_settings(data_dir)

    def make(welcome: Any, reporter: Any) -> SiteAgent:
        agent = make_agent_for(settings, welcome.site, reporter)
        if prepare is not None:
            prepare(agent)
        return agent

    remote = RemoteAgent(
        portal_url,
        token,
        make,
        reconnect_base=0.05,
        reconnect_max=0.3,
    )
    task = asyncio.create_task(remote.run())
    try:
        yield remote
    finally:
        await remote.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)
