"""The containers backend on real Podman: limits, labels, workspaces, images, reconcile, restart.

Needs root, Podman and Debian's docker-registry (see tests/podman.py); skips
without them, and fails without them in CI.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from docker.errors import NotFound

import podman
from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY, wait_for_state
from labgate.backends.base import LaunchSpec, Resources
from labgate.backends.containers import ContainerBackend
from labgate.backends.registry import tool_unavailable_reason
from labgate.config import Settings, SiteConfig
from labgate.errors import InstanceStartError
from labgate.security import SecretBox, new_id
from labgate.tools.catalog import Catalog, ContainerSpec, Tool
from labgate.tools.ports import tool_port_range
from podman import BUSYBOX_IMAGE, RUN, Engine, Registry
from servers import LabgateServer

MIB = 1024**2
#: A local image of this run's own, put on the engine by the test that needs it.
ABSENT = f"localhost/labgate/{RUN}-absent:1"

# The run's Podman service and registry, and a deployment label per test.
engine = podman.engine
registry = podman.registry
deployment = podman.deployment


@pytest.fixture
def settings(settings: Settings, engine: Engine, deployment: str, tmp_path: Path) -> Settings:
    """The test settings with one containers site, ``box``, and busybox test tools."""
    write_busybox_tools(settings.tools_dir or tmp_path / "tools")
    site = SiteConfig.model_validate(engine.site(deployment=deployment))
    return settings.model_copy(update={"sites": [site], "reconcile_interval": 0})


def busybox_tool(
    name: str, args: list[str], *, image: str = BUSYBOX_IMAGE, timeout: int = 20
) -> str:
    quoted = json.dumps(args)
    return (
        f'name = "{name}"\ntitle = "{name}"\nhealth_path = "/"\nsupports_prefix = false\n'
        f'start_timeout = {timeout}\n\n[container]\nimage = "{image}"\nargs = {quoted}\n'
        'port = 8080\nworkspace = "/home/labgate"\n'
    )


def write_busybox_tools(directory: Path, extra: dict[str, str] | None = None) -> None:
    """Tiny tools: a busybox web server, and one that crashes at once."""
    directory.mkdir(parents=True, exist_ok=True)
    tools = {
        "bb-web": busybox_tool("bb-web", ["httpd", "-f", "-p", "{port}", "-h", "/www"]),
        "bb-crash": busybox_tool("bb-crash", ["sh", "-c", "echo boom: no config >&2; exit 3"]),
        # A local image (what `labgate image build` makes) no engine of the run holds.
        "bb-absent": busybox_tool("bb-absent", ["httpd", "-f", "-p", "{port}"], image=ABSENT),
        **(extra or {}),
    }
    for name, text in tools.items():
        (directory / f"{name}.toml").write_text(text)


async def launch(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> str:
    response = await client.post("/api/v1/instances", json={"site": "box", **body}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def instance_row(app: Any, instance_id: str) -> tuple[str, str, int]:
    """Endpoint, secret and owner id of an instance, from the database."""
    from labgate.db.models import Instance

    def read(session: Any) -> tuple[str, str, int]:
        row = session.get(Instance, instance_id)
        secret = app.state.portal.box.open(row.id, row.secret)
        return row.endpoint, secret, row.owner_id

    result: tuple[str, str, int] = await app.state.portal.run_db(read)
    return result


async def events_of(app: Any, iid: str) -> list[dict[str, Any]]:
    """Every stored event of an instance, oldest first, as the event stream sends them."""
    from sqlalchemy import select

    from labgate.db.models import InstanceEvent

    def read(session: Any) -> list[dict[str, Any]]:
        rows = session.scalars(
            select(InstanceEvent).where(InstanceEvent.instance_id == iid).order_by(InstanceEvent.id)
        )
        return [{"message": e.message, "kind": e.kind, "data": e.data} for e in rows]

    found: list[dict[str, Any]] = await app.state.portal.run_db(read)
    return found


async def tool_get(
    endpoint: str, secret: str, iid: str, route: str, **params: str
) -> httpx.Response:
    """GET a route of the demo tool straight from its endpoint, with the instance token."""
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(
            f"{endpoint}/i/{iid}/{route}",
            params=params,
            headers={"Authorization": f"token {secret}"},
        )


async def tool_put(endpoint: str, secret: str, iid: str, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.put(
            f"{endpoint}/i/{iid}/api/file",
            params={"path": path},
            content=body,
            headers={"Authorization": f"token {secret}"},
        )


async def read_cgroup_memory(endpoint: str, secret: str, iid: str) -> int:
    """The memory limit the container sees in its own cgroup (v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        response = await tool_get(endpoint, secret, iid, "api/file", path=path)
        if response.status_code == 200:
            return int(response.json()["content"].strip())
    raise AssertionError("no memory cgroup file is visible in the container")


# --- the backend itself ----------------------------------------------------------


def demo_spec(tmp_path: Path, owner: str = "alice", memory: int = 256 * MIB) -> LaunchSpec:
    tool = Catalog.load().get("demo")
    assert tool is not None and tool.parsed("container", ContainerSpec) is not None
    iid = new_id()
    return LaunchSpec(
        instance_id=iid,
        owner=owner,
        tool=tool,
        base_url=f"/i/{iid}/",
        workspace=tmp_path / "unused",
        resources=Resources(cpu=0.5, memory=memory),
        secret="s3cret-" + iid,
    )


async def wait_ready(endpoint: str, spec: LaunchSpec, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = await tool_get(endpoint, spec.secret, spec.instance_id, "api/health")
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the demo container never became ready"
        await asyncio.sleep(0.2)


async def test_container_gets_limits_labels_workspace_and_a_loopback_port(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = ContainerBackend(settings, {"base_url": engine.base_url, "deployment": deployment})
    notes: list[tuple[str, str]] = []

    async def progress(iid: str, message: str, data: dict[str, Any]) -> None:
        notes.append((iid, message))

    backend.attach("box", progress)
    spec = demo_spec(tmp_path)
    started = await backend.start(spec)
    try:
        assert started.endpoint.startswith("http://127.0.0.1:")
        # Below the kernel's ephemeral range: a leftover DNAT rule of the engine's for it
        # never catches a port the kernel hands another program.
        assert int(started.endpoint.rsplit(":", 1)[1]) in tool_port_range()
        await wait_ready(started.endpoint, spec)

        info = (await tool_get(started.endpoint, spec.secret, spec.instance_id, "api/info")).json()
        assert info["user"] == "alice" and info["instance"] == spec.instance_id
        assert info["home"] == "/home/labgate"
        async with httpx.AsyncClient() as http:
            refused = await http.get(f"{started.endpoint}/i/{spec.instance_id}/api/info")
        assert refused.status_code == 403  # only traffic carrying the instance token

        attrs = engine.client.api.inspect_container(started.state["container_id"])
        labels = attrs["Config"]["Labels"]
        assert labels["labgate.managed"] == "true"
        assert labels["labgate.deployment"] == deployment
        assert labels["labgate.site"] == "box"
        assert labels["labgate.instance"] == spec.instance_id
        assert labels["labgate.owner"] == "alice"
        assert labels["labgate.tool"] == "demo"
        host = attrs["HostConfig"]
        assert host["Memory"] == 256 * MIB
        assert host["NanoCpus"] == 500_000_000
        bindings = attrs["NetworkSettings"]["Ports"]["8888/tcp"]
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}  # never a public address
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert mounts["/home/labgate"]["Name"] == f"labgate-{deployment}-alice"

        # The limit is the container's own: its cgroup says so.
        limit = await read_cgroup_memory(started.endpoint, spec.secret, spec.instance_id)
        assert limit == 256 * MIB
        assert (await backend.poll(started.state)).alive
        assert "listening" in await backend.logs(started.state, 20)
    finally:
        await backend.stop(started.state, grace=5)
    with pytest.raises(NotFound):
        engine.client.containers.get(started.state["container_id"])
    assert engine.client.volumes.get(f"labgate-{deployment}-alice")  # the workspace stays
    status = await backend.poll(started.state)
    assert not status.alive and status.detail == "container vanished"
    await backend.stop(started.state, grace=5)  # idempotent
    await backend.close()


# These run without Podman.


def test_backend_options_are_checked(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    with pytest.raises(ValueError, match="loopback"):
        ContainerBackend(settings, {"publish_host": "0.0.0.0"})
    with pytest.raises(ValueError, match="nosuch"):
        ContainerBackend(settings, {"nosuch": 1})
    with pytest.raises(ValueError, match=r"\{user\}"):
        ContainerBackend(settings, {"workspace_volume": "shared"})
    backend = ContainerBackend(settings, {})
    assert backend.deployment == (settings.data_dir / "deployment_id").read_text().strip()
    assert ContainerBackend(settings, {}).deployment == backend.deployment  # kept
    assert ContainerBackend(settings, {"publish_host": "::1"}).config.publish_host == "::1"


async def test_an_unreachable_engine_fails_launches_but_loses_no_instance(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    backend = ContainerBackend(settings, {"base_url": f"unix://{tmp_path}/none.sock"})
    with pytest.raises(InstanceStartError, match="container engine"):
        await backend.start(demo_spec(tmp_path))
    status = await backend.poll({"container_id": "abc", "name": "x"})
    assert status.alive and status.detail.startswith("engine unreachable")
    assert (await backend.logs({"container_id": "abc"})).startswith("(logs unavailable")
    await backend.close()


def test_tool_files_get_a_container_section() -> None:
    demo = Catalog.load().get("demo")
    assert demo is not None and demo.parsed("container", ContainerSpec) is not None
    assert tool_unavailable_reason(demo, "containers") is None
    bare = Tool(name="bare", title="Bare", process=None)
    assert tool_unavailable_reason(bare, "containers") == "no [container] section"
    with pytest.raises(ValueError, match="python"):
        ContainerSpec(image="x", args=["{python}"]).check_placeholders()
    with pytest.raises(ValueError, match="instance_token"):
        ContainerSpec(image="x", args=["--token={instance_token}"]).check_placeholders()
    ContainerSpec(image="x", env={"T": "{instance_token}"}).check_placeholders()


# --- through the portal ----------------------------------------------------------


async def test_demo_in_a_container_through_the_router_with_websocket(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings
) -> None:
    from labgate.router.server import Router
    from labgate.security import SessionSigner

    alice = await make_user("alice")
    bob = await make_user("bob")
    iid = await launch(client, alice, tool="demo")
    body = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert body["state"] == "running", body
    endpoint, _, _ = await instance_row(app, iid)
    assert endpoint.startswith("http://127.0.0.1:")

    # A router fed by this portal's own route table, as in labgate serve.
    signer = SessionSigner(settings.signing_key(), settings.session_max_age)
    router = Router(app.state.portal.routes.table, signer, app.state.test_url)
    await router.listen("127.0.0.1", 0)
    try:
        base = f"127.0.0.1:{router.port}/i/{iid}"
        async with httpx.AsyncClient(timeout=10) as http:
            page = await http.get(f"http://{base}/", headers=alice)
            assert page.status_code == 200 and iid in page.text
            info = (await http.get(f"http://{base}/api/info", headers=alice)).json()
            assert info["user"] == "alice"
            assert (await http.get(f"http://{base}/api/info", headers=bob)).status_code in (
                403,
                404,
            )
        async with websockets.connect(f"ws://{base}/ws", additional_headers=alice) as ws:
            await ws.send("hello from a container")
            assert await ws.recv() == "hello from a container"
    finally:
        await router.close()


async def test_workspace_files_outlive_instances_and_stay_per_user(
    app: Any, client: httpx.AsyncClient, make_user: Any, engine: Engine, deployment: str
) -> None:
    alice = await make_user("alice")
    bob = await make_user("bob")
    first = await launch(client, alice, tool="demo", resources={"memory": "300M"})
    assert (await wait_for_state(client, alice, first, {"running", "failed"}))["state"] == "running"
    endpoint, secret, _ = await instance_row(app, first)
    assert await read_cgroup_memory(endpoint, secret, first) == 300 * MIB
    written = await tool_put(endpoint, secret, first, "/home/labgate/notes.txt", b"kept\n")
    assert written.json() == {"ok": True}

    assert (await client.delete(f"/api/v1/instances/{first}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, first, {"stopped"})
    assert engine.containers_of(deployment) == []  # stopped means removed

    second = await launch(client, alice, tool="demo")
    await wait_for_state(client, alice, second, {"running"})
    endpoint, secret, _ = await instance_row(app, second)
    read = await tool_get(endpoint, secret, second, "api/file", path="/home/labgate/notes.txt")
    assert read.json() == {"ok": True, "content": "kept\n"}

    other = await launch(client, bob, tool="demo")
    await wait_for_state(client, bob, other, {"running"})
    endpoint, secret, _ = await instance_row(app, other)
    read = await tool_get(endpoint, secret, other, "api/file", path="/home/labgate/notes.txt")
    assert read.status_code == 404  # bob's workspace is his own


async def test_crash_at_start_fails_with_the_output(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    iid = await launch(client, admin_headers, tool="bb-crash")
    body = await wait_for_state(client, admin_headers, iid, {"failed", "running"})
    assert body["state"] == "failed"
    assert "exited with code 3" in body["reason"]
    events = await events_of(app, iid)
    failed = events[-1]
    assert "boom: no config" in failed["message"] + failed["data"].get("log_tail", "")


async def test_a_crash_podman_trips_over_at_start_fails_with_the_output(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], engine: Engine
) -> None:
    """Podman's start and inspect fail with podman#16383 as the container exits: read again."""
    api = app.state.portal.links["box"].agent.backend.client.api
    with podman.exit_race(api) as race:
        iid = await launch(client, admin_headers, tool="bb-crash")
        body = await wait_for_state(client, admin_headers, iid, {"failed", "running"})
    assert len(race.started) == 1 and race.tripped
    assert body["state"] == "failed"
    assert "exited with code 3" in body["reason"]
    failed = (await events_of(app, iid))[-1]
    assert "boom: no config" in failed["message"] + failed["data"].get("log_tail", "")
    assert not engine.client.containers.list(all=True, filters={"id": race.started[0]})


async def test_missing_image_fails_the_launch_with_the_reason(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], registry: Registry
) -> None:
    tools = app.state.portal.catalog.tools
    spec = ContainerSpec(image=f"{registry.host}/{RUN}/no-such-image:1", port=8080)
    tools["ghost"] = Tool(name="ghost", title="Ghost", container=spec)
    iid = await launch(client, admin_headers, tool="ghost")
    body = await wait_for_state(client, admin_headers, iid, {"failed", "running"})
    assert body["state"] == "failed"
    assert body["reason"].startswith(f"never started: cannot pull image {spec.image}")
    assert "manifest unknown" in body["reason"]
    messages = [e["message"] for e in await events_of(app, iid)]
    assert f"pulling image {spec.image}" in messages


@pytest.fixture
def quick_tool_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site's agent asks its engine about the tools' images every 0.2 s."""
    monkeypatch.setattr("labgate.agent.site.TOOLS_REFRESH", 0.2)


async def test_a_tool_whose_local_image_is_missing_is_unavailable_until_it_is_there(
    quick_tool_checks: None,
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: Engine,
) -> None:
    async def shown(name: str) -> dict[str, Any]:
        r = await client.get(f"/api/v1/tools/{name}", headers=admin_headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    absent = await shown("bb-absent")
    assert absent["available"] is False
    assert absent["unavailable_reason"] == (
        f"its image {ABSENT} is not on this site's engine (a local image no registry serves); "
        f"put {ABSENT} on the engine"
    )
    assert (await shown("bb-web"))["available"] is True
    r = await client.post("/api/v1/instances", json={"tool": "bb-absent"}, headers=admin_headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "tool_unavailable" and ABSENT in r.json()["detail"]
    # Nor is it offered to open a dataset (the resolver's launch links).
    url = "https://data.example.org/files/cars.csv"
    await client.post("/api/v1/datasets", json={"id": url, "size": 100}, headers=admin_headers)
    answer = await client.get("/api/v1/resolve", params={"id": url}, headers=admin_headers)
    offered = {link["tool"] for link in answer.json()["launch"]}
    assert "bb-web" in offered and "bb-absent" not in offered, answer.text

    # Built (here: tagged) on the engine: the site offers the tool within its next look.
    repository, tag = ABSENT.rsplit(":", 1)
    engine.client.images.get(BUSYBOX_IMAGE).tag(repository, tag)
    try:
        async with asyncio.timeout(10):
            while not (await shown("bb-absent"))["available"]:
                await asyncio.sleep(0.1)
    finally:
        engine.client.images.remove(ABSENT)
    async with asyncio.timeout(10):
        while (await shown("bb-absent"))["available"]:
            await asyncio.sleep(0.1)


async def test_missing_image_is_pulled_with_progress_in_the_events(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: Engine,
    registry: Registry,
) -> None:
    # Put the busybox image in the registry under a new name, and off the engine.
    repository = f"{registry.host}/{RUN}/pull-me"
    engine.client.images.get(BUSYBOX_IMAGE).tag(repository, "1")
    for line in engine.client.api.push(repository, tag="1", stream=True, decode=True):
        assert "error" not in line, line
    engine.client.images.remove(f"{repository}:1")
    tools = app.state.portal.catalog.tools
    spec = ContainerSpec(
        image=f"{repository}:1", args=["httpd", "-f", "-p", "8080", "-h", "/www"], port=8080
    )
    tools["pulled"] = Tool(name="pulled", title="Pulled", supports_prefix=False, container=spec)
    try:
        iid = await launch(client, admin_headers, tool="pulled")
        body = await wait_for_state(client, admin_headers, iid, {"failed", "running"})
        assert body["state"] == "running", body
        messages = [e["message"] for e in await events_of(app, iid)]
        assert messages.index(f"pulling image {spec.image}") < messages.index(
            f"pulled image {spec.image}"
        )
    finally:
        await client.delete(f"/api/v1/instances/{iid}", headers=admin_headers)
        await wait_for_state(client, admin_headers, iid, {"stopped"})
        engine.client.images.remove(f"{repository}:1", force=True)


async def test_vanished_container_makes_the_instance_lost(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: Engine,
    deployment: str,
) -> None:
    iid = await launch(client, admin_headers, tool="bb-web")
    assert (await wait_for_state(client, admin_headers, iid, {"running", "failed"}))[
        "state"
    ] == "running"
    for container_id in engine.containers_of(deployment):
        engine.remove(container_id)
    body = await wait_for_state(client, admin_headers, iid, {"lost"}, timeout=20)
    assert "container vanished" in body["reason"]


def orphan(engine: Engine, deployment: str, instance_id: str, site: str = "box") -> Any:
    """A container labelled as one of labgate's that labgate does not know."""
    labels = {
        "labgate.managed": "true",
        "labgate.deployment": deployment,
        "labgate.site": site,
        "labgate.instance": instance_id,
    }
    return engine.client.containers.run(
        BUSYBOX_IMAGE, ["sleep", "600"], labels=labels, detach=True, init=True
    )


async def test_reconcile_removes_orphans_and_nothing_else(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: Engine,
    deployment: str,
) -> None:
    from labgate.scheduler.reconcile import Reconciler

    iid = await launch(client, admin_headers, tool="bb-web")
    await wait_for_state(client, admin_headers, iid, {"running"})
    stopped = await launch(client, admin_headers, tool="bb-web")
    await wait_for_state(client, admin_headers, stopped, {"running"})
    portal = app.state.portal
    stopped_state = await portal.run_db(lambda s: _backend_state(s, stopped))
    assert (
        await client.delete(f"/api/v1/instances/{stopped}", headers=admin_headers)
    ).status_code == 202
    await wait_for_state(client, admin_headers, stopped, {"stopped"})

    unknown = orphan(engine, deployment, "nobody-knows")
    leftover = orphan(engine, deployment, stopped)  # a stop that never removed its container
    other_site = orphan(engine, deployment, "elsewhere", site="other")
    other_labgate = orphan(engine, f"{deployment}-x", "theirs")
    try:
        removed = await Reconciler(portal.db, portal.links, 0).run_once()
        assert sorted(removed["box"]) == sorted(["nobody-knows", stopped])
        for gone in (unknown, leftover):
            with pytest.raises(NotFound):
                engine.client.containers.get(gone.id)
        for kept in (other_site, other_labgate):
            assert engine.client.containers.get(kept.id).status == "running"
        running = engine.client.containers.get(f"labgate-{deployment}-{iid}")
        assert running.status == "running"
        assert stopped_state["container_id"] != running.id
    finally:
        for container in (other_site, other_labgate):
            container.remove(force=True)


async def test_reconcile_runs_every_interval(app: Any, engine: Engine, deployment: str) -> None:
    from labgate.scheduler.reconcile import Reconciler

    portal = app.state.portal
    stray = orphan(engine, deployment, "found-later")
    reconciler = Reconciler(portal.db, portal.links, interval=0.2)
    reconciler.start()
    try:
        deadline = time.monotonic() + 10
        while stray.id in engine.containers_of(deployment):
            assert time.monotonic() < deadline, "the periodic reconcile never removed the orphan"
            await asyncio.sleep(0.1)
    finally:
        await reconciler.close()


async def test_discard_removes_the_instances_container_by_its_label(
    app: Any, engine: Engine, deployment: str
) -> None:
    """A start whose container id was never recorded: found by its instance label."""
    box = app.state.portal.links["box"].agent.backend
    left = orphan(engine, deployment, "cut-short")
    other_site = orphan(engine, deployment, "cut-short", site="other")
    other_labgate = orphan(engine, f"{deployment}-x", "cut-short")
    try:
        await box.discard("cut-short", 1)
        with pytest.raises(NotFound):
            engine.client.containers.get(left.id)
        for kept in (other_site, other_labgate):
            assert engine.client.containers.get(kept.id).status == "running"
        await box.discard("cut-short", 1)  # nothing there is fine
    finally:
        for container in (other_site, other_labgate):
            container.remove(force=True)


def _backend_state(session: Any, iid: str) -> dict[str, Any]:
    from labgate.db.models import Instance

    return dict(session.get(Instance, iid).backend_state)


# --- restart of labgate serve ------------------------------------------------------


def serve_with_containers(
    tmp_path: Path, engine: Engine, deployment: str, **env: str
) -> LabgateServer:
    sites = json.dumps([engine.site(deployment=deployment)])
    return LabgateServer(tmp_path / "var", ADMIN_PASSWORD, LABGATE_SITES=sites, **env)


def wait_state(
    http: httpx.Client, iid: str, states: set[str], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = http.get(f"/api/v1/instances/{iid}").json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def instance_secret(data_dir: Path, iid: str) -> str:
    """The instance's secret: sealed in the database, opened with the server's key."""
    with sqlite3.connect(data_dir / "labgate.db") as db:
        row = db.execute("select secret from instances where id = ?", (iid,)).fetchone()
    secret = SecretBox(TEST_SECRET_KEY).open(iid, str(row[0]))
    assert secret is not None
    return secret


def test_restart_of_serve_keeps_the_container_running_and_reconciles(
    tmp_path: Path, engine: Engine, deployment: str
) -> None:
    server = serve_with_containers(tmp_path, engine, deployment)
    server.start()
    try:
        headers = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            iid = http.post("/api/v1/instances", json={"tool": "demo"}).json()["id"]
            before = wait_state(http, iid, {"running", "failed"})
            assert before["state"] == "running", before
        container = engine.client.containers.get(f"labgate-{deployment}-{iid}")
        server.stop()

        container.reload()
        assert container.status == "running"  # labgate is down, the tool is not
        stray = orphan(engine, deployment, "left-behind")

        server.start()
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            time.sleep(1)  # a few poll rounds
            after = http.get(f"/api/v1/instances/{iid}").json()
            assert after["state"] == "running"
            assert after["endpoint"] == before["endpoint"]
            container.reload()
            assert container.status == "running"
            with pytest.raises(NotFound):  # reconciled at start-up
                engine.client.containers.get(stray.id)

            secret = instance_secret(server.data_dir, iid)
            info = httpx.get(
                f"{after['endpoint']}/i/{iid}/api/info",
                headers={"Authorization": f"token {secret}"},
                timeout=10,
            )
            assert info.status_code == 200 and info.json()["instance"] == iid

            assert http.delete(f"/api/v1/instances/{iid}").status_code == 202
            wait_state(http, iid, {"stopped"})
        with pytest.raises(NotFound):
            engine.client.containers.get(container.id)
    finally:
        server.stop()


def test_container_is_routed_by_serve_before_and_after_a_restart(
    tmp_path: Path, engine: Engine, deployment: str
) -> None:
    server = serve_with_containers(tmp_path, engine, deployment)
    server.start()
    try:
        admin = server.token("admin", ADMIN_PASSWORD, ["admin", "account", "instances:access"])
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as http:
            iid = http.post("/api/v1/instances", json={"tool": "demo"}).json()["id"]
            assert wait_state(http, iid, {"running", "failed"})["state"] == "running"
        use_through_router(server.url, iid, admin)
        server.stop()
        server.start()
        use_through_router(server.url, iid, admin)
    finally:
        server.stop()


def use_through_router(url: str, iid: str, headers: dict[str, str]) -> None:
    info = httpx.get(f"{url}/i/{iid}/api/info", headers=headers, timeout=10)
    assert info.status_code == 200 and info.json()["instance"] == iid

    async def echo() -> None:
        ws_url = url.replace("http://", "ws://") + f"/i/{iid}/ws"
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            await ws.send("through labgate serve")
            assert await ws.recv() == "through labgate serve"

    asyncio.run(echo())
