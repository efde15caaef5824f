"""Fixtures of the backend tests: the real Slurm cluster (``slurm_cluster``, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slurm_cluster import Cluster


@pytest.fixture
def slurm(slurm_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, its node emptied of jobs after the test."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()
