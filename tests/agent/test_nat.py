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
        self, iid: str, path: str, *, after: int | None = None, then: Callable[[], None] = print
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
                    if after is not None and not fired and size >= after:
                        fired = True
                        then()
                    assert time.monotonic() < deadline, f"download too slow: {size} bytes"
        return size, digest.hexdigest()


def tool_processes(iid: str) -> list[int]:
    """Pids of the instance's tool processes (anywhere on the machine, namespaces included)."""
    return processes_with_env("LABGATE_INSTANCE_ID", iid)


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
    # The instance listens on the namespace's loopback: the host cannot reach it.
    with rig.client() as client:
        detail = client.get(f"/api/v1/instances/{iid}").json()
    endpoint = detail.get("endpoint") or ""
    if endpoint:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{endpoint}/i/{iid}/api/health", timeout=2, trust_env=False)
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
    assert len(tool_processes(iid)) >= 1
    rig.stop(iid)
