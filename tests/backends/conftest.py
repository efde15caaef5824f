"""Fixtures of the backend tests: the real Slurm cluster, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slurm_cluster import Cluster, start_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """munged, slurmctld and slurmd on this machine (one node); skips outside CI without them."""
    with start_cluster() as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, its node emptied of jobs after the test."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()
