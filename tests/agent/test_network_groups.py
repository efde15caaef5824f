"""Shared group volumes on a network site: its agent says which are there, the portal mounts them.

The portal's own disk is not the site's: for a site whose agent dials in,
which group directories exist under the site's ``group_root`` is what the
agent found on its machine (in its hello, then in a heartbeat whenever that
changes), and launches and group deletion go by that report.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents import ADMIN_PASSWORD, AgentProcess, add_site, labgate_server, wait_site

from datasets_fixtures import environment_of
from helpers import wait_for_state
from labgate.agent.remote import RemoteAgent
from servers import LabgateServer, processes_with_env, wait_state
from site_agents import remote_agent

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabgateServer]:
    with labgate_server(tmp_path / "var", LABGATE_SITE_HEARTBEAT_INTERVAL="0.3") as srv:
        yield srv


def reported(client: httpx.Client, wanted: list[str], timeout: float = 20) -> dict[str, Any]:
    """The site ``edge`` once its agent's last report of group volumes is ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        site: dict[str, Any] = client.get("/api/v1/sites/edge").json()
        if (site.get("agent") or {}).get("groups") == wanted:
            return site
        assert time.monotonic() < deadline, site
        time.sleep(0.1)


def launched_mounts(client: httpx.Client) -> tuple[str, list[dict[str, Any]], list[int]]:
    """A demo launched on ``edge``: its id, its mounts and its processes (the sandbox's too)."""
    created = client.post("/api/v1/instances", json={"tool": "demo", "site": "edge"})
    assert created.status_code == 202, created.text
    iid = str(created.json()["id"])
    body = wait_state(client, iid, {"running", "failed"}, timeout=60)
    assert body["state"] == "running", body
    pids = processes_with_env("LABGATE_INSTANCE_ID", iid)
    assert pids, f"no process of {iid}"
    return iid, body["mounts"], pids


def sees(pids: list[int], group: str, groups: Path) -> bool:
    """Whether the tool finds, where its environment says the group's volume is, the file
    just written into the site's directory of that group."""
    mark = groups / group / "mark"
    mark.write_text(group)
    try:
        for pid in pids:
            inside = environment_of(pid).get(f"LABGATE_DATA_{group.upper()}")
            seen = Path(f"/proc/{pid}/root{inside}/mark")
            if inside and seen.exists() and seen.read_text() == group:
                return True
        return False
    finally:
        mark.unlink()


def environments(pids: list[int]) -> dict[str, str]:
    """The environment the instance's processes share (the tool's)."""
    return {k: v for pid in pids for k, v in environment_of(pid).items()}


def test_the_agent_reports_its_group_volumes_and_launches_and_deletions_follow(
    server: LabgateServer, tmp_path: Path
) -> None:
    groups = tmp_path / "site-groups"
    for name in ("physics", "chemistry", "Upper"):
        (groups / name).mkdir(parents=True)
        (groups / name).chmod(0o1777)
    (groups / "linked").symlink_to(groups / "physics")  # a link is no volume
    (groups / "notes").write_text("a file is none either")
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])
    token = add_site(server, admin, "edge", group_root=str(groups))
    agent = AgentProcess(tmp_path / "edge", server.url, token)
    agent.start()
    try:
        wait_site(server, admin, "edge", "connected")
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            site = reported(client, ["chemistry", "physics"])
            assert site["group_root"] == str(groups)
            for group in ("physics", "chemistry", "biology"):
                made = client.post("/api/v1/groups", json={"name": group})
                assert made.status_code == 201, made.text
            for group in ("physics", "biology"):
                added = client.put(f"/api/v1/groups/{group}/members/admin")
                assert added.status_code in (200, 201), added.text

            # A member's launch mounts the volumes of their groups the site holds.
            iid, mounts, pids = launched_mounts(client)
            assert mounts == [{"group": "physics", "target": "/groups/physics", "read_only": False}]
            assert sees(pids, "physics", groups)
            env = environments(pids)
            assert "LABGATE_DATA_BIOLOGY" not in env and "LABGATE_DATA_CHEMISTRY" not in env
            client.delete(f"/api/v1/instances/{iid}")
            wait_state(client, iid, {"stopped"})

            # A group whose volume the site holds is not deleted; once the agent says the
            # directory is gone, it is.
            refused = client.delete("/api/v1/groups/chemistry")
            assert refused.status_code == 409, refused.text
            assert refused.json()["error"] == "group_volume_exists" and "edge" in refused.text
            shutil.rmtree(groups / "chemistry")
            (groups / "biology").mkdir()
            (groups / "biology").chmod(0o1777)
            reported(client, ["biology", "physics"])
            assert client.delete("/api/v1/groups/chemistry").status_code == 204

            # A directory made on the site is mounted from the agent's next heartbeat on.
            iid, mounts, pids = launched_mounts(client)
            assert [m["group"] for m in mounts] == ["biology", "physics"]
            assert sees(pids, "biology", groups)
            client.delete(f"/api/v1/instances/{iid}")
            wait_state(client, iid, {"stopped"})

            # Moved: nothing is mounted from the old listing; the connected agent lists
            # the new root from its next heartbeat, even when it holds the same names.
            moved = tmp_path / "moved-groups"
            for name in ("biology", "physics"):
                (moved / name).mkdir(parents=True)
            bad = client.patch("/api/v1/sites/edge", json={"group_root": "moved-groups"})
            assert bad.status_code == 422, bad.text
            changed = client.patch("/api/v1/sites/edge", json={"group_root": str(moved)})
            assert changed.status_code == 200, changed.text
            assert changed.json()["group_root"] == str(moved)
            assert changed.json()["agent"]["groups"] is None
            reported(client, ["biology", "physics"])
            # Changed backend options reach the connected agent too; it keeps its
            # connection and says in its log that they need its restart.
            since = client.get("/api/v1/sites/edge").json()["connected_since"]
            patched = client.patch("/api/v1/sites/edge", json={"options": {"nofile": 2048}})
            assert patched.status_code == 200, patched.text
            deadline = time.monotonic() + 20
            while b"restart the agent to apply them" not in agent.log_path.read_bytes():
                assert time.monotonic() < deadline, agent.log_path.read_text()[-2000:]
                time.sleep(0.1)
            assert client.get("/api/v1/sites/edge").json()["connected_since"] == since
            # Restarted, the agent lists the root the portal holds (the hello carries it).
            (moved / "biology").rmdir()
            agent.stop()
            agent.start()
            reported(client, ["physics"])
    finally:
        agent.stop()


