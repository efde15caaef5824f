"""A network site on real Podman: ``labgate agent`` as its own process drives containers.

The agent gets its backend (containers) and options (the Podman service's
socket, a deployment label) from the portal when it connects; the instance is
a container published on the agent machine's loopback, which the router
reaches through the agent's tunnel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import ADMIN_PASSWORD, AgentProcess, add_site, labgate_server, wait_site
from websockets.sync.client import connect as ws_connect

import podman
from podman import Engine
from servers import LabgateServer, wait_state

pytestmark = pytest.mark.slow

engine = podman.engine
registry = podman.registry
deployment = podman.deployment


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    with labgate_server(tmp_path / "var", LABGATE_SITE_HEARTBEAT_INTERVAL="0.5") as srv:
        yield srv


def test_an_agent_runs_containers_on_podman_reached_through_its_tunnel(
    server: LabgateServer, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])
    options = engine.site("pod", deployment=deployment)["options"]
    token = add_site(server, admin, "pod", backend="containers", reach="tunnel", options=options)
    agent = AgentProcess(tmp_path / "pod", server.url, token)
    agent.start()
    try:
        site = wait_site(server, admin, "pod", "connected")
        assert site["backend"] == "containers"
        with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
            created = client.post("/api/v1/instances", json={"tool": "demo", "site": "pod"})
            assert created.status_code == 202, created.text
            iid = created.json()["id"]
            body = wait_state(client, iid, {"running", "failed"}, timeout=120)
            assert body["state"] == "running", (body, agent.log())
            assert len(engine.containers_of(deployment)) == 1
            page = client.get(f"/i/{iid}/")
            assert page.status_code == 200 and iid in page.text
            ws_url = server.url.replace("http://", "ws://") + f"/i/{iid}/ws"
            with ws_connect(ws_url, additional_headers=admin) as ws:
                ws.send("hello through the tunnel")
                assert ws.recv(timeout=10) == "hello through the tunnel"
            client.delete(f"/api/v1/instances/{iid}")
            assert wait_state(client, iid, {"stopped", "lost"}, 60)["state"] == "stopped"
    finally:
        agent.stop()
