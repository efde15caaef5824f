"""Runs and quotas: running tasks hold their share of the owner's limits; usage is recorded."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime

from runs_helpers import submit, tasks_of, wait_run

TWO_AT_ONCE = """
name = "{name}"
[[stages]]
name = "both"
[[stages.tasks]]
name = "first"
command = "sleep 1; date +%s.%N > $LABGATE_RESULTS_DIR/end"
cpu = {cpu}
memory_mib = 256
[[stages.tasks]]
name = "second"
command = "sleep 1; date +%s.%N > $LABGATE_RESULTS_DIR/end"
cpu = {cpu}
memory_mib = 256
"""


async def test_a_task_past_the_users_limits_waits_with_the_reason_then_runs(
    client, make_user, admin_headers, settings
):
    alice = await make_user("alice")
    limits = {"instances": 1}
    answer = await client.put("/api/v1/users/alice/limits", json=limits, headers=admin_headers)
    assert answer.status_code == 200, answer.text
    run_id = await submit(client, alice, TWO_AT_ONCE.format(name="limited", cpu=1))
    run = await wait_run(client, alice, run_id, timeout=60)
    assert run["state"] == "succeeded", run  # it waited, it did not fail
    waits = [e for e in run["events"] if e["state"] == "waiting"]
    assert len(waits) == 1, waits
    assert "waiting for quota: alice has 1 of 1 allowed instances" in waits[0]["message"]
    # One at a time: the waiting task's attempt began after the other had ended.
    starts = {e["task"]: e["at"] for e in run["events"] if e["state"] == "running" and e["task"]}
    ends = {e["task"]: e["at"] for e in run["events"] if e["state"] == "succeeded" and e["task"]}
    waited = waits[0]["task"]
    other = ({"first", "second"} - {waited}).pop()
    assert datetime.fromisoformat(starts[waited]) >= datetime.fromisoformat(ends[other])


async def test_running_tasks_count_against_the_limits_of_instances_and_cpu(
    client, make_user, admin_headers
):
    alice = await make_user("alice")
    limits = {"cpu": 3}
    await client.put("/api/v1/users/alice/limits", json=limits, headers=admin_headers)
    run_id = await submit(
        client, alice, TWO_AT_ONCE.format(name="holding", cpu=1.5).replace("sleep 1", "sleep 4")
    )
    for _ in range(100):
        mine = (await client.get("/api/v1/users/me/limits", headers=alice)).json()
        if mine["use"]["instances"] == 2:
            break
        await asyncio.sleep(0.1)
    assert mine["use"]["instances"] == 2
    assert mine["use"]["cpu"] == 3 and mine["use"]["memory"] == 512 * 2**20
    # An instance does not fit beside the two tasks now.
    refused = await client.post(
        "/api/v1/instances", json={"tool": "demo", "resources": {"cpu": 1}}, headers=alice
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["quota"] == "cpu"
    run = await wait_run(client, alice, run_id, timeout=60)
    assert run["state"] == "succeeded", run
    mine = (await client.get("/api/v1/users/me/limits", headers=alice)).json()
    assert mine["use"]["instances"] == 0 and mine["use"]["cpu"] == 0


async def test_finished_tasks_leave_usage_records_with_core_hours(client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, TWO_AT_ONCE.format(name="counted", cpu=2))
    run = await wait_run(client, alice, run_id, timeout=60)
    assert run["state"] == "succeeded", run
    answer = await client.get(
        "/api/v1/usage/records", params={"tool": "run:counted"}, headers=alice
    )
    assert answer.status_code == 200, answer.text
    records = answer.json()
    assert len(records) == 2
    for record in records:
        assert record["user"] == "alice" and record["cpu"] == 2.0
        assert record["memory"] == 256 * 2**20
        assert record["reason"] == "succeeded" and record["stopped_at"] is not None
        assert record["site"] in ("alpha", "beta")
        # At least the task's second of sleep, at 2 cores.
        assert record["core_hours"] >= 2 * 1 / 3600
    report = await client.get("/api/v1/usage", params={"by": "tool"}, headers=alice)
    rows = {r["tool"]: r for r in report.json()["rows"]}
    assert rows["run:counted"]["instances"] == 2
    assert tasks_of(run)["first"]["site"] in ("alpha", "beta")


async def test_two_runs_of_one_owner_share_the_limits(client, make_user, admin_headers):
    alice = await make_user("alice")
    limits = {"instances": 1}
    await client.put("/api/v1/users/alice/limits", json=limits, headers=admin_headers)
    one = TWO_AT_ONCE.format(name="{name}", cpu=1).split('[[stages.tasks]]\nname = "second"')[0]
    first, second = await asyncio.gather(
        submit(client, alice, one.format(name="left")),
        submit(client, alice, one.format(name="right")),
    )
    spans = []
    for run_id in (first, second):
        run = await wait_run(client, alice, run_id, timeout=60)
        assert run["state"] == "succeeded", run
        events = [e for e in run["events"] if e["task"] == "first"]
        start = next(e["at"] for e in events if e["state"] == "running")
        end = next(e["at"] for e in events if e["state"] == "succeeded")
        spans.append((datetime.fromisoformat(start), datetime.fromisoformat(end)))
    spans.sort()
    assert spans[1][0] >= spans[0][1]  # one after the other, never both at once


async def test_a_groups_limits_apply_to_its_members_tasks_which_wait_with_the_reason(
    client, make_user, admin_headers
):
    alice, bob = await make_user("alice"), await make_user("bob")
    created = await client.post(
        "/api/v1/groups",
        json={"name": "physics", "limits": {"instances": 1}},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    for user in ("alice", "bob"):
        await client.put(f"/api/v1/groups/physics/members/{user}", headers=admin_headers)
    one = TWO_AT_ONCE.format(name="{name}", cpu=1).split('[[stages.tasks]]\nname = "second"')[0]
    # Alice's two tasks and Bob's one share the group's one place: one at a time.
    mine = await submit(client, alice, TWO_AT_ONCE.format(name="group", cpu=1))
    for _ in range(100):
        shown = (await client.get("/api/v1/groups/physics", headers=bob)).json()
        if shown["use"]["instances"] == 1:
            break
        await asyncio.sleep(0.1)
    assert shown["use"]["instances"] == 1  # a running task counts in its group's use
    # An instance charged to the group does not fit beside it either.
    refused = await client.post(
        "/api/v1/instances", json={"tool": "demo", "group": "physics"}, headers=bob
    )
    assert refused.status_code == 429 and refused.json()["scope"] == "group", refused.text
    theirs = await submit(client, bob, one.format(name="bobs"))
    spans = []
    for run_id, who in ((mine, alice), (theirs, bob)):
        run = await wait_run(client, who, run_id, timeout=60)
        assert run["state"] == "succeeded", run
        events = [e for e in run["events"] if e["task"]]
        for task in {e["task"] for e in events}:
            start = next(e["at"] for e in events if e["task"] == task and e["state"] == "running")
            end = next(e["at"] for e in events if e["task"] == task and e["state"] == "succeeded")
            spans.append((datetime.fromisoformat(start), datetime.fromisoformat(end)))
        waits = [e for e in events if e["state"] == "waiting"]
        assert waits, events  # Alice's second task, Bob's task
        assert (
            "waiting for quota: group physics has 1 of 1 allowed instances" in (waits[0]["message"])
        )
    spans.sort()
    assert len(spans) == 3
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))
    records = await client.get("/api/v1/usage/records", params={"tool": "run:bobs"}, headers=bob)
    assert [r["group"] for r in records.json()] == ["physics"]
