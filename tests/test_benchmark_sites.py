"""``benchmarks/sites.py``'s layouts: where the traffic runs put the gateway and the sites.

The benchmark checks its throughput targets with the gateway's processes on
one half of the CPUs and the sites' (agents and their instances) on the
other, as on separate machines. These tests start real processes, place them
as the benchmark does and read back the kernel's CPU affinity of every
thread; and they check which layout the targets are read from. Nothing is
timed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sites() -> ModuleType:
    # It imports the router benchmark's helpers as ``router``, which in this test session
    # is the package tests/router: the benchmark's module stands in while it loads.
    saved = sys.modules.get("router")
    sys.modules["router"] = load("router_benchmark", BENCHMARKS / "router.py")
    try:
        return load("sites_benchmark", BENCHMARKS / "sites.py")
    finally:
        if saved is None:
            del sys.modules["router"]
        else:
            sys.modules["router"] = saved


@pytest.fixture
def two_trees() -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Two processes, each with a child of its own (as ``serve`` and an agent have instances)."""
    procs = [
        subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"], start_new_session=True)
        for _ in range(2)
    ]
    deadline = time.monotonic() + 10
    while any(not children(p.pid) for p in procs):
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.02)
    yield procs[0], procs[1]
    for proc in procs:
        os.killpg(proc.pid, 9)
        proc.wait()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def affinity(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_separate_puts_gateway_and_sites_on_their_halves_and_back(
    sites: ModuleType, two_trees: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]
) -> None:
    gateway, site = two_trees
    everything = affinity(0)
    halves = sites.cpu_halves()
    assert halves is not None
    low, high = set(halves[0]), set(halves[1])
    assert low and high and not low & high and low | high == everything
    with sites.placed("separate", [gateway.pid], [site.pid]):
        for pid in [gateway.pid, *children(gateway.pid)]:
            assert affinity(pid) == low
        for pid in [site.pid, *children(site.pid)]:
            assert affinity(pid) == high
        # This process (which starts wrk) is on the gateway's side; a process it starts
        # now inherits that.
        assert affinity(0) == low
        started = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert started.stdout.strip() == str(sorted(low))
    for pid in [gateway.pid, *children(gateway.pid), site.pid, *children(site.pid), 0]:
        assert affinity(pid) == everything


def test_shared_leaves_every_process_where_it_was(
    sites: ModuleType, two_trees: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]
) -> None:
    gateway, site = two_trees
    before = {pid: affinity(pid) for pid in (0, gateway.pid, site.pid)}
    with sites.placed("shared", [gateway.pid], [site.pid]):
        assert {pid: affinity(pid) for pid in before} == before
    assert {pid: affinity(pid) for pid in before} == before


def test_task_ids_reach_threads_and_descendants(
    sites: ModuleType, two_trees: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]
) -> None:
    gateway, _ = two_trees
    found = sites.task_ids(gateway.pid)
    assert gateway.pid in found and set(children(gateway.pid)) <= set(found)
    assert sites.task_ids(gateway.pid, descendants=False) == [gateway.pid]
    assert sites.task_ids(2**22 + 12345) == []  # no such process: nothing, no error


def results(separate: tuple[float, float] | None, shared: tuple[float, float]) -> dict[str, Any]:
    """A run's results with the tunnel's small req/s and MiB/s at these fractions of direct."""

    def layout(rps: float, mib: float) -> dict[str, Any]:
        best = {
            site: {
                "small_rps": 1000.0,
                "big_mib_s": 1000.0,
                "ws_roundtrips_s": 1000.0,
                "serve_cpu_us_per_req": 20.0,
            }
            for site in ("local", "direct")
        }
        best["tunnel"] = best["direct"] | {"small_rps": 1000 * rps, "big_mib_s": 1000 * mib}
        return {"best": best, "runs": {}}

    traffic: dict[str, Any] = {"shared": layout(*shared)}
    if separate is not None:
        traffic["separate"] = layout(*separate)
        traffic["cpus"] = {"gateway": [0], "sites": [1]}
    summary = {"n": 5, "p50": 0.1, "p95": 0.2, "min": 0.1, "max": 0.2}
    idle = {"cpu_pct_of_core": 1.0, "rss_mib": 100.0}
    return {
        "args": {
            "connections": 16,
            "ws_conns": 16,
            "duration": 5,
            "rounds": 2,
            "launches": 5,
            "idle": 30,
        },
        "traffic": traffic,
        "launch": {site: summary for site in ("local", "direct", "tunnel")},
        "agents": {
            "agents": 200,
            "heartbeat_s": 10,
            "hello_all_s": 1.0,
            "all_connected_s": 1.2,
            "idle_no_agents": idle,
            "idle_agents": idle,
        },
    }


def test_throughput_targets_are_read_from_the_separate_layout(sites: ModuleType) -> None:
    checked = {n: (v, m) for n, v, _, m in sites.targets(results((0.55, 0.9), (0.45, 0.6)))}
    assert checked["tunnel / direct, small req/s (separate)"] == ("0.55x", True)
    assert checked["tunnel / direct, 1 MiB MiB/s (separate)"] == ("0.90x", True)
    checked = {n: (v, m) for n, v, _, m in sites.targets(results((0.45, 0.6), (0.9, 0.9)))}
    assert checked["tunnel / direct, small req/s (separate)"] == ("0.45x", False)
    assert checked["tunnel / direct, 1 MiB MiB/s (separate)"] == ("0.60x", False)
    # Both layouts are in the table, each with its own ratios.
    text = sites.table(results((0.55, 0.9), (0.45, 0.6)))
    assert "separate: the gateway" in text and "on CPUs 0, the agents" in text
    assert "| tunnel / direct | 0.55x | 0.90x |" in text
    assert "| tunnel / direct | 0.45x | 0.60x |" in text


def test_one_cpu_checks_the_shared_layout(sites: ModuleType) -> None:
    checked = {n: (v, m) for n, v, _, m in sites.targets(results(None, (0.6, 0.75)))}
    assert checked["tunnel / direct, 1 MiB MiB/s (shared)"] == ("0.75x", True)
    assert "separate" not in sites.table(results(None, (0.6, 0.75)))
