"""`labgate serve` end to end: the router owns the port and is the way into instances."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets

from helpers import post_login_form_sync
from jupyter_client_util import execute
from servers import LabgateServer, wait_state

PASSWORD = "admin-password-for-serve"
USER_PASSWORD = "user-password-123"


@pytest.fixture
def server(tmp_path):
    srv = LabgateServer(tmp_path / "var", PASSWORD)
    srv.start()
    yield srv
    srv.stop_instances("admin", PASSWORD)
    srv.stop()


def make_user(server: LabgateServer, admin: dict[str, str], name: str) -> dict[str, str]:
    with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
        r = client.post("/api/v1/users", json={"name": name, "password": USER_PASSWORD})
        assert r.status_code == 201, r.text
    return server.token(name, USER_PASSWORD)


def launch(server: LabgateServer, headers: dict[str, str], tool: str = "demo") -> dict:
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        r = client.post("/api/v1/instances", json={"tool": tool})
        assert r.status_code == 202, r.text
        return wait_state(client, r.json()["id"], {"running", "failed"})


def test_demo_through_the_router_with_token_and_websocket(server):
    admin = server.token("admin", PASSWORD, ["admin", "account"])
    alice = make_user(server, admin, "alice")
    bob = make_user(server, admin, "bob")
    instance = launch(server, alice)
    assert instance["state"] == "running", instance
    url = instance["url"]
    assert url.startswith(server.url + "/i/")

    info = httpx.get(url + "api/info", headers=alice)
    assert info.status_code == 200
    seen = info.json()["headers"]
    assert seen["x-labgate-user"] == "alice"
    assert seen["x-forwarded-prefix"] == f"/i/{instance['id']}"
    # The user's labgate token never reaches the tool.
    assert "lg_" not in str(seen)

    async def echo() -> str:
        ws_url = url.replace("http://", "ws://") + "ws"
        async with websockets.connect(ws_url, additional_headers=alice) as ws:
            await ws.send("through the router")
            return str(await ws.recv())

    assert asyncio.run(echo()) == "through the router"

    # Someone else's token, no credentials, a browser: never the tool.
    assert httpx.get(url, headers=bob).status_code in (403, 404)
    anonymous = httpx.get(url + "api/info")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]
    browser = httpx.get(url + "lab?x=1", headers={"Accept": "text/html"})
    assert browser.status_code == 302
    assert browser.headers["location"].startswith("/login?next=")
    # Admins may reach any instance.
    assert httpx.get(url + "api/info", headers=admin).status_code == 200

    # The portal sees what the router saw.
    shown = httpx.get(f"{server.url}/api/v1/instances/{instance['id']}", headers=alice).json()
    assert shown["activity"]["last_request"] is not None
    assert shown["activity"]["bytes_out"] > 0


def test_session_cookie_works_and_logout_revokes_it_in_the_router(server):
    admin = server.token("admin", PASSWORD, ["admin", "account"])
    make_user(server, admin, "carol")
    carol = server.token("carol", USER_PASSWORD)
    instance = launch(server, carol)
    with httpx.Client(base_url=server.url, timeout=10) as browser:
        r = post_login_form_sync(
            browser,
            {"username": "carol", "password": USER_PASSWORD, "next": f"/i/{instance['id']}/"},
        )
        assert r.status_code == 303
        assert r.headers["location"] == f"/i/{instance['id']}/"
        page = browser.get(r.headers["location"])
        assert page.status_code == 200 and "labgate demo" in page.text
        cookie = browser.cookies.get("labgate-session")
        csrf = browser.get("/api/v1/auth/session").json()["csrf_token"]
        assert (
            browser.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        )
    replay = httpx.get(
        instance["url"], headers={"Cookie": f"labgate-session={cookie}", "Accept": "text/html"}
    )
    assert replay.status_code == 302


def test_restart_keeps_routes(server):
    admin = server.token("admin", PASSWORD, ["admin", "account"])
    instance = launch(server, admin)
    assert httpx.get(instance["url"] + "api/health", headers=admin).status_code == 200
    server.stop()
    server.start()
    r = httpx.get(instance["url"] + "api/health", headers=admin)
    assert r.status_code == 200, r.text


def test_token_without_access_scope_cannot_use_instances(server):
    admin = server.token("admin", PASSWORD, ["admin", "account"])
    make_user(server, admin, "dora")
    full = server.token("dora", USER_PASSWORD)
    instance = launch(server, full)
    read_only = server.token("dora", USER_PASSWORD, ["instances:read"])
    refused = httpx.get(instance["url"], headers=read_only)
    assert refused.status_code == 403  # not 401: the token is good, its scope is not
    assert refused.json() == {
        "error": "insufficient_scope",  # the portal's code for the same problem
        "detail": "this API token lacks the instances:access scope",
    }
    assert "labgate demo" not in refused.text
    assert httpx.get(instance["url"], headers=full).status_code == 200


@pytest.mark.e2e
def test_jupyterlab_used_through_the_router_only(server):
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    admin = server.token("admin", PASSWORD, ["admin", "account"])
    make_user(server, admin, "erin")
    erin = server.token("erin", USER_PASSWORD)
    instance = launch(server, erin, "jupyterlab")
    assert instance["state"] == "running", instance
    base = instance["url"]
    lab = httpx.get(base + "lab", headers=erin)
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    result = asyncio.run(execute(base, base.replace("http://", "ws://"), erin, "6*7"))
    assert result == "42"
    with httpx.Client(base_url=server.url, headers=erin, timeout=10) as client:
        client.delete(f"/api/v1/instances/{instance['id']}")
        wait_state(client, instance["id"], {"stopped"})


def test_several_router_processes_share_the_port(tmp_path):
    srv = LabgateServer(tmp_path / "var", PASSWORD, LABGATE_ROUTER_WORKERS="2")
    srv.start()
    try:
        admin = srv.token("admin", PASSWORD, ["admin", "account"])
        instance = launch(srv, admin)
        # New connections are spread over both processes by the kernel; every one
        # of them must know the route (the second process learnt it from the stream).
        deadline = time.monotonic() + 30
        answers = []
        while len(answers) < 40 and time.monotonic() < deadline:
            with httpx.Client(headers=admin, timeout=5) as fresh:
                answers.append(fresh.get(instance["url"] + "api/health").status_code)
        assert answers and set(answers[-20:]) == {200}, answers
    finally:
        srv.stop_instances("admin", PASSWORD)
        srv.stop()


def router_workers(server: LabgateServer) -> list[int]:
    """Pids of the live router worker processes of a running ``labgate serve``."""
    assert server.process is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == server.process.pid and stat[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening TCP socket on ``port``."""
    try:
        inodes = {
            link.removeprefix("socket:[").rstrip("]")
            for link in (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
            if link.startswith("socket:")
        }
    except OSError:
        return False
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port and fields[9] in inodes:
            return True
    return False


def wait_for(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it holds; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_killed_router_worker_is_replaced_and_serves_the_routes(tmp_path):
    srv = LabgateServer(tmp_path / "var", PASSWORD, LABGATE_ROUTER_WORKERS="2")
    srv.start()
    try:
        assert srv.process is not None
        admin = srv.token("admin", PASSWORD, ["admin", "account"])
        instance = launch(srv, admin)
        health = instance["url"] + "api/health"
        wait_for(lambda: len(router_workers(srv)) == 1, 30, "no router worker")
        [old] = router_workers(srv)
        wait_for(lambda: listens_on(old, srv.port), 30, "the worker does not listen")

        os.kill(old, signal.SIGKILL)
        took = wait_for(lambda: router_workers(srv) not in ([], [old]), 2.0, "not replaced")
        [new] = router_workers(srv)
        assert new != old and took < 2.0
        # The public port answers all along, the new worker still starting or not.
        deadline = time.monotonic() + 30
        while not listens_on(new, srv.port):
            with httpx.Client(headers=admin, timeout=5) as fresh:
                assert fresh.get(health).status_code == 200
            assert time.monotonic() < deadline, "the new worker does not listen"

        # The new worker has the route table: with the serve process frozen, only it
        # can answer (connections the kernel gives the frozen process time out).
        os.kill(srv.process.pid, signal.SIGSTOP)
        try:
            answered, deadline = 0, time.monotonic() + 30
            while answered < 3:
                assert time.monotonic() < deadline, "the new worker does not proxy"
                try:
                    with httpx.Client(headers=admin, timeout=1) as fresh:
                        response = fresh.get(health)
                except httpx.TimeoutException:
                    continue
                assert response.status_code == 200, response.text
                answered += 1
        finally:
            os.kill(srv.process.pid, signal.SIGCONT)
        with httpx.Client(headers=admin, timeout=5) as fresh:
            assert fresh.get(f"{srv.url}/api/v1/instances/{instance['id']}").status_code == 200

        log = srv.log_path.read_text()
        assert f"router worker 0 (pid {old}) killed by SIGKILL" in log, log
        assert f"router worker 0 restarted as pid {new}" in log, log

        # A worker outlives no serve: killed with SIGKILL, serve leaves no router
        # behind on the port answering from a stale table.
        srv.stop_instances("admin", PASSWORD)
        srv.process.kill()
        srv.process.wait()
        srv.process = None
        wait_for(lambda: not alive(new), 5, "the orphaned worker keeps running")
    finally:
        srv.stop_instances("admin", PASSWORD)
        srv.stop()
