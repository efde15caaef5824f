"""Fixtures of the backend tests: the real Slurm cluster (``slurm_cluster``, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
