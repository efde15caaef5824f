"""A Slurm job reached as on a multi-node cluster: through its relay on the node's address.

The test cluster's one node is this machine; ``endpoint_host`` is its outward
address (the default route's interface), so the router connects to the job as
it would to another host's, while the tool listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from helpers import wait_for_state
from labgate.config import Settings, SiteConfig
from slurm_cluster import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(settings: Settings, slurm_dir: Path, slurm: Cluster, node_address: str) -> Settings:
    """One Slurm site whose jobs are reached at ``address``."""
    options = slurm.options(
        endpoint_host=node_address,
        request_memory=False,
        jobs_dir=str(slurm_dir / "jobs"),
        workspaces_dir=str(slurm_dir / "workspaces"),
    )
    site = SiteConfig(name="hpc", backend="slurm", options=options)
    return settings.model_copy(update={"sites": [site]})


async def test_the_router_reaches_the_tool_through_the_relay_on_the_nodes_address(
    client, make_user, router_url, node_address, slurm_dir
):
    alice = await make_user("alice")
    r = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert r.status_code == 202, r.text
    iid = r.json()["id"]
    body = await wait_for_state(client, alice, iid, {"running", "failed"}, timeout=60)
    assert body["state"] == "running", body["reason"]
    endpoint = json.loads((slurm_dir / "jobs" / iid / "endpoint.json").read_text())
    assert endpoint["host"] == node_address and endpoint["port"] != endpoint["tool_port"]
    async with httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10) as browser:
        r = await browser.get(f"/i/{iid}/api/health")
        assert r.status_code == 200, r.text
    # The tool listens on the node's loopback only: from the network only the relay answers.
    with pytest.raises(OSError):
        socket.create_connection((node_address, endpoint["tool_port"]), timeout=2).close()
    with socket.create_connection(("127.0.0.1", endpoint["tool_port"]), timeout=2):
        pass
    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=30)
