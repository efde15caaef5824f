"""deploy/: the systemd units load (``systemd-analyze verify``) and the split deployment runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers import needs_postgres
from servers import free_port, wait_state
from split_deployment import (
    FrontDoor,
    SplitDeployment,
    enrol,
    launch_on,
    nginx_binary,
    wait_connected,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


@pytest.mark.parametrize(
    "unit",
    [
        "labgate.service",
        "labgate-agent.service",
        "labgate-portal@.service",
        "labgate-router@.service",
        "labgate-backup.service",
    ],
)
def test_the_units_verify(unit: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must check the units: apt-get install systemd")
        pytest.skip("systemd-analyze is missing: apt-get install systemd")
    labgate = Path(sys.executable).with_name("labgate")
    assert labgate.exists()
    text = (DEPLOY / unit).read_text()
    assert "ExecStart=/usr/local/bin/labgate " in text
    # Where this checkout's labgate is, instead of /usr/local/bin; an empty environment file.
    env = tmp_path / "agent.env"
    env.write_text("")
    # A template is verified as one of its instances (a replica on port 8001).
    copy = tmp_path / unit.replace("@.", "@8001.")
    copy.write_text(
        text.replace("/usr/local/bin/labgate", str(labgate))
        .replace("/etc/labgate/agent.env", str(env))
        .replace("/etc/labgate/labgate.env", str(env))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        # Units this one names that a test machine need not have.
        if "podman.socket" not in line and "network-online.target" not in line
    ]
    assert problems == [], result.stderr


def test_the_socket_drop_in_gives_the_labgate_group_access_only() -> None:
    text = (DEPLOY / "podman.socket.d" / "labgate.conf").read_text()
    assert "SocketGroup=labgate" in text and "SocketMode=0660" in text
    assert "[Socket]" in text


def test_the_backup_timer_runs_a_rotating_backup() -> None:
    timer = (DEPLOY / "labgate-backup.timer").read_text()
    service = (DEPLOY / "labgate-backup.service").read_text()
    assert "OnCalendar=" in timer and "Persistent=true" in timer and "[Install]" in timer
    assert "Type=oneshot" in service and "UMask=0077" in service
    assert "ExecStart=/usr/local/bin/labgate backup /var/backups/labgate --keep 14" in service


def test_the_registry_gc_timer_runs_its_service() -> None:
    timer = (DEPLOY / "registry-gc.timer").read_text()
    service = (DEPLOY / "registry-gc.service").read_text()
    assert "OnCalendar=" in timer and "[Install]" in timer
    assert "garbage-collect" in service and "Type=oneshot" in service


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
def test_the_split_deployment_runs_from_its_units(tmp_path: Path, database_url: str) -> None:
    """deploy/: nginx, 2 routers, 2 portals and an agent from the units; a user reaches the demo."""
    if not nginx_binary():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the front door: apt-get install nginx")
        pytest.skip("needs nginx (apt-get install nginx)")
    door_port = free_port()
    deployment = SplitDeployment(
        tmp_path,
        database_url,
        portals=2,
        routers=2,
        public_url=f"https://127.0.0.1:{door_port}",
    )
    door = FrontDoor(tmp_path, deployment.router_ports, door_port)
    try:
        deployment.start()
        door.start()
        admin = deployment.admin(door.url, door.verify)
        # Every replica and every router serves the API; one replica leads.
        leaders = set()
        for url in deployment.portal_urls:
            ready = httpx.get(f"{url}/readyz", timeout=5).json()
            leaders.add(ready["leader"])
            assert ready["replica"].endswith(f"-portal-{url.rsplit(':', 1)[1]}")
        assert len(leaders) == 1
        for url in deployment.router_urls:
            me = httpx.get(f"{url}/api/v1/auth/session", headers=admin, timeout=5)
            assert me.status_code == 200 and me.json()["user"]["name"] == "admin"
        with httpx.Client(base_url=deployment.router_urls[0], headers=admin, timeout=10) as api:
            token = enrol(api, "box")
            deployment.add_agent(token)
            wait_connected(api, "box", deployment)
            iid = launch_on(api, "box")
            body = wait_state(api, iid, {"running", "failed"}, timeout=60)
            assert body["state"] == "running", (body, deployment.logs())
        # The user reaches the tool through the front door, and through either router.
        page = httpx.get(
            f"{door.url}/i/{iid}/api/info", headers=admin, timeout=10, verify=door.verify
        )
        assert page.status_code == 200, page.text
        assert page.json()["headers"]["x-forwarded-proto"] == "https"
        for url in deployment.router_urls:
            page = httpx.get(f"{url}/i/{iid}/api/info", headers=admin, timeout=10)
            assert page.status_code == 200, page.text
        with httpx.Client(base_url=deployment.router_urls[1], headers=admin, timeout=10) as api:
            api.delete(f"/api/v1/instances/{iid}")
            assert wait_state(api, iid, {"stopped", "lost"})["state"] == "stopped"
    finally:
        door.stop()
        deployment.stop()


def test_the_front_door_is_valid_nginx(tmp_path: Path) -> None:
    """deploy/nginx/labgate.conf, with a certificate and ports of the test, passes ``nginx -t``."""
    if not nginx_binary():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must check the front door: apt-get install nginx")
        pytest.skip("needs nginx (apt-get install nginx)")
    door = FrontDoor(tmp_path, [free_port(), free_port()], free_port())
    assert door.check() == ""
