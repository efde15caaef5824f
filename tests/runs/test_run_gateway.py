"""The task gateway: an attempt's executor reports its state and result to the portal itself.

The executor (``labgate.agent.taskexec``) of a network site's task tells
``POST /api/v1/tasks/<attempt>/state`` with its own token (a real one does in
``tests/agent/test_network_runs.py``); the site's agent reports the attempt
too, and the first word counts. The files still come from the site, also when
its word comes late. Here the executor's word is sent by the test, on a local
site whose agent is in the portal's process.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from runs_helpers import submit, tasks_of, wait_run
from sqlalchemy import select

from labgate.agent.tasks import TaskRunner
from labgate.db.runs import RunTask, TaskAttempt
from labgate.errors import Conflict
from labgate.security import executor_token, task_token
from labgate.wire.runs import TaskSpec
from labgate.wire.site import Report

SLOW = """
name = "gateway"
[[stages]]
name = "one"
[[stages.tasks]]
name = "slow"
command = "sleep {sleep}; echo hi > $LABGATE_RESULTS_DIR/out.txt; echo 7 > $LABGATE_RESULT"
where = {{site = "alpha"}}
"""


async def attempts_of(app: Any, run_id: str) -> list[str]:
    """The ids of a run's attempts, oldest first."""

    def find(session: Any) -> list[str]:
        return list(
            session.scalars(
                select(TaskAttempt.id)
                .join(RunTask, RunTask.id == TaskAttempt.task_id)
                .where(RunTask.run_id == run_id)
                .order_by(TaskAttempt.number)
            )
        )

    return await app.state.portal.run_db(find)


async def first_attempt(app: Any, run_id: str) -> str:
    deadline = time.monotonic() + 30
    while not (found := await attempts_of(app, run_id)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    return found[0]


async def archive_names(client: Any, headers: dict[str, str], run_id: str) -> set[str]:
    answer = await client.get(f"/api/v1/runs/{run_id}/results", headers=headers)
    assert answer.status_code == 200, answer.text
    with tarfile.open(fileobj=io.BytesIO(answer.content), mode="r:gz") as tar:
        return set(tar.getnames())


async def test_the_files_of_an_attempt_ended_by_its_executor_come_with_the_sites_late_word(
    app, client, make_user, settings
):
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW.format(sleep=1.5))
    attempt = await first_attempt(app, run_id)
    token = executor_token(settings.secret_key.get_secret_value(), attempt)
    # The executor's word first (its site's agent still watches the task, not yet ended).
    answer = await client.post(
        f"/api/v1/tasks/{attempt}/state",
        json={"state": "succeeded", "exit_code": 0, "result": 7, "files": ["out.txt"]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 204, answer.text
    # The task has succeeded with its result; its run waits for its files...
    view = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
    assert tasks_of(view)["slow"]["state"] == "succeeded", view
    assert tasks_of(view)["slow"]["result"] == 7 and view["state"] == "running", view
    # ...which come from the site once the task ended there; then the run ends.
    run = await wait_run(client, alice, run_id)
    assert run["state"] == "succeeded", run
    assert "slow/out.txt" in await archive_names(client, alice, run_id)
    assert not (settings.data_dir / "tasks" / "alpha" / attempt).exists()


async def test_a_task_token_reports_only_for_its_own_attempt_and_only_while_it_runs(
    app, client, make_user, settings
):
    key = settings.secret_key.get_secret_value()
    alice = await make_user("alice")
    run_id = await submit(client, alice, SLOW.format(sleep=30))
    attempt = await first_attempt(app, run_id)
    executor = {"Authorization": f"Bearer {executor_token(key, attempt)}"}
    url = f"/api/v1/tasks/{attempt}/state"
    # The task's own token (in its environment) cannot end its attempt...
    own = {"Authorization": f"Bearer {task_token(key, attempt)}"}
    refused = await client.post(url, json={"state": "succeeded"}, headers=own)
    assert refused.status_code == 401, refused.text
    # ...nor can a user's API token, nor another attempt's executor token.
    assert (await client.post(url, json={"state": "failed"}, headers=alice)).status_code == 401
    other = {"Authorization": f"Bearer {executor_token(key, '0123456789abcdef')}"}
    assert (await client.post(url, json={"state": "failed"}, headers=other)).status_code == 401
    other_url = "/api/v1/tasks/0123456789abcdef/state"
    answer = await client.post(other_url, json={"state": "failed"}, headers=executor)
    assert answer.status_code == 401
    # Cancelled is the site's to tell; a bad body is named.
    answer = await client.post(url, json={"state": "cancelled"}, headers=executor)
    assert answer.status_code == 400 and "state" in answer.json()["detail"], answer.text
    # The executor's token: its attempt's state and notes, while it is under way.
    assert (await client.post(url, json={"state": "running"}, headers=executor)).status_code == 204
    note = await client.post(
        f"/api/v1/tasks/{attempt}/events", json={"message": "from the executor"}, headers=executor
    )
    assert note.status_code == 204, note.text
    cancel = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert cancel.status_code in (200, 202, 204), cancel.text
    await wait_run(client, alice, run_id)
    deadline = time.monotonic() + 30
    while True:
        late = await client.post(url, json={"state": "succeeded", "result": 1}, headers=executor)
        if late.status_code == 409 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert late.status_code == 409, late.text
    run = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
    assert tasks_of(run)["slow"]["state"] == "cancelled" and tasks_of(run)["slow"]["result"] is None


async def test_a_sites_files_are_not_handed_over_while_its_attempt_starts(tmp_path: Any) -> None:
    """Asked for an attempt's files before its site has started it (its executor spoke
    first), the site says Conflict: the portal tries again later, and the files come whole."""
    reports: list[Report] = []

    async def record(report: Report) -> None:
        reports.append(report)

    runner = TaskRunner("alpha", record, tmp_path / "tasks" / "alpha")
    spec = TaskSpec(
        attempt_id=uuid.uuid4().hex[:16],
        run_id="r1",
        task="t",
        owner="alice",
        command="echo hi > $LABGATE_RESULTS_DIR/out.txt; echo 7 > $LABGATE_RESULT",
        timeout=60,
    )
    await runner.run(spec)  # returns at once: the attempt starts in the background
    with pytest.raises(Conflict, match="still starting"):
        await runner.results(spec.attempt_id)
    deadline = time.monotonic() + 60
    while True:
        try:
            archive = await runner.results(spec.attempt_id)
            break
        except Conflict:
            assert time.monotonic() < deadline, reports
            await asyncio.sleep(0.1)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert "out.txt" in {Path(name).name for name in tar.getnames()}
    assert [r.state for r in reports][-1] == "succeeded", reports
    await runner.close()
