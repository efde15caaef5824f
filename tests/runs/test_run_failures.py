"""Runs that go wrong: retries, a failed stage, timeouts, cancel, re-run of failed tasks."""

from __future__ import annotations

import asyncio
import uuid

from runs_helpers import submit, tasks_of, wait_run

from servers import processes_with_env

FLAKY = """
name = "flaky"
[[stages]]
name = "one"
[[stages.tasks]]
name = "flaky"
# Fails on its first two attempts, then succeeds.
command = "echo attempt $LABGATE_ATTEMPT; [ $LABGATE_ATTEMPT -ge 3 ]"
retries = 2
where = {site = "alpha"}
"""


async def test_a_failing_task_is_retried_until_it_succeeds(client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, FLAKY)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    task = tasks_of(run)["flaky"]
    assert task["attempts"] == 3
    failures = [e for e in run["events"] if e["task"] == "flaky" and e["state"] == "failed"]
    assert len(failures) == 2
    assert "exited with status 1" in failures[0]["message"]


FAILS = """
name = "broken"
[[stages]]
name = "one"
[[stages.tasks]]
name = "bad"
command = "echo going wrong; exit 3"
retries = 1
[[stages.tasks]]
name = "slow"
command = "sleep 30"
[[stages]]
name = "never"
[[stages.tasks]]
name = "after"
command = "true"
"""


async def test_a_task_failing_for_good_fails_its_stage_and_the_run(client, make_user):
    alice = await make_user("alice")
    run_id = await submit(client, alice, FAILS)
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "failed", run
    assert "bad" in run["reason"]
    tasks = tasks_of(run)
    assert tasks["bad"]["state"] == "failed", run["events"]
    assert tasks["bad"]["attempts"] == 2
    assert tasks["bad"]["exit_code"] == 3
    assert tasks["slow"]["state"] == "cancelled"  # stopped: its stage had failed
    assert tasks["after"]["state"] == "pending"  # its stage never started
    tails = [e["data"].get("log_tail", "") for e in run["events"] if e["task"] == "bad"]
    assert any("going wrong" in t for t in tails)

    # Re-run failed tasks only: "bad" fails again, "after" still never runs.
    again = await client.post(f"/api/v1/runs/{run_id}/rerun", headers=alice)
    assert again.status_code == 200, again.text
    run = await wait_run(client, alice, run_id, timeout=30)
    assert tasks_of(run)["bad"]["attempts"] == 2


async def test_continue_on_failure_lets_the_run_go_on(client, make_user):
    alice = await make_user("alice")
    definition = """
name = "cof"
[[stages]]
name = "one"
continue_on_failure = true
[[stages.tasks]]
name = "good"
command = "echo good > $LABGATE_RESULTS_DIR/good.txt"
[[stages.tasks]]
name = "bad"
command = "exit 1"
[[stages]]
name = "two"
[[stages.tasks]]
name = "last"
command = "true"
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded"
    assert run["stages"][0]["state"] == "failed"
    assert tasks_of(run)["last"]["state"] == "succeeded"
    assert "continue on failure" in run["reason"]
    busy = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert busy.status_code == 409


async def test_a_task_over_its_timeout_fails(client, make_user):
    alice = await make_user("alice")
    definition = """
[[stages]]
name = "one"
[[stages.tasks]]
name = "sleepy"
command = ["sleep", "30"]
timeout = 0.5
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=20)
    assert run["state"] == "failed"
    assert "timed out after 0.5s" in tasks_of(run)["sleepy"]["reason"]


async def test_a_task_that_ignores_sigterm_is_killed_at_its_timeout(client, make_user):
    """The executor's SIGTERM ends the sandbox's outer ``bwrap`` at once; the task inside,
    ignoring it, must not outlive its attempt: the whole group gets SIGKILL after it."""
    alice = await make_user("alice")
    mark = uuid.uuid4().hex
    definition = f"""
[[stages]]
name = "one"
[[stages.tasks]]
name = "stubborn"
command = "trap '' TERM; sleep 300"
timeout = 1
environment = {{variables = {{TEST_MARK = "{mark}"}}}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "failed"
    assert "timed out after 1" in tasks_of(run)["stubborn"]["reason"]
    for _ in range(50):
        left = processes_with_env("TEST_MARK", mark)
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == [], "the task's processes outlived its attempt"


async def test_cancel_in_the_middle_stops_running_tasks(client, make_user, app):
    alice = await make_user("alice")
    definition = """
[[stages]]
name = "one"
[[stages.tasks]]
name = "long"
command = ["sleep", "60"]
where = {copies = 2}
[[stages]]
name = "two"
[[stages.tasks]]
name = "next"
command = "true"
"""
    run_id = await submit(client, alice, definition)
    await wait_run(client, alice, run_id, states=("running",))
    for _ in range(100):
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        if any(e["state"] == "running" and e["task"] == "long#1" for e in run["events"]):
            break
        await asyncio.sleep(0.05)
    cancelled = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    portal = app.state.portal
    # The processes end: every attempt's executor reports "cancelled".
    for _ in range(100):
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
        ends = [
            e for e in run["events"] if e["task"].startswith("long") and e["state"] == "cancelled"
        ]
        if len(ends) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(ends) == 2, run["events"]
    tasks = tasks_of(run)
    assert tasks["long"]["state"] == tasks["long#1"]["state"] == "cancelled"
    assert tasks["next"]["state"] == "cancelled"  # never started
    assert not any(link.agent.tasks.watched for link in portal.links.values())


async def test_a_late_report_of_an_attempt_from_before_a_rerun_changes_nothing(
    app, client, make_user
):
    """Seen in CI: a re-run at once after a failure, while the cancelled task's site has
    not yet said that its attempt ended; its late "cancelled" then finished the re-run
    task, and the re-run failed with its other tasks never tried."""
    from sqlalchemy import select

    from labgate.db.runs import AttemptState, RunTask, TaskAttempt
    from labgate.wire.site import Report

    alice = await make_user("alice")
    run_id = await submit(client, alice, FAILS)
    assert (await wait_run(client, alice, run_id, timeout=30))["state"] == "failed"
    portal = app.state.portal

    def reopen_slow(session) -> str | None:
        """As if the site had not reported the end of "slow"'s attempt yet."""
        task = session.scalar(
            select(RunTask).where(RunTask.run_id == run_id, RunTask.name == "slow")
        )
        attempt = task.attempt_rows[-1]
        if not attempt.state.terminal:
            return None  # its real report is still on the way: wait for it first
        attempt.state, attempt.finished_at = AttemptState.running, None
        return str(attempt.id)

    async with asyncio.timeout(20):
        while (old_attempt := await portal.run_db(reopen_slow)) is None:
            await asyncio.sleep(0.1)
    again = await client.post(f"/api/v1/runs/{run_id}/rerun", headers=alice)
    assert again.status_code == 200, again.text
    await portal.run_processor.apply(
        Report(old_attempt, "cancelled", kind="task", message="cancelled at the site")
    )
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "failed" and "bad" in run["reason"], run
    assert tasks_of(run)["bad"]["attempts"] == 2  # the re-run did run it, twice
    old = await portal.run_db(lambda s: s.get(TaskAttempt, old_attempt))
    assert (old.state, old.reason) == (AttemptState.cancelled, "replaced by a re-run")
