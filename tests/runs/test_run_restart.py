"""Restarting the portal during a run loses no task and no result."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tarfile
import time

import httpx
import pytest

from helpers import TEST_SECRET_KEY
from labgate.security import executor_token
from servers import LabgateServer, processes_with_env

PASSWORD = "admin-password-for-run-restart"

DEFINITION = """
name = "survivor"
[[stages]]
name = "long"
[[stages.tasks]]
name = "slow"
command = "sleep 1.5; echo done > $LABGATE_RESULTS_DIR/out.txt; echo 42 > $LABGATE_RESULT"
[[stages.tasks]]
name = "killed"
command = "[ $LABGATE_ATTEMPT -ge 2 ] || sleep 60"
retries = 1
[[stages]]
name = "after"
[[stages.tasks]]
name = "quick"
command = "true"
"""


@pytest.fixture
def server(tmp_path):
    srv = LabgateServer(tmp_path / "var", PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def _wait(client: httpx.Client, run_id: str, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/v1/runs/{run_id}").json()
        if run["state"] in states:
            return dict(run)
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def _running(client: httpx.Client, run_id: str, task: str) -> None:
    for _ in range(200):
        events = client.get(f"/api/v1/runs/{run_id}").json()["events"]
        if any(e["task"] == task and e["state"] == "running" for e in events):
            return
        time.sleep(0.05)
    raise AssertionError(f"{task} never ran")


def test_portal_restart_mid_run_loses_nothing(server):
    headers = server.token("admin", PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        answer = client.post("/api/v1/runs", content=DEFINITION)
        assert answer.status_code == 201, answer.text
        run_id = answer.json()["id"]
        _running(client, run_id, "slow")
        _running(client, run_id, "killed")
    for _ in range(100):  # "running" is reported as the executor starts, before the command
        killed = processes_with_env("LABGATE_TASK", "killed")
        if killed:
            break
        time.sleep(0.05)
    assert killed
    server.stop()

    # While the portal is down, "slow" finishes and "killed"'s executor dies. Its processes
    # are killed until none is left: one seen before may have ended (a sandbox's setup).
    deadline = time.monotonic() + 10
    while killed:
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of the task left: {killed}"
        time.sleep(0.1)
        killed = processes_with_env("LABGATE_TASK", "killed")
    time.sleep(2)

    server.start()
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        run = _wait(client, run_id, {"succeeded", "failed"})
        assert run["state"] == "succeeded", run
        tasks = {t["name"]: t for s in run["stages"] for t in s["tasks"]}
        assert tasks["slow"]["result"] == 42
        assert tasks["slow"]["files"] == ["out.txt"]
        assert tasks["killed"]["attempts"] == 2
        assert tasks["quick"]["state"] == "succeeded"
        archive = client.get(f"/api/v1/runs/{run_id}/results")
        assert archive.status_code == 200


def test_files_still_to_come_are_found_again_after_a_portal_restart(server):
    """The executor's word came, the files not yet; the restarted portal brings them."""
    headers = server.token("admin", PASSWORD, ["admin", "account"])
    definition = """
name = "late"
[[stages]]
name = "one"
[[stages.tasks]]
name = "slow"
command = "sleep 3; echo done > $LABGATE_RESULTS_DIR/out.txt; echo 42 > $LABGATE_RESULT"
"""
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        answer = client.post("/api/v1/runs", content=definition)
        assert answer.status_code == 201, answer.text
        run_id = answer.json()["id"]
        _running(client, run_id, "slow")
        (attempt,) = [p.name for p in (server.data_dir / "tasks" / "local").iterdir()]
        token = executor_token(TEST_SECRET_KEY, attempt)
        told = client.post(
            f"/api/v1/tasks/{attempt}/state",
            json={"state": "succeeded", "exit_code": 0, "result": 42, "files": ["out.txt"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert told.status_code == 204, told.text
        run = client.get(f"/api/v1/runs/{run_id}").json()
        assert run["state"] == "running" and run["stages"][0]["tasks"][0]["result"] == 42, run
    server.stop()  # before the task ended at its site: its files are still there
    time.sleep(3)

    server.start()
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        run = _wait(client, run_id, {"succeeded", "failed"})
        assert run["state"] == "succeeded", run
        archive = client.get(f"/api/v1/runs/{run_id}/results")
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            assert "slow/out.txt" in tar.getnames()
