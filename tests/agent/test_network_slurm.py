"""A network site on the real test cluster: ``labgate agent`` submits Slurm jobs, reached by tunnel.

The agent (its own process, root, as on a login node) gets its backend
(``slurm``) and options from the portal when it connects; the job runs as its
owner's test account, its relay listens on the node's loopback, and the router
reaches it only through the agent's tunnel (``reach = "tunnel"``). A batch
task's job tells the portal's task gateway how it ended, also while the agent
is away.
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import (
    ADMIN_PASSWORD,
    AgentProcess,
    add_site,
    labgate_server,
    result_names,
    wait_run_ended,
    wait_site,
)
from websockets.sync.client import connect as ws_connect

from servers import LabgateServer, wait_state
from slurm_cluster import ACCOUNTS, Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    with labgate_server(tmp_path / "var", LABGATE_SITE_HEARTBEAT_INTERVAL="0.5") as srv:
        yield srv


def test_an_agent_runs_slurm_jobs_as_their_owner_reached_through_its_tunnel(
    server: LabgateServer, slurm_cluster: Cluster, tmp_path: Path
) -> None:
    area = slurm_cluster.area()
    options = slurm_cluster.options(
        endpoint_host="127.0.0.1",
        request_memory=False,
        jobs_dir=str(area / "jobs"),
        workspaces_dir=str(area / "workspaces"),
    )
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])
    token = add_site(server, admin, "hpc", backend="slurm", reach="tunnel", options=options)
    agent = AgentProcess(tmp_path / "hpc", server.url, token)
    agent.start()
    try:
        site = wait_site(server, admin, "hpc", "connected")
        assert site["backend"] == "slurm" and site["reach"] == "tunnel"
        with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
            created = client.post("/api/v1/instances", json={"tool": "demo", "site": "hpc"})
            assert created.status_code == 202, created.text
            iid = created.json()["id"]
            body = wait_state(client, iid, {"running", "failed"}, timeout=120)
            assert body["state"] == "running", (body, agent.log())
            # The job is the admin's test account's, not the agent's (root).
            owners = slurm_cluster.run("squeue", "-h", "-o", "%u %j").split("\n")
            mine = [line.split()[0] for line in owners if iid in line]
            assert mine == [ACCOUNTS["admin"]], owners
            assert pwd.getpwnam(mine[0]).pw_uid != 0
            page = client.get(f"/i/{iid}/")
            assert page.status_code == 200 and iid in page.text
            ws_url = server.url.replace("http://", "ws://") + f"/i/{iid}/ws"
            with ws_connect(ws_url, additional_headers=admin) as ws:
                ws.send("hello from the login node's tunnel")
                assert ws.recv(timeout=10) == "hello from the login node's tunnel"
            client.delete(f"/api/v1/instances/{iid}")
            assert wait_state(client, iid, {"stopped", "lost"}, 60)["state"] == "stopped"
        assert iid not in slurm_cluster.run("squeue", "-h", "-o", "%j")
    finally:
        agent.stop()
        slurm_cluster.cancel_all()


def test_a_slurm_tasks_job_tells_the_gateway_while_its_agent_is_away(
    server: LabgateServer, slurm_cluster: Cluster, tmp_path: Path
) -> None:
    """The job's executor, as its owner's account on the node, reports to the portal itself."""
    area = slurm_cluster.area()
    options = slurm_cluster.options(jobs_dir=str(area / "jobs"), request_memory=False)
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
    token = add_site(server, admin, "hpc", backend="slurm", options=options)
    agent = AgentProcess(tmp_path / "hpc", server.url, token)
    agent.start()
    definition = """
name = "batch"
[[stages]]
name = "one"
[[stages.tasks]]
name = "job"
command = "sleep 2; echo x > $LABGATE_RESULTS_DIR/out.txt; echo 5 > $LABGATE_RESULT"
timeout = 60
where = {site = "hpc"}
"""
    try:
        wait_site(server, admin, "hpc", "connected")
        with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
            created = client.post("/api/v1/runs", content=definition)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            deadline = time.monotonic() + 60
            while not [
                e
                for e in client.get(f"/api/v1/runs/{run_id}").json()["events"]
                if e["task"] == "job" and e["state"] == "running"
            ]:
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.1)
            agent.kill()  # the job runs on; its executor tells the portal how it ended
            deadline = time.monotonic() + 90
            while True:
                run = client.get(f"/api/v1/runs/{run_id}").json()
                job = run["stages"][0]["tasks"][0]
                if job["state"] != "running" and job["state"] != "pending":
                    break
                assert time.monotonic() < deadline, run
                time.sleep(0.2)
            assert job["state"] == "succeeded" and job["result"] == 5, run
            assert job["files"] == ["out.txt"] and run["state"] == "running", run
            assert client.get("/api/v1/sites/hpc").json()["status"] != "connected"

            agent.start()  # back: it finds the job's files and hands them over
            run = wait_run_ended(client, run_id, agent, timeout=90)
            assert run["state"] == "succeeded", run
            assert "job/out.txt" in result_names(client, run_id)
    finally:
        agent.stop()
        slurm_cluster.cancel_all()
