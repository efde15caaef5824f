"""Lost tasks: a site whose agent stays away past the grace, or comes back without the task.

A real network site: a RemoteAgent dialing the portal's agent endpoint over a
WebSocket, its task attempts real processes in its own data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from runs_helpers import submit, tasks_of, wait_run

from labgate.config import Settings, SiteConfig
from labgate.scheduler import runs as run_processor
from servers import processes_with_env
from site_agents import remote_agent

#: Runs on the network site first (its name sorts first), then anywhere.
DEFINITION = """
name = "{name}"
[[stages]]
name = "one"
[[stages.tasks]]
name = "{task}"
command = "[ $LABGATE_ATTEMPT -ge 2 ] || sleep 60; echo $LABGATE_ATTEMPT > $LABGATE_RESULTS_DIR/n"
where = {{labels = {{pool = "p"}}}}
retries = 1
"""


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """One local process site ``zulu``; a short grace, a quick sweep."""
    monkeypatch.setattr(run_processor, "SWEEP_INTERVAL", 0.3)
    return settings.model_copy(
        update={
            "sites": [SiteConfig(name="zulu", backend="process", labels={"pool": "p"})],
            "site_heartbeat_interval": 1.0,
            "site_grace_period": 1.5,
        }
    )


async def add_edge(client: httpx.AsyncClient, admin: dict[str, str]) -> str:
    created = await client.post(
        "/api/v1/sites",
        json={"name": "edge", "backend": "process", "labels": {"pool": "p"}},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


async def site_status(client: httpx.AsyncClient, admin: dict[str, str], status: str) -> None:
    async with asyncio.timeout(60):
        while (await client.get("/api/v1/sites/edge", headers=admin)).json()["status"] != status:
            await asyncio.sleep(0.05)


async def running_at_edge(client: httpx.AsyncClient, alice: dict[str, str], run_id: str) -> None:
    async with asyncio.timeout(60):
        while True:
            run: dict[str, Any] = (await client.get(f"/api/v1/runs/{run_id}", headers=alice)).json()
            if any(e["state"] == "running" and "on edge" in e["message"] for e in run["events"]):
                return
            await asyncio.sleep(0.05)


def kill_task(task: str) -> None:
    for pid in processes_with_env("LABGATE_TASK", task):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)


async def test_a_task_whose_site_stays_away_past_the_grace_is_lost_and_retried(
    app, client, admin_headers, make_user, tmp_path: Path
):
    alice = await make_user("alice")
    token = await add_edge(client, admin_headers)
    try:
        async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
            await site_status(client, admin_headers, "connected")
            run_id = await submit(client, alice, DEFINITION.format(name="away", task="stranded"))
            await running_at_edge(client, alice, run_id)
        # The agent is gone (its task goes on running there); 1.5 s later it is lost.
        run = await wait_run(client, alice, run_id, timeout=60)
        assert run["state"] == "succeeded", run
        task = tasks_of(run)["stranded"]
        assert task["site"] == "zulu" and task["attempts"] == 2
        lost = [e for e in run["events"] if e["state"] == "lost"]
        assert len(lost) == 1
        assert "site edge did not come back within 1.5 s" in lost[0]["message"]
        assert processes_with_env("LABGATE_TASK", "stranded")  # still going at the site
        # Once the agent is back, the attempt given up on is stopped there.
        async with remote_agent(app.state.test_url, token, tmp_path / "edge"):
            async with asyncio.timeout(20):  # well before its `sleep 60` would end
                while processes_with_env("LABGATE_TASK", "stranded"):
                    await asyncio.sleep(0.1)
    finally:
        kill_task("stranded")


async def test_a_site_back_without_the_task_loses_it_and_it_is_retried(
    app, client, admin_headers, make_user, tmp_path: Path
):
    alice = await make_user("alice")
    token = await add_edge(client, admin_headers)
    edge = tmp_path / "edge"
    # Back well within the grace, however loaded the machine: it is not what is tested here.
    app.state.portal.run_processor.grace = 60
    try:
        async with remote_agent(app.state.test_url, token, edge):
            await site_status(client, admin_headers, "connected")
            run_id = await submit(client, alice, DEFINITION.format(name="wiped", task="wiped"))
            await running_at_edge(client, alice, run_id)
        # While its agent is away (within the grace), the site's machine loses the task.
        kill_task("wiped")
        shutil.rmtree(edge / "tasks" / "edge")
        async with remote_agent(app.state.test_url, token, edge):
            run = await wait_run(client, alice, run_id, timeout=60)
        assert run["state"] == "succeeded", run
        lost = [e for e in run["events"] if e["state"] == "lost"]
        assert len(lost) == 1 and "site edge has no such task" in lost[0]["message"], lost
        assert tasks_of(run)["wiped"]["attempts"] == 2
    finally:
        kill_task("wiped")
