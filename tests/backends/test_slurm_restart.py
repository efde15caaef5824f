"""Restarting ``labgate serve`` with a Slurm site: running jobs are re-attached, queued ones kept.

The portal goes down with two instances running on the (full) node and a
third queued. Slurm keeps them all; the restarted portal hands them back to
its site from the saved job ids: the running ones answer through the router
at the same endpoint, and the queued one runs once a place frees up.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from servers import LabgateServer, wait_state
from slurm_cluster import Cluster

pytestmark = pytest.mark.slow

PASSWORD = "admin-password-for-slurm-restart"


@pytest.fixture
def server(tmp_path, slurm: Cluster, slurm_dir):
    site = {
        "name": "hpc",
        "backend": "slurm",
        "options": slurm.options(
            endpoint_host="127.0.0.1",
            request_memory=False,
            jobs_dir=str(slurm_dir / "jobs"),
            workspaces_dir=str(slurm_dir / "workspaces"),
        ),
    }
    srv = LabgateServer(tmp_path / "var", PASSWORD, LABGATE_SITES=json.dumps([site]))
    srv.start()
    yield srv
    srv.stop()


def test_a_restarted_portal_reattaches_running_and_queued_jobs(server, slurm):
    headers = server.token("admin", PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:

        def launch() -> str:
            r = client.post("/api/v1/instances", json={"tool": "demo", "resources": {"cpu": 1}})
            assert r.status_code == 202, r.text
            return str(r.json()["id"])

        running = [launch(), launch()]
        before = {iid: wait_state(client, iid, {"running"}, 60)["endpoint"] for iid in running}
        queued = launch()
        deadline = time.monotonic() + 30
        while f"labgate-hpc-{queued}" not in slurm.run("squeue", "-h", "-t", "PD", "-o", "%j"):
            assert time.monotonic() < deadline, "the third launch never queued"
            time.sleep(0.1)
    jobs = slurm.run("squeue", "-h", "-o", "%i").split()
    server.stop()

    assert slurm.run("squeue", "-h", "-o", "%i").split() == jobs  # Slurm kept them all
    server.start()
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        for iid in running:
            body = wait_state(client, iid, {"running", "lost"}, 30)
            assert body["state"] == "running" and body["endpoint"] == before[iid], body
            assert client.get(f"/i/{iid}/api/health").status_code == 200
        assert client.get(f"/api/v1/instances/{queued}").json()["state"] == "starting"
        # A place frees up: the adopted queued job runs and becomes healthy.
        assert client.delete(f"/api/v1/instances/{running[0]}").status_code == 202
        assert wait_state(client, queued, {"running", "failed"}, 60)["state"] == "running"
        assert client.get(f"/i/{queued}/api/health").status_code == 200
        for iid in (running[1], queued):
            client.delete(f"/api/v1/instances/{iid}")
        for iid in (*running, queued):
            wait_state(client, iid, {"stopped"}, 30)
    assert slurm.run("squeue", "-h", "-o", "%i").split() == []
