"""A network site for real: ``labgate serve`` and a ``labgate agent`` process dialing in.

The agent runs as its own process with its own data dir, connects through
the router's public port with its site token, and runs instances that users
reach through the router, directly or through the agent's tunnel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agents import ADMIN_PASSWORD, AgentProcess, add_site, labgate_server, wait_site

from servers import LabgateServer, processes_with_env, wait_state

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    with labgate_server(
        tmp_path / "var", LABGATE_SITE_HEARTBEAT_INTERVAL="0.5", LABGATE_SITE_GRACE_PERIOD="20"
    ) as srv:
        yield srv


@pytest.fixture
def admin(server: LabgateServer) -> dict[str, str]:
    return server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])


def launch(server: LabgateServer, headers: dict[str, str], site: str) -> str:
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        created = client.post("/api/v1/instances", json={"tool": "demo", "site": site})
        assert created.status_code in (200, 201, 202), created.text
        return str(created.json()["id"])


@pytest.mark.parametrize("reach", ["direct", "tunnel"])
def test_an_agent_dials_in_and_runs_instances_users_reach_through_the_router(
    server: LabgateServer, admin: dict[str, str], tmp_path: Path, reach: str
) -> None:
    token = add_site(server, admin, "edge", reach=reach)
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()
    try:
        site = wait_site(server, admin, "edge", "connected")
        assert site["live"] is True and site["agent_version"]
        iid = launch(server, admin, "edge")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            body = wait_state(client, iid, {"running", "failed"}, timeout=60)
            assert body["state"] == "running", (body, agent.log())
            assert body["site"] == "edge"
            # Only the agent connects to a tunneled site's instance: its demo takes a socket
            # in the site's data dir (docs/sites.md); a direct site's listens on a port.
            if reach == "tunnel":
                sock = tmp_path / "edge" / "sockets" / iid / "tool.sock"
                assert body["endpoint"] == f"unix:{sock}" and sock.is_socket()
            else:
                assert body["endpoint"].startswith("http://127.0.0.1:")
            # The workspace is the site's: under the agent's data dir, not the portal's.
            assert (tmp_path / "edge" / "workspaces" / "admin").is_dir()
            assert not (server.data_dir / "workspaces" / "admin").exists()
            page = client.get(f"/i/{iid}/")
            assert page.status_code == 200, page.text
            client.delete(f"/api/v1/instances/{iid}")
            assert wait_state(client, iid, {"stopped", "lost"})["state"] == "stopped"
            assert not (tmp_path / "edge" / "sockets" / iid).exists()
    finally:
        agent.stop()


def test_a_refused_token_ends_the_agent_with_a_clear_message(
    server: LabgateServer, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path / "nobody", server.url, "lgs_not-a-token")
    agent.start()
    assert agent.process is not None
    assert agent.process.wait(30) == 2
    assert "refused this site's token" in agent.log()


def test_revoking_the_token_cuts_the_connection_at_once(
    server: LabgateServer, admin: dict[str, str], tmp_path: Path
) -> None:
    token = add_site(server, admin, "edge", reach="direct")
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()
    try:
        wait_site(server, admin, "edge", "connected")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            assert client.delete("/api/v1/sites/edge/token").status_code in (200, 204)
        assert agent.process is not None
        assert agent.process.wait(15) == 2, agent.log()
        status = wait_site(server, admin, "edge", "revoked")
        assert status["live"] is False
    finally:
        agent.stop()


def test_a_killed_agent_leaves_instances_unreachable_then_back_when_it_returns(
    server: LabgateServer, admin: dict[str, str], tmp_path: Path
) -> None:
    token = add_site(server, admin, "edge", reach="tunnel")
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()
    try:
        wait_site(server, admin, "edge", "connected")
        iid = launch(server, admin, "edge")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            assert wait_state(client, iid, {"running", "failed"}, 60)["state"] == "running"
            agent.kill()
            body = wait_state(client, iid, {"unreachable"}, 20)
            assert "not connected" in body["reason"] or body["state"] == "unreachable"
            page = client.get(f"/i/{iid}/")
            assert page.status_code == 503 and "site is not connected" in page.text
            agent.start()
            wait_site(server, admin, "edge", "connected")
            assert wait_state(client, iid, {"running", "lost"}, 30)["state"] == "running"
            deadline = time.monotonic() + 10
            while client.get(f"/i/{iid}/").status_code != 200:
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.1)
            client.delete(f"/api/v1/instances/{iid}")
            assert wait_state(client, iid, {"stopped", "lost"})["state"] == "stopped"
    finally:
        agent.stop()


def test_a_directly_reached_instance_keeps_answering_while_its_agent_is_away(
    server: LabgateServer, admin: dict[str, str], tmp_path: Path
) -> None:
    """The chaos run's find: a killed agent made its site's tools 503 until it was back.

    The router reaches a direct site's tools at their endpoints, without the
    agent: they keep answering while it is away (the instance is ``unreachable``
    all the same), and the "not connected" page comes only when nothing answers.
    """
    token = add_site(server, admin, "edge", reach="direct")
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()
    try:
        wait_site(server, admin, "edge", "connected")
        iid = launch(server, admin, "edge")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            assert wait_state(client, iid, {"running", "failed"}, 60)["state"] == "running"
            agent.kill()
            wait_state(client, iid, {"unreachable"}, 20)
            health = client.get(f"/i/{iid}/api/health")
            assert health.status_code == 200, health.text
            # The tool itself gone too: the page says why, not a bare 502.
            pids = processes_with_env("LABGATE_INSTANCE_ID", iid)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (page := client.get(f"/i/{iid}/")).status_code == 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert page.status_code == 503 and "site is not connected" in page.text
            # Its agent back, the instance of the tool that is gone ends: left away, its
            # stop would wait out the site's grace period (20 s) after the test.
            agent.start()
            assert wait_state(client, iid, {"lost", "stopped"}, 30)["state"] == "lost"
    finally:
        agent.stop()


def test_a_changed_reach_takes_effect_at_once_and_the_agent_carries_on(
    server: LabgateServer, admin: dict[str, str], tmp_path: Path
) -> None:
    """``PATCH reach`` reconnects the site's agent (never stops it) and reroutes its instances.

    Which way the router reaches the instance shows when the agent is gone:
    a tunnel goes with its agent (503 "not connected"), an endpoint reached
    directly keeps answering.
    """
    token = add_site(server, admin, "edge", reach="direct")
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()

    def reach_now(client: httpx.Client, reach: str) -> None:
        since = client.get("/api/v1/sites/edge").json()["connected_since"]
        changed = client.patch("/api/v1/sites/edge", json={"reach": reach})
        assert changed.status_code == 200, changed.text
        assert changed.json()["reach"] == reach
        deadline = time.monotonic() + 20
        while (site := client.get("/api/v1/sites/edge").json())["connected_since"] == since or (
            site["status"] != "connected"
        ):
            assert agent.process is not None and agent.process.poll() is None, agent.log()
            assert time.monotonic() < deadline, site
            time.sleep(0.1)
        assert wait_state(client, iid, {"running", "lost"}, 30)["state"] == "running"
        while client.get(f"/i/{iid}/api/health").status_code != 200:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)

    try:
        wait_site(server, admin, "edge", "connected")
        iid = launch(server, admin, "edge")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            assert wait_state(client, iid, {"running", "failed"}, 60)["state"] == "running"
            reach_now(client, "tunnel")
            agent.kill()
            wait_state(client, iid, {"unreachable"}, 20)
            page = client.get(f"/i/{iid}/api/health")
            assert page.status_code == 503 and "site is not connected" in page.text
            agent.start()
            wait_site(server, admin, "edge", "connected")
            assert wait_state(client, iid, {"running", "lost"}, 30)["state"] == "running"

            reach_now(client, "direct")
            agent.kill()
            wait_state(client, iid, {"unreachable"}, 20)
            assert client.get(f"/i/{iid}/api/health").status_code == 200
            agent.start()
            assert wait_state(client, iid, {"running", "lost"}, 30)["state"] == "running"
            assert "refused this site's token" not in agent.log()
            client.delete(f"/api/v1/instances/{iid}")
            assert wait_state(client, iid, {"stopped", "lost"})["state"] == "stopped"
    finally:
        agent.stop()
