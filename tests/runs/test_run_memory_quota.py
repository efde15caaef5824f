"""A task that asks no memory (``memory_mib = 0``: no memory limit) under memory limits.

Such a task could hold any amount of memory while it is charged none, so
while its owner's memory is limited (or every one of their groups') it never
runs: the run is refused at submission (422), and a task reaching placement
after a limit was set fails there with the reason. Users without memory
limits run it as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runs_helpers import submit, tasks_of, wait_run

ONE_TASK = """
name = "{name}"
[[stages]]
name = "only"
[[stages.tasks]]
name = "hog"
command = "sleep 30"
cpu = 0.5
"""

#: A first stage that holds the run (2 s) while the test sets a limit, then a second one
#: with a task asking no memory and, beside it, one asking some.
GATED = """
name = "gated"
[[stages]]
name = "gate"
[[stages.tasks]]
name = "wait"
command = "sleep 2"
cpu = 0.5
memory_mib = 64
[[stages]]
name = "after"
continue_on_failure = {go_on}
[[stages.tasks]]
name = "hog"
command = "sleep 30"
cpu = 0.5
[[stages.tasks]]
name = "sized"
command = "true"
cpu = 0.5
memory_mib = 64
"""


async def _limit(client: Any, admin_headers: dict[str, str], user: str, **limits: Any) -> None:
    answer = await client.put(f"/api/v1/users/{user}/limits", json=limits, headers=admin_headers)
    assert answer.status_code == 200, answer.text


async def _group(
    client: Any, admin_headers: dict[str, str], name: str, limits: dict[str, Any], *members: str
) -> None:
    made = await client.post(
        "/api/v1/groups", json={"name": name, "limits": limits}, headers=admin_headers
    )
    assert made.status_code == 201, made.text
    for user in members:
        joined = await client.put(f"/api/v1/groups/{name}/members/{user}", headers=admin_headers)
        assert joined.status_code in (200, 201, 204), joined.text


async def test_a_task_asking_no_memory_is_refused_at_submission_while_memory_is_limited(
    client, make_user, admin_headers
):
    """The reviewer's proof: alice holds all her memory, then asks for a task with none."""
    alice = await make_user("alice")
    await _limit(client, admin_headers, "alice", memory="256M")
    held = await client.post(
        "/api/v1/instances", json={"tool": "demo", "resources": {"memory": "256M"}}, headers=alice
    )
    assert held.status_code == 202, held.text
    answer = await client.post(
        "/api/v1/runs",
        content=ONE_TASK.format(name="hog"),
        headers={**alice, "Content-Type": "text/plain"},
    )
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"] == "memory_required"
    assert "task hog" in body["detail"] and "memory_mib" in body["detail"], body
    assert "alice's memory is limited (256 MiB)" in body["detail"], body
    assert (await client.get("/api/v1/runs", headers=alice)).json() == []  # nothing stored
    # With memory_mib it is taken, and waits for the memory alice holds.
    sized = ONE_TASK.format(name="sized") + "memory_mib = 64\n"
    run_id = await submit(client, alice, sized)
    await asyncio.sleep(0.5)
    task = tasks_of((await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json())["hog"]
    assert task["state"] == "pending" and task["reason"].startswith("waiting for quota"), task
    await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)


async def test_a_task_asking_no_memory_fails_at_placement_once_memory_is_limited(
    client, make_user, admin_headers
):
    """Limited after the submission: the task fails when its stage comes, never runs."""
    alice = await make_user("alice")
    run_id = await submit(client, alice, GATED.format(go_on="false"))
    await _limit(client, admin_headers, "alice", memory="256M")
    early = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
    assert early["stages"][1]["state"] == "pending", early  # the limit came first
    run = await wait_run(client, alice, run_id, timeout=30)  # it does not wait for ever
    assert run["state"] == "failed", run
    hog = tasks_of(run)["hog"]
    assert hog["state"] == "failed" and hog["attempts"] == 0 and hog["site"] is None, hog
    assert "memory_mib = 0" in hog["reason"], hog
    assert "alice's memory is limited (256 MiB)" in hog["reason"], hog
    assert "stage after" in run["reason"] and "hog" in run["reason"], run
    assert tasks_of(run)["sized"]["attempts"] == 0  # the stage failed before placing it
    failed = [e for e in run["events"] if e["task"] == "hog" and e["state"] == "failed"]
    assert len(failed) == 1 and "memory_mib" in failed[0]["message"], run["events"]
    records = await client.get("/api/v1/usage/records", params={"tool": "run:gated"}, headers=alice)
    assert len(records.json()) == 1  # the gate's attempt only


async def test_in_a_stage_that_continues_on_failure_the_others_run(
    client, make_user, admin_headers
):
    alice = await make_user("alice")
    run_id = await submit(client, alice, GATED.format(go_on="true"))
    await _limit(client, admin_headers, "alice", memory="256M")
    run = await wait_run(client, alice, run_id, timeout=30)
    tasks = tasks_of(run)
    assert tasks["hog"]["state"] == "failed" and tasks["hog"]["attempts"] == 0, tasks
    assert "memory_mib" in tasks["hog"]["reason"]
    assert tasks["sized"]["state"] == "succeeded", tasks
    assert run["state"] == "succeeded" and "continue on failure" in run["reason"], run


async def test_a_groups_memory_limit_holds_for_tasks_asking_no_memory(
    client, make_user, admin_headers
):
    """Every group limits memory: refused. One does not: the task is charged to that one."""
    alice = await make_user("alice")
    await _group(client, admin_headers, "aaa", {"memory": "1G"}, "alice")
    refused = await client.post(
        "/api/v1/runs",
        content=ONE_TASK.format(name="hog"),
        headers={**alice, "Content-Type": "text/plain"},
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "memory_required"
    assert "group aaa limits memory (1024 MiB)" in refused.json()["detail"], refused.text
    # In a second group, without a memory limit, it runs, charged to that one (not to aaa,
    # the first by name, which would otherwise admit it).
    await _group(client, admin_headers, "bbb", {"instances": 3}, "alice")
    run_id = await submit(client, alice, ONE_TASK.format(name="hog").replace("30", "0.2"))
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "succeeded", run
    records = await client.get("/api/v1/usage/records", params={"tool": "run:hog"}, headers=alice)
    [record] = records.json()
    assert record["group"] == "bbb" and record["memory"] == 0, record


async def test_without_memory_limits_a_task_asking_no_memory_runs_as_before(client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, ONE_TASK.format(name="free").replace("30", "0.2"))
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "succeeded", run
