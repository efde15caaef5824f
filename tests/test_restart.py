"""Restarting `labgate serve` interrupts no one; instances that died meanwhile become lost."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest

from servers import LabgateServer, processes_with_env, wait_state

PASSWORD = "admin-password-for-restart"


@pytest.fixture
def server(tmp_path):
    srv = LabgateServer(tmp_path / "var", PASSWORD)
    srv.start()
    yield srv
    srv.stop()


def test_restart_keeps_instances_and_marks_dead_ones_lost(server):
    headers = server.token("admin", PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        keep = client.post("/api/v1/instances", json={"tool": "demo"}).json()["id"]
        die = client.post("/api/v1/instances", json={"tool": "demo"}).json()["id"]
        kept = wait_state(client, keep, {"running"})
        wait_state(client, die, {"running"})

    kept_pids = processes_with_env("LABGATE_INSTANCE_ID", keep)
    dying_pids = processes_with_env("LABGATE_INSTANCE_ID", die)
    assert kept_pids and dying_pids
    server.stop()

    # labgate is down: the instances are not.
    assert set(processes_with_env("LABGATE_INSTANCE_ID", keep)) == set(kept_pids)
    for pid in dying_pids:
        # Killing the sandbox's outer process ends those inside it (--die-with-parent).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    server.start()
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        lost = wait_state(client, die, {"lost"}, timeout=20)
        assert "gone while labgate was down" in lost["reason"]
        time.sleep(1)  # several poll rounds: the kept instance stays running
        again = client.get(f"/api/v1/instances/{keep}").json()
        assert again["state"] == "running"
        assert again["endpoint"] == kept["endpoint"]
        assert set(processes_with_env("LABGATE_INSTANCE_ID", keep)) == set(kept_pids)

        assert client.delete(f"/api/v1/instances/{keep}").status_code == 202
        wait_state(client, keep, {"stopped"})
    assert processes_with_env("LABGATE_INSTANCE_ID", keep) == []


def test_first_start_prints_generated_admin_password_once(tmp_path):
    srv = LabgateServer(tmp_path / "var", "")
    srv.env.pop("LABGATE_ADMIN_PASSWORD")
    srv.start()
    srv.stop()
    srv.start()
    srv.stop()
    output = srv.log_path.read_text()
    assert output.count("created admin account 'admin' with password:") == 1
    password = output.split("with password: ", 1)[1].split()[0]
    srv.start()
    try:
        srv.token("admin", password)
    finally:
        srv.stop()
