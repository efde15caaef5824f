"""A process task's ``cpu`` and ``memory_mib`` are limits it runs under, as for instances."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from runs_helpers import submit, tasks_of, wait_run

from labgate.backends import cgroups

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
    pytest.mark.skipif(
        os.geteuid() != 0 or cgroups.hierarchy() is None,
        reason="needs root and cgroups (the memory limit of a task is its cgroup's)",
    ),
]

# Writes every page of 200 MiB: resident memory, not just address space.
GREEDY = "import sys; data = 'x' * (200 * 2**20); print('allocated', len(data))"
# What the task sees of its limits: the CPUs it may run on, and its cgroup.
LOOK = (
    "import os; print('cpus', len(os.sched_getaffinity(0)));print(open('/proc/self/cgroup').read())"
)


async def test_a_task_past_its_memory_is_killed_and_fails_with_the_reason(client, make_user):
    alice = await make_user("alice")
    definition = f"""
name = "greedy"
[[stages]]
name = "one"
continue_on_failure = true
[[stages.tasks]]
name = "greedy"
command = ["python3", "-c", "{GREEDY}"]
memory_mib = 64
[[stages.tasks]]
name = "roomy"
command = ["python3", "-c", "{GREEDY}"]
memory_mib = 512
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    tasks = tasks_of(run)
    assert tasks["roomy"]["state"] == "succeeded", run
    greedy = tasks["greedy"]
    assert greedy["state"] == "failed", run
    assert "out of memory: limit 64 MiB" in greedy["reason"], greedy
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "greedy"}, headers=alice)
    assert "allocated" not in logs.json()["text"]


async def test_a_task_runs_on_its_cpus_in_a_cgroup_of_its_own(client, make_user):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to see one taken away")
    alice = await make_user("alice")
    definition = f"""
name = "look"
[[stages]]
name = "one"
[[stages.tasks]]
name = "look"
command = ["python3", "-c", "{LOOK}"]
cpu = 1
memory_mib = 128
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "look"}, headers=alice)
    text = logs.json()["text"]
    assert "cpus 1" in text, text
    mine = re.search(r"/labgate/(task-[0-9a-f]+)", text)
    assert mine is not None, text
    # Its cgroup is removed once it ended.
    found = cgroups.hierarchy()
    assert found is not None
    assert not [p for p in found.parents.values() if (p / mine.group(1)).exists()]
