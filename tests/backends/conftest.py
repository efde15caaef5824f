"""Fixtures of the backend tests: the real Slurm cluster (``slurm_cluster``, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import TEST_SECRET_KEY
from labgate.agent.site import SiteAgent
from labgate.backends.slurm import SlurmBackend
from labgate.config import Settings
from labgate.tools.catalog import Catalog, Tool
from slurm_agents import SITE, Recorder
from slurm_cluster import Cluster, outward_address


@pytest.fixture
def slurm(slurm_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, its node emptied of jobs after the test."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()


@pytest.fixture
def node_address() -> str:
    """This machine's outward address, as a compute node's is to a router on another host."""
    found = outward_address()
    if found is None:
        pytest.skip("this machine has no non-loopback IPv4 address (no default route)")
    return found


@pytest.fixture
def slurm_dir(slurm: Cluster) -> Path:
    """A directory for one test's job directories and workspaces that the test accounts reach."""
    return slurm.area()


@pytest.fixture
def demo() -> Tool:
    """The real demo tool."""
    tool = Catalog.load().get("demo")
    assert tool is not None
    return tool


@pytest.fixture
async def make_agent(tmp_path: Path, slurm: Cluster, slurm_dir: Path) -> Any:
    """Site agents of one Slurm site, as a (re)started ``labgate agent`` builds them."""
    settings = Settings(data_dir=tmp_path / "var", secret_key=TEST_SECRET_KEY)
    agents: list[SiteAgent] = []

    def make(**extra: Any) -> tuple[SiteAgent, Recorder]:
        options = slurm.options(
            endpoint_host="127.0.0.1",
            request_memory=False,
            jobs_dir=str(slurm_dir / "jobs"),
            workspaces_dir=str(slurm_dir / "workspaces"),
            **extra,
        )
        recorder = Recorder()
        agent = SiteAgent(
            SITE,
            SlurmBackend(settings, options),
            recorder,
            workspaces_dir=tmp_path / "workspaces",
            poll_interval=0.2,
            stop_grace=3,
        )
        agents.append(agent)
        return agent, recorder

    yield make
    for agent in agents:
        await agent.close()  # closing twice is fine; the jobs are cancelled by ``slurm``