def test_a_group_root_must_be_an_absolute_path(server: LabgateServer) -> None:
    admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
        refused = client.post(
            "/api/v1/sites", json={"name": "edge", "backend": "process", "group_root": "groups"}
        )
    assert refused.status_code == 422, refused.text
    assert "group_root must be an absolute path" in refused.text


async def test_what_a_lying_agent_says_of_group_volumes_counts_for_its_own_site_only(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names that are no plain group name are dropped; the rest mounts only at its site."""

    async def lying(self: RemoteAgent) -> list[str]:
        return ["physics", "../../etc", "Physics", "physics/private", "", "physics"]

    monkeypatch.setattr(RemoteAgent, "_groups", lying)
    created = await client.post(
        "/api/v1/sites",
        json={"name": "edge", "backend": "process", "group_root": str(tmp_path / "nowhere")},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    for step in ("made", "joined"):
        done = await (
            client.post("/api/v1/groups", json={"name": "physics"}, headers=admin_headers)
            if step == "made"
            else client.put("/api/v1/groups/physics/members/admin", headers=admin_headers)
        )
        assert done.status_code in (200, 201), done.text
    async with remote_agent(app.state.test_url, created.json()["token"], tmp_path / "edge"):
        async with asyncio.timeout(20):
            while True:
                site = (await client.get("/api/v1/sites/edge", headers=admin_headers)).json()
                if (site.get("agent") or {}).get("groups") is not None:
                    break
                await asyncio.sleep(0.05)
        assert site["agent"]["groups"] == ["physics"]
        # The site in the portal's process has no group_root: nothing is mounted there.
        local = await client.post(
            "/api/v1/instances", json={"tool": "demo", "site": "local"}, headers=admin_headers
        )
        assert local.status_code == 202, local.text
        assert local.json()["site"] == "local" and local.json()["mounts"] == []
        at_edge = await client.post(
            "/api/v1/instances", json={"tool": "demo", "site": "edge"}, headers=admin_headers
        )
        assert at_edge.status_code == 202, at_edge.text
        assert [m["group"] for m in at_edge.json()["mounts"]] == ["physics"]
        for iid in (local.json()["id"], at_edge.json()["id"]):
            await client.delete(f"/api/v1/instances/{iid}", headers=admin_headers)
            await wait_for_state(client, admin_headers, iid, {"stopped", "failed"})


async def test_a_group_root_that_hangs_holds_up_no_heartbeat(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A listing that does not end in time is not waited for (the beat goes without it, the
    portal keeps what it heard), and no second listing starts while the first hangs."""
    release = threading.Event()
    calls: list[Path] = []

    def hanging(root: Path) -> list[str]:
        calls.append(root)
        release.wait(30)
        return ["physics"]

    monkeypatch.setattr("labgate.agent.remote.group_dirs", hanging)
    monkeypatch.setattr("labgate.agent.remote.GROUP_SCAN_TIMEOUT", 0.2)
    agent = RemoteAgent("http://127.0.0.1:9", "lgs_x", lambda welcome, report: None)
    agent._group_root = str(tmp_path)
    agent._said_groups = ["chemistry"]
    try:
        started = time.monotonic()
        assert await agent._groups() == ["chemistry"]
        assert await agent._groups() == ["chemistry"]
        assert time.monotonic() - started < 5 and calls == [tmp_path]
    finally:
        release.set()
    async with asyncio.timeout(10):
        while await agent._groups() != ["physics"]:
            await asyncio.sleep(0.05)
