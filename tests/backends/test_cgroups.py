"""The cgroups instances and tasks are placed in, made by parallel agents (real cgroups)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from labgate.backends import cgroups


def _v1_cpuset() -> Path | None:
    found = cgroups.hierarchy()
    if found is None or found.version != 1 or "cpuset" not in found.parents:
        return None
    return found.parents["cpuset"].parent


@pytest.fixture
def fresh_cpuset() -> Iterator[Path]:
    """A new, empty v1 cpuset next to labgate's parent (removed afterwards)."""
    base = _v1_cpuset()
    if base is None:
        pytest.skip("needs root and a cgroup v1 cpuset hierarchy (the v1 parents start empty)")
    path = base / f"labgate-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            if child.is_dir():
                child.rmdir()
        path.rmdir()


def test_a_parent_half_prepared_by_another_agent_gets_its_mems(fresh_cpuset: Path) -> None:
    # Another agent made the parent and wrote its cpus, and not yet its mems.
    cpus = (fresh_cpuset.parent / "cpuset.cpus").read_text().strip()
    (fresh_cpuset / "cpuset.cpus").write_text(cpus)
    assert not (fresh_cpuset / "cpuset.mems").read_text().strip()

    mems = cgroups._prepare_v1_cpuset(fresh_cpuset)

    assert mems == (fresh_cpuset.parent / "cpuset.mems").read_text().strip()
    assert (fresh_cpuset / "cpuset.mems").read_text().strip() == mems
    # A child made as create() makes it takes a process.
    child = fresh_cpuset / "child"
    child.mkdir()
    (child / "cpuset.cpus").write_text(cpus)
    (child / "cpuset.mems").write_text(mems)
    proc = subprocess.Popen(["sleep", "5"])
    try:
        (child / "tasks").write_text(str(proc.pid))
        assert f"{child.name}" in Path(f"/proc/{proc.pid}/cpuset").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_made_cgroups_take_their_processes_and_are_removed() -> None:
    if os.geteuid() != 0 or cgroups.hierarchy() is None:
        pytest.skip("needs root and cgroups")
    instance = f"test-{uuid.uuid4().hex[:8]}"
    made = cgroups.create(instance, 0.5, (), 64 * 2**20, 64)
    assert made is not None
    proc = subprocess.Popen(["sleep", "5"])
    try:
        for name in made.join_files():
            Path(name).write_text(str(proc.pid))
        text = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert instance in text
    finally:
        proc.kill()
        proc.wait()
    assert cgroups.remove(made.paths, 2.0)
    assert cgroups.paths_of(instance) == []
