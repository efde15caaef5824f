"""Batch runs on a network site: tasks go over the agent's connection, results come back.

A real ``labgate agent`` process dials a real ``labgate serve``; the run's
tasks are started with the ``run_task`` command, their reports travel as the
agent's acknowledged reports, and results and logs are fetched from the site.
Killing the agent mid-task loses nothing: the next agent process finds the
task in its directory and reports how it ended.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import (
    ADMIN_PASSWORD,
    AgentProcess,
    add_site,
    result_names,
    wait_run_ended,
    wait_site,
)

from servers import LabgateServer

pytestmark = pytest.mark.slow

DEFINITION = """
name = "remote"
[[stages]]
name = "edge"
[[stages.tasks]]
name = "far"
command = "sleep 1.5; hostname > $LABGATE_RESULTS_DIR/where.txt; echo '[1, 2]' > $LABGATE_RESULT"
where = {site = "edge"}
[[stages]]
name = "home"
[[stages.tasks]]
name = "near"
command = "echo home"
where = {site = "local"}
"""


# The far task also shows what it can see of its tokens: its environment, its executor's file.
PEEKING = DEFINITION.replace(
    'command = "sleep 1.5;', 'command = "env | grep LABGATE_; cat ../task.json; sleep 1.5;'
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    srv = LabgateServer(tmp_path / "var", ADMIN_PASSWORD, LABGATE_SITE_HEARTBEAT_INTERVAL="0.5")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _events(client: httpx.Client, run_id: str) -> list[dict]:
    return list(client.get(f"/api/v1/runs/{run_id}").json()["events"])


def _submit_far_running(
    client: httpx.Client, agent: AgentProcess, definition: str = DEFINITION
) -> str:
    """Submit ``definition``; its id once its task at the network site runs."""
    created = client.post("/api/v1/runs", content=definition)
    assert created.status_code == 201, created.text
    run_id = str(created.json()["id"])
    deadline = time.monotonic() + 30
    while not any(e["state"] == "running" and e["task"] == "far" for e in _events(client, run_id)):
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    return run_id


@pytest.fixture
def edge(server: LabgateServer, tmp_path: Path) -> Iterator[tuple[httpx.Client, AgentProcess]]:
    """A network site ``edge`` whose agent is connected: an admin's client, and the agent."""
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
    agent = AgentProcess(tmp_path / "edge", server.url, add_site(server, admin, "edge"))
    agent.start()
    try:
        wait_site(server, admin, "edge", "connected")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            yield client, agent
    finally:
        agent.stop()


def test_a_run_across_a_network_site_survives_an_agent_restart(
    edge: tuple[httpx.Client, AgentProcess], tmp_path: Path
) -> None:
    client, agent = edge
    run_id = _submit_far_running(client, agent)
    # The task runs in the agent's data dir, not the portal's.
    assert list((tmp_path / "edge" / "tasks" / "edge").iterdir())
    agent.kill()
    agent.start()
    run = wait_run_ended(client, run_id, agent)
    assert run["state"] == "succeeded", (run, agent.log())
    tasks = {t["name"]: t for s in run["stages"] for t in s["tasks"]}
    assert tasks["far"]["site"] == "edge"
    assert tasks["far"]["result"] == [1, 2]
    assert tasks["far"]["attempts"] == 1
    assert tasks["near"]["site"] == "local"
    logs = client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "near"})
    assert logs.json()["text"] == "home\n"
    assert "far/where.txt" in result_names(client, run_id)
    # Collected: the site keeps nothing of the finished task.
    assert not list((tmp_path / "edge" / "tasks" / "edge").iterdir())


def test_a_task_ends_through_the_gateway_while_its_agent_is_away(
    edge: tuple[httpx.Client, AgentProcess], tmp_path: Path
) -> None:
    """The executor tells the portal itself: the run goes on without the agent; the task's
    files, and so the run's end, follow when the agent is back."""
    client, agent = edge
    run_id = _submit_far_running(client, agent, PEEKING)
    agent.kill()  # its task's executor runs on, detached
    # The executor tells the portal: the task succeeds and the next stage runs,
    # all without the agent; the run waits for the task's files.
    deadline = time.monotonic() + 60
    while True:
        run = client.get(f"/api/v1/runs/{run_id}").json()
        tasks = {t["name"]: t for s in run["stages"] for t in s["tasks"]}
        if tasks["near"]["state"] == "succeeded":
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    assert tasks["far"]["result"] == [1, 2] and tasks["far"]["files"] == ["where.txt"]
    assert run["state"] == "running", run
    assert client.get("/api/v1/sites/edge").json()["status"] != "connected"

    agent.start()  # back: the files come, and the run ends
    run = wait_run_ended(client, run_id, agent)
    assert run["state"] == "succeeded", run
    assert "far/where.txt" in result_names(client, run_id)
    # The task had its own token for notes, never its executor's (nor its task.json).
    text = client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "far"}).json()["text"]
    tokens = set(re.findall(r"lgk_[0-9a-f]+", text))
    assert len(tokens) == 1 and f"LABGATE_TASK_TOKEN={tokens.pop()}" in text, text
    assert "executor_token" not in text and "No such file" in text, text
    deadline = time.monotonic() + 10
    while list((tmp_path / "edge" / "tasks" / "edge").iterdir()):
        assert time.monotonic() < deadline, "the site kept the collected task"
        time.sleep(0.1)
