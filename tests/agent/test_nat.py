"""A site behind NAT, for real: its agent dials out from a network namespace nothing can dial into.

``labgate serve`` listens on the host end of the namespace's link; ``labgate
agent`` runs inside the namespace (:mod:`netns`) with a ``reach = "tunnel"``
site, and its instances listen on the namespace's own loopback. The router
can reach them only through the agent's connection. Then the faults: the
agent killed during a launch and during a download, the portal restarted,
the link cut for 30 s and past the grace period. Nothing is lost, nothing
runs twice, and the states say what happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents import ADMIN_PASSWORD, AgentProcess, add_site, wait_site
from netns import NatSite, require_nat, wait_until
from websockets.sync.client import connect as ws_connect

from servers import LabgateServer, processes_with_env, wait_state

pytestmark = pytest.mark.slow

MiB = 1 << 20
BIG = 200 * MiB
SITE = "edge"
#: Heartbeats every second: a dead link shows after three of them.
HEARTBEAT = "1"


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """200 MiB of random bytes and their sha256, made once for the module."""
    require_nat()  # before writing 200 MiB for tests that skip
    path = tmp_path_factory.mktemp("big") / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(BIG // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            out.write(chunk)
    path.chmod(0o644)
    return path, digest.hexdigest()


@pytest.fixture
def nat() -> Iterator[NatSite]:
    """A fresh namespace behind NAT; removed (with whatever still runs in it) afterwards."""
    require_nat()
    site = NatSite()
    try:
        site.create()
        site.assert_nat()
        yield site
    finally:
        site.destroy()


@dataclass
class Rig:
    """The portal on the host, the agent in the namespace, and an admin's token."""

    nat: NatSite
    server: LabgateServer
    agent: AgentProcess
    admin: dict[str, str] = field(default_factory=dict)

    def client(self, timeout: float = 10) -> httpx.Client:
        """An admin's client of the portal (through the router)."""
        return httpx.Client(
            base_url=self.server.url, headers=self.admin, timeout=timeout, trust_env=False
        )

    def launch(self, tool: str = "demo") -> str:
        """POST a launch on the site; the instance id."""
        with self.client() as client:
            created = client.post("/api/v1/instances", json={"tool": tool, "site": SITE})
            assert created.status_code in (200, 201, 202), created.text
            return str(created.json()["id"])

    def wait(self, iid: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        """Poll the instance until it is in one of ``states``."""
        with self.client() as client:
            return wait_state(client, iid, states, timeout)

    def running(self, iid: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for ``running``; anything that ends it first fails the test with the logs."""
        body = self.wait(iid, {"running", "failed", "lost", "stopped"}, timeout)
        assert body["state"] == "running", (body, self.agent.log()[-3000:])
        return body

    def route_answers(self, iid: str, status: int = 200, timeout: float = 20) -> httpx.Response:
        """Poll the instance's page through the router until it answers ``status``."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                page = client.get(f"/i/{iid}/")
                if page.status_code == status:
                    return page
                assert time.monotonic() < deadline, (page.status_code, page.text[:500])
                time.sleep(0.1)

    def stop(self, iid: str) -> None:
        """Stop the instance through the API; it ends ``stopped`` with no process left."""
        with self.client() as client:
            assert client.delete(f"/api/v1/instances/{iid}").status_code in (200, 202, 204)
            assert wait_state(client, iid, {"stopped", "lost", "failed"}, 60)["state"] == "stopped"
        wait_until(lambda: not tool_processes(iid), 20, f"the processes of {iid} to end")

    def place(self, iid: str, big: tuple[Path, str]) -> str:
        """Put the big file in the instance's workspace (the test owns the agent's data dir)."""
        with self.client() as client:
            home = client.get(f"/i/{iid}/api/info").json()["home"]
        target = self.agent.data_dir / "workspaces" / "admin" / "big.bin"
        if not target.exists():
            try:
                os.link(big[0], target)
            except OSError:
                target.write_bytes(big[0].read_bytes())
        return f"{home}/big.bin"

    def download(
        self, iid: str, path: str, *, after: int = 0, then: Callable[[], None] | None = None
    ) -> tuple[int, str]:
        """GET a file through the router, streaming; its size and sha256.

        With ``after``, ``then()`` runs once that many bytes have come (a fault
        mid-transfer); the read timeout bounds every wait.
        """
        digest, size, fired = hashlib.sha256(), 0, False
        deadline = time.monotonic() + 180
        with self.client(timeout=10) as client:
            params = {"path": path}
            with client.stream("GET", f"/i/{iid}/api/download", params=params) as response:
                assert response.status_code == 200, response.read()[:500]
                assert response.headers["content-length"] == str(BIG)
                for chunk in response.iter_raw(MiB):
                    digest.update(chunk)
                    size += len(chunk)
                    if then is not None and not fired and size >= after:
                        fired = True
                        then()
                    assert time.monotonic() < deadline, f"download too slow: {size} bytes"
        return size, digest.hexdigest()


def tool_processes(iid: str) -> list[int]:
    """Pids of the instance's tool processes (anywhere on the machine, namespaces included)."""
    return processes_with_env("LABGATE_INSTANCE_ID", iid)


def tool_launches(iid: str) -> list[int]:
    """Pids of the instance's demo servers themselves.

    Not the sandbox's bwrap, the uid switch or the limits launcher in front of
    them, whose command lines name the demo too until they exec into the next one.
    """
    found = []
    for pid in tool_processes(iid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[1:3] == [b"-m", b"labgate.tools.demo"]:
                found.append(pid)
    return found


@pytest.fixture
def rig_factory(nat: NatSite, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Builds the rig with the portal's settings of a test; tears it all down afterwards."""
    made: list[Rig] = []

    def make(**env: str) -> Rig:
        settings = {
            "LABGATE_SITE_HEARTBEAT_INTERVAL": HEARTBEAT,
            "LABGATE_SITE_GRACE_PERIOD": "120",
            **env,
        }
        server = LabgateServer(tmp_path / "var", ADMIN_PASSWORD, host=nat.host_addr, **settings)
        server.start()
        admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])
        token = add_site(server, admin, SITE, reach="tunnel")
        agent = AgentProcess(tmp_path / SITE, server.url, token, prefix=nat.prefix)
        rig = Rig(nat, server, agent, admin)
        made.append(rig)
        agent.start()
        wait_site(server, admin, SITE, "connected")
        return rig

    try:
        yield make
    finally:
        for rig in made:
            # Stop through the portal while the agent is there; the namespace's
            # teardown then ends anything left inside it.
            with contextlib.suppress(Exception):
                rig.server.stop_instances("admin", ADMIN_PASSWORD)
            rig.agent.stop()
            rig.server.stop()


def test_launch_use_and_stop_through_the_tunnel_from_behind_nat(
    rig_factory: Callable[..., Rig], big_file: tuple[Path, str]
) -> None:
    rig = rig_factory()
    iid = rig.launch()
    body = rig.running(iid)
    assert body["site"] == SITE
    # The instance listens on a Unix socket of the site's, which only its agent connects to
    # (the router reaches it through the tunnel; it never routes to a socket).
    with rig.client() as client:
        detail = client.get(f"/api/v1/instances/{iid}").json()
    endpoint = detail["endpoint"]
    assert endpoint.startswith("unix:"), detail
    assert endpoint.endswith(f"/sockets/{iid}/tool.sock"), detail
    # HTTP through the router, then through the tunnel.
    page = rig.route_answers(iid)
    assert "text/html" in page.headers["content-type"]
    with rig.client() as client:
        info = client.get(f"/i/{iid}/api/info").json()
    assert info["instance"] == iid
    # A WebSocket echo.
    ws_url = rig.server.url.replace("http://", "ws://", 1) + f"/i/{iid}/ws"
    with ws_connect(ws_url, additional_headers=rig.admin, open_timeout=10) as ws:
        for message in ("hello", os.urandom(200_000)):
            ws.send(message)
            assert ws.recv(timeout=10) == message
    # 200 MiB, whole and unchanged.
    path = rig.place(iid, big_file)
    started = time.monotonic()
    assert rig.download(iid, path) == (BIG, big_file[1])
    print(f"200 MiB through the tunnel in {time.monotonic() - started:.1f} s")
    assert len(tool_launches(iid)) == 1
    rig.stop(iid)


SLOW_TOOL = """
name = "slowdemo"
title = "Demo that takes 3 s to listen"
health_path = "/api/health"
start_timeout = 30
[process]
command = ["{python}", "-m", "labgate.tools.demo", "--port", "{port}", "--base-url", "{base_url}"]
env = { DEMO_START_DELAY = "3" }
"""


def test_agent_killed_while_the_tool_starts_adopts_it_after_restart(
    rig_factory: Callable[..., Rig], tmp_path: Path
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "slowdemo.toml").write_text(SLOW_TOOL)
    rig = rig_factory(LABGATE_TOOLS_DIR=str(tools))
    iid = rig.launch("slowdemo")
    wait_until(lambda: tool_launches(iid), 20, "the tool process to start")
    rig.agent.kill()
    first = tool_launches(iid)
    assert len(first) == 1
    body = rig.wait(iid, {"unreachable", "running", "failed", "lost"}, 20)
    assert body["state"] == "unreachable", body  # it was starting when the site went away
    rig.agent.start()
    # The portal saved the tool's state: the new agent adopts the same process.
    rig.running(iid)
    assert tool_launches(iid) == first, "the tool was started again instead of adopted"
    rig.route_answers(iid)
    rig.stop(iid)


def test_agent_killed_right_after_the_launch_request_ends_running_once_or_failed_with_why(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory()
    iid = rig.launch()
    rig.agent.kill()
    rig.agent.start()
    wait_site(rig.server, rig.admin, SITE, "connected")
    body = rig.wait(iid, {"running", "failed", "lost", "stopped"}, 60)
    launches = tool_launches(iid)
    print(f"agent killed right after the launch: {body['state']} ({body.get('reason')})")
    if body["state"] == "running":
        assert len(launches) == 1, launches
        rig.route_answers(iid)
        rig.stop(iid)
    else:
        assert body["state"] == "failed", body
        assert f"site {SITE}" in body["reason"], body
        # A failed launch leaves nothing behind at the site.
        wait_until(lambda: not tool_launches(iid), 20, f"no process of {iid}")


def test_agent_killed_during_a_download_cuts_it_then_comes_back(
    rig_factory: Callable[..., Rig], big_file: tuple[Path, str]
) -> None:
    rig = rig_factory()
    iid = rig.launch()
    rig.running(iid)
    pids = tool_launches(iid)
    path = rig.place(iid, big_file)
    killed: list[float] = []

    def kill() -> None:
        rig.agent.kill()
        killed.append(time.monotonic())

    with pytest.raises(httpx.TransportError) as caught:
        rig.download(iid, path, after=40 * MiB, then=kill)
    # The download ends with the connection, at once; it does not hang to a timeout.
    assert not isinstance(caught.value, httpx.TimeoutException), caught.value
    assert time.monotonic() - killed[0] < 5
    body = rig.wait(iid, {"unreachable", "failed", "lost", "stopped"}, 20)
    assert body["state"] == "unreachable", body
    page = rig.route_answers(iid, 503)
    assert "site is not connected" in page.text
    rig.agent.start()
    wait_site(rig.server, rig.admin, SITE, "connected")
    rig.running(iid, 30)
    assert tool_launches(iid) == pids  # the same tool process, never a second one
    rig.route_answers(iid)
    assert rig.download(iid, path) == (BIG, big_file[1])
    rig.stop(iid)


def test_portal_restart_with_the_agent_connected(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    iid = rig.launch()
    rig.running(iid)
    pids = tool_launches(iid)
    rig.server.stop()
    rig.server.start()
    # The agent comes back by itself (backoff), to the same instance.
    wait_site(rig.server, rig.admin, SITE, "connected", timeout=30)
    rig.running(iid, 30)
    rig.route_answers(iid)
    assert tool_launches(iid) == pids
    assert rig.agent.process is not None and rig.agent.process.poll() is None
    rig.stop(iid)


def test_link_cut_for_30_s_then_back(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    iid = rig.launch()
    rig.running(iid)
    pids = tool_launches(iid)
    rig.nat.cut()
    cut_at = time.monotonic()
    try:
        # Three heartbeats of silence (1 s each) and the site is away.
        site = wait_site(rig.server, rig.admin, SITE, "disconnected", timeout=15)
        assert site["live"] is False
        body = rig.wait(iid, {"unreachable", "failed", "lost", "stopped"}, 10)
        assert body["state"] == "unreachable", body
        assert "site is not connected" in rig.route_answers(iid, 503).text
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        with rig.client() as client:
            assert client.get(f"/api/v1/instances/{iid}").json()["state"] == "unreachable"
    finally:
        rig.nat.restore()
    wait_site(rig.server, rig.admin, SITE, "connected", timeout=40)
    rig.running(iid, 20)
    rig.route_answers(iid)
    assert tool_launches(iid) == pids
    rig.stop(iid)


def test_link_cut_past_the_grace_period_loses_the_instance_and_its_return_stops_it(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(LABGATE_SITE_GRACE_PERIOD="5")
    iid = rig.launch()
    rig.running(iid)
    assert tool_launches(iid)
    rig.nat.cut()
    try:
        body = rig.wait(iid, {"lost", "failed", "stopped"}, 30)
        assert body["state"] == "lost", body
        assert "did not come back within 5 s" in body["reason"], body
        # Still running at the site, out of the portal's reach.
        assert tool_launches(iid)
    finally:
        rig.nat.restore()
    wait_site(rig.server, rig.admin, SITE, "connected", timeout=40)
    # The agent reports what it holds; the portal wants none of it and stops it.
    wait_until(lambda: not tool_launches(iid), 30, f"the late instance {iid} to be stopped")
    with rig.client() as client:
        assert client.get(f"/api/v1/instances/{iid}").json()["state"] == "lost"
