"""A network site on the real test cluster: ``labgate agent`` submits Slurm jobs, reached by tunnel.

The agent (its own process, root, as on a login node) gets its backend
(``slurm``) and options from the portal when it connects; the job runs as its
owner's test account, its relay listens on the node's loopback, and the router
reaches it only through the agent's tunnel (``reach = "tunnel"``).
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import ADMIN_PASSWORD, AgentProcess, add_site, wait_site
from websockets.sync.client import connect as ws_connect

from servers import LabgateServer, wait_state
from slurm_cluster import ACCOUNTS, Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    srv = LabgateServer(tmp_path / "var", ADMIN_PASSWORD, LABGATE_SITE_HEARTBEAT_INTERVAL="0.5")
    srv.start()
    try:
        yield srv
    finally:
        try:
            srv.stop_instances("admin", ADMIN_PASSWORD)
        finally:
            srv.stop()


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
