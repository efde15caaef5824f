"""The containers backend as an operator runs it: engine outages, busy tools, snapshots.

Real Podman and a real registry (tests/podman.py): the engine going away is a
``podman system service`` of the test's own, stopped and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_containers import busybox_tool, events_of, launch, write_busybox_tools

import podman
from helpers import wait_for_state
from labgate.config import Settings, SiteConfig
from labgate.db.models import Instance
from labgate.tools.catalog import Catalog, load_tool_file
from podman import Engine

engine = podman.engine
registry = podman.registry
deployment = podman.deployment


class Outage:
    """A Podman service of one test on its own socket, to stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "site-engine.sock"
        self.log = directory / "site-engine.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.process = podman.podman_service(self.socket, self.log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)
            self.process = None
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def outage(engine: Engine, tmp_path: Path) -> Any:
    service = Outage(tmp_path)
    service.start()
    yield service
    service.stop()


@pytest.fixture
def settings(settings: Settings, outage: Outage, deployment: str, tmp_path: Path) -> Settings:
    """One containers site, ``box``, on the test's own Podman service."""
    write_busybox_tools(settings.tools_dir or tmp_path / "tools")
    site = SiteConfig(
        name="box",
        backend="containers",
        options={"base_url": outage.base_url, "deployment": deployment},
    )
    return settings.model_copy(
        update={"sites": [site], "reconcile_interval": 0, "cull_interval": 0.2, "cull_warning": 0.5}
    )


def running_containers(engine: Engine, deployment: str) -> list[str]:
    found = engine.client.api.containers(filters={"label": f"labgate.deployment={deployment}"})
    return [str(item["Id"]) for item in found]


async def test_stop_while_the_engine_is_down_waits_for_it_and_then_finishes(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    engine: Engine,
    deployment: str,
    outage: Outage,
) -> None:
    app.state.portal.links["box"].agent.stop_retry_first = 0.2
    iid = await launch(client, admin_headers, tool="bb-web")
    body = await wait_for_state(client, admin_headers, iid, {"running", "failed"})
    assert body["state"] == "running", body
    assert len(running_containers(engine, deployment)) == 1

    outage.stop()
    stop = await client.delete(f"/api/v1/instances/{iid}", headers=admin_headers)
    assert stop.status_code == 202
    # Retried with backoff: still stopping, with the reason; the container still runs.
    deadline = time.monotonic() + 10
    while True:
        body = (await client.get(f"/api/v1/instances/{iid}", headers=admin_headers)).json()
        if body["reason"]:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
    assert body["state"] == "stopping", body
    assert body["reason"].startswith("stop failed:"), body
    await asyncio.sleep(1.5)  # a few more attempts
    body = (await client.get(f"/api/v1/instances/{iid}", headers=admin_headers)).json()
    assert body["state"] == "stopping", body
    assert len(running_containers(engine, deployment)) == 1
    # A second stop while it is retried is refused as before, and changes nothing.
    again = await client.delete(f"/api/v1/instances/{iid}", headers=admin_headers)
    assert again.status_code == 409

    outage.start()
    body = await wait_for_state(client, admin_headers, iid, {"stopped", "lost"}, timeout=30)
    assert body["state"] == "stopped", body
    assert body["reason"] == ""
    assert engine.containers_of(deployment) == []
    events = await events_of(app, iid)
    assert any("stop failed" in event["message"] for event in events), events


BUSY_SCRIPT = (
    "httpd -p {port} -h /www; "
    "while true; do wget -q -O /dev/null --post-data '' "
    '--header "Authorization: token $LABGATE_INSTANCE_TOKEN" '
    '"$LABGATE_API_URL/instances/$LABGATE_INSTANCE_ID/activity"; sleep 0.5; done'
)


async def test_a_busy_tool_in_a_container_reaches_labgate_and_is_not_culled(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    settings: Settings,
    engine: Engine,
    deployment: str,
) -> None:
    # A long computation with the browser closed: no traffic through the router, only
    # the tool's own busy reports to $LABGATE_API_URL.
    assert settings.tools_dir is not None
    tool = busybox_tool("bb-busy", ["sh", "-c", BUSY_SCRIPT]).replace(
        "start_timeout", "idle_timeout = 2\nstart_timeout"
    )
    (settings.tools_dir.parent / "bb-busy.toml").write_text(tool)
    portal = app.state.portal
    portal.catalog = Catalog(
        [*portal.catalog, load_tool_file(settings.tools_dir.parent / "bb-busy.toml")]
    )
    portal.instances.catalog = portal.catalog
    # The portal as the test serves it (settings name port 8000): loopback, as by default.
    portal.instances.extra_env["LABGATE_API_URL"] = f"{app.state.test_url}/api/v1"

    iid = await launch(client, admin_headers, tool="bb-busy")
    body = await wait_for_state(client, admin_headers, iid, {"running", "failed"})
    assert body["state"] == "running", body
    (container_id,) = running_containers(engine, deployment)
    env = engine.client.api.inspect_container(container_id)["Config"]["Env"]
    api_url = next(item.split("=", 1)[1] for item in env if item.startswith("LABGATE_API_URL="))
    assert "127.0.0.1" not in api_url and api_url.endswith("/api/v1"), api_url

    await asyncio.sleep(5)  # more than twice the idle timeout
    body = (await client.get(f"/api/v1/instances/{iid}", headers=admin_headers)).json()
    assert body["state"] == "running", body
    row = await portal.run_db(lambda s: s.get(Instance, iid))
    assert row.last_activity_at is not None
    assert time.time() - row.last_activity_at.timestamp() < 2

    # The relay forwards busy reports only, and labgate still checks the token.
    async with httpx.AsyncClient(timeout=5) as http:
        other = await http.get(f"{api_url}/instances")
        assert other.status_code == 404
        forged = await http.post(
            f"{api_url}/instances/{iid}/activity", headers={"Authorization": "token nope"}
        )
        assert forged.status_code == 401


async def test_readyz_and_metrics_report_each_site_and_launches_name_the_socket(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    settings: Settings,
    outage: Outage,
) -> None:
    portal = app.state.portal
    portal.links["box"].agent.health_ttl = 0
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["sites"] == {"box": "ok"}

    outage.stop()
    # An optional site down: still ready (the portal serves its other sites), and says so.
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["sites"]["box"].startswith(f"the container engine at {outage.base_url}")
    assert body["checks"]["sites"] == "degraded: box down (not required)"
    metrics = (await client.get("/metrics", headers=admin_headers)).text
    assert 'labgate_site_up{site="box"} 0.0' in metrics
    # The launch error names the engine's socket.
    iid = await launch(client, admin_headers, tool="bb-web")
    failed = await wait_for_state(client, admin_headers, iid, {"failed"})
    assert f"container engine at {outage.base_url}" in failed["reason"], failed

    # A required site down fails readiness.
    required = [site.model_copy(update={"required": True}) for site in settings.sites]
    portal.settings = settings.model_copy(update={"sites": required})
    down = await client.get("/readyz")
    assert down.status_code == 503 and down.json()["checks"]["sites"] == "required site down: box"

    outage.start()
    back = await client.get("/readyz")
    assert back.status_code == 200 and back.json()["sites"] == {"box": "ok"}
    metrics = (await client.get("/metrics", headers=admin_headers)).text
    assert 'labgate_site_up{site="box"} 1.0' in metrics


async def test_a_replica_gone_since_registration_fails_the_launch_and_creates_nothing(
    tmp_path: Path, engine: Engine, deployment: str
) -> None:
    import dataclasses

    from test_containers import demo_spec

    from labgate.backends.base import Mount
    from labgate.backends.containers import ContainerBackend
    from labgate.errors import InstanceStartError

    root = tmp_path / "data"
    root.mkdir()
    backend = ContainerBackend(
        Settings(data_dir=tmp_path / "var"), {"base_url": engine.base_url, "deployment": deployment}
    )
    try:
        mount = Mount(root / "survey" / "2026", "/data/survey", root=root)
        spec = dataclasses.replace(demo_spec(tmp_path), mounts=(mount,))
        with pytest.raises(InstanceStartError, match="does not exist in the data root"):
            await backend.start(spec)
    finally:
        await backend.close()
    # Neither a container nor a directory the engine would have made in the data store.
    assert engine.containers_of(deployment) == []
    assert list(root.iterdir()) == []


def run_doctor(env: dict[str, str]) -> tuple[int, list[dict[str, str]]]:
    import json

    from typer.testing import CliRunner

    from labgate.cli import app as cli_app

    result = CliRunner().invoke(cli_app, ["doctor", "--json"], env=env)
    return result.exit_code, json.loads(result.stdout)


def test_doctor_checks_the_registry_the_images_and_a_throwaway_container(
    tmp_path: Path, engine: Engine, registry: podman.Registry, deployment: str
) -> None:
    import json

    from servers import free_port

    tools = tmp_path / "tools"
    write_busybox_tools(tools)
    absent = busybox_tool("bb-absent", ["httpd"], image="localhost/labgate/absent:1")
    (tools / "bb-absent.toml").write_text(absent)
    site = engine.site("pods", deployment=deployment, pull="never")
    env = {
        "LABGATE_DATA_DIR": str(tmp_path / "var"),
        "LABGATE_PORT": str(free_port()),
        "LABGATE_TOOLS_DIR": str(tools),
        "LABGATE_SITES": json.dumps([site]),
        "LABGATE_SNAPSHOT_REGISTRY": registry.namespace(),
    }
    code, findings = run_doctor(env)
    said = {(f["level"], f["detail"]) for f in findings if f["subject"] == "site pods"}
    assert code == 1, findings  # the missing image, with pull = never
    assert any(
        level == "ok" and "registry answers" in detail and "trusted" in detail
        for level, detail in said
    ), said
    missing = [f for f in findings if "localhost/labgate/absent:1" in f["detail"]]
    assert [f["level"] for f in missing] == ["fail"], findings
    assert "put localhost/labgate/absent:1 on the engine" in missing[0]["fix"]  # no recipe
    assert any(
        level == "ok" and "throwaway container" in detail and "started" in detail
        for level, detail in said
    ), said
    assert not [
        c for c in engine.client.api.containers(all=True, filters={"label": "labgate.doctor"})
    ]

    # The same registry under a name the engine does not trust for plain HTTP; then none.
    port = registry.host.rsplit(":", 1)[1]
    env["LABGATE_SNAPSHOT_REGISTRY"] = f"http://localhost:{port}/x"
    code, findings = run_doctor(env)
    untrusted = [f for f in findings if "does not trust" in f["detail"]]
    assert untrusted and untrusted[0]["level"] == "fail", findings
    assert "insecure = true" in untrusted[0]["fix"]
    env["LABGATE_SNAPSHOT_REGISTRY"] = f"http://127.0.0.1:{free_port()}"
    code, findings = run_doctor(env)
    assert any("registry does not answer" in f["detail"] for f in findings), findings


def test_doctor_says_how_to_build_each_builtin_tools_image_an_engine_lacks(
    tmp_path: Path, engine: Engine, deployment: str
) -> None:
    import json

    from labgate.tools.catalog import Catalog

    socket = tmp_path / "empty.sock"
    # Podman wants a short run root (at most 50 characters): not under pytest's tmp_path.
    storage = Path(tempfile.mkdtemp(prefix="lg-empty-"))
    service = podman.podman_service(socket, tmp_path / "empty.log", storage=storage)
    try:
        site = {"name": "pods", "backend": "containers"}
        site["options"] = {
            "base_url": f"unix://{socket}",
            "deployment": deployment,
            "pull": "never",
        }
        env = {
            "LABGATE_DATA_DIR": str(tmp_path / "var"),
            "LABGATE_TOOLS_DIR": str(tmp_path / "no-tools"),
            "LABGATE_SITES": json.dumps([site]),
        }
        code, findings = run_doctor(env)
    finally:
        service.terminate()
        service.wait(15)
        shutil.rmtree(storage, ignore_errors=True)
    assert code == 1, findings
    fixes = {f["detail"].split(":")[0]: f.get("fix", "") for f in findings if f["level"] == "fail"}
    built = [t.name for t in Catalog.load() if t.sections.get("container", {}).get("build")]
    assert {"vscode", "desktop", "shiny", "streamlit", "jupyterlab"} <= set(built)
    for tool in built:
        assert f"labgate image build {tool} --site pods" in fixes[f"tool {tool}"], findings
    # A tool without a recipe cannot be built: the fix says to bring its image.
    assert (
        "image build" not in fixes["tool demo"] and "localhost/labgate/demo" in fixes["tool demo"]
    )


def test_image_build_makes_a_tools_image_from_its_recipe_with_progress(
    tmp_path: Path, engine: Engine, deployment: str
) -> None:
    import json

    from typer.testing import CliRunner

    from labgate.cli import app as cli_app

    image = f"localhost/labgate/{podman.RUN}-built:1"
    tools = tmp_path / "tools"
    recipe = tools / "bb-built.build"
    recipe.mkdir(parents=True)
    (recipe / "Containerfile").write_text(
        f"FROM {podman.BUSYBOX_IMAGE}\n"
        "COPY labgate /opt/labgate/lib/labgate\nCOPY extra-ca.pem /etc/extra-ca.pem\n"
        'RUN ["/bin/busybox", "touch", "/tmp/built-here"]\n'
    )
    tool = busybox_tool("bb-built", ["httpd", "-f", "-p", "{port}", "-h", "/www"], image=image)
    (tools / "bb-built.toml").write_text(
        tool.replace("[container]\n", '[container]\nbuild = "bb-built.build"\n')
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n(a test CA)\n")
    env = {
        "LABGATE_DATA_DIR": str(tmp_path / "var"),
        "LABGATE_TOOLS_DIR": str(tools),
        "LABGATE_SITES": json.dumps([engine.site("pods", deployment=deployment)]),
    }
    runner = CliRunner()
    try:
        result = runner.invoke(
            cli_app, ["image", "build", "bb-built", "--site", "pods", "--ca-file", str(ca)], env=env
        )
        assert result.exit_code == 0, result.output
        assert f"building {image} on {engine.base_url}" in result.output
        assert "STEP" in result.output or "Step" in result.output  # the engine's own progress
        assert f"built {image} on site pods" in result.output
        inspected = engine.client.api.inspect_image(image)
        assert inspected["Config"]["Labels"]["org.labgate.tool"] == "bb-built"
        # What the build context held: labgate's busy-report extension and the CA.
        # Detached, then waited for and read: following the output of a container
        # Podman has finished can hang (seen once in a local run of the whole suite).
        container = engine.client.containers.run(
            image,
            ["sh", "-c", "ls /opt/labgate/lib/labgate/tools; cat /etc/extra-ca.pem"],
            detach=True,
        )
        try:
            container.wait(timeout=120)
            files = container.logs().decode()
        finally:
            container.remove(force=True)
        assert "jupyter_busy.py" in files and "(a test CA)" in files

        # Failures are one error line with the engine's words.
        (recipe / "Containerfile").write_text("FROM localhost/labgate/absent-base:1\n")
        failed = runner.invoke(cli_app, ["image", "build", "bb-built", "--site", "pods"], env=env)
        assert failed.exit_code == 1 and "error: building" in failed.output, failed.output
        no_recipe = runner.invoke(cli_app, ["image", "build", "demo"], env=env)
        assert no_recipe.exit_code == 1 and "names no build recipe" in no_recipe.output
        no_site = runner.invoke(cli_app, ["image", "build", "bb-built", "--site", "x"], env=env)
        assert no_site.exit_code == 1 and "no containers site 'x'" in no_site.output
    finally:
        with contextlib.suppress(Exception):
            engine.client.images.remove(image, force=True)


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("jupyterlab", "localhost/labgate/jupyterlab:4"),
        ("vscode", "localhost/labgate/vscode:4.100"),
        ("desktop", "localhost/labgate/desktop:1"),
        ("shiny", "localhost/labgate/shiny:1"),
        ("streamlit", "localhost/labgate/streamlit:1"),
    ],
)
def test_the_builtin_tools_ship_recipes(tmp_path: Path, name: str, image: str) -> None:
    """Each built on a BASE of the builder's choice, running as uid 1000 with labgate's files."""
    from labgate.backends.container_build import recipe_of
    from labgate.backends.containers import ContainerBackend

    tool = Catalog.load().get(name)
    assert tool is not None
    backend = ContainerBackend(Settings(data_dir=tmp_path / "var"), {"base_url": "unix:///none"})
    assert recipe_of(backend, tool)[0] == image
    text = (recipe_of(backend, tool)[1] / "Containerfile").read_text()
    assert "ARG BASE=" in text and "USER 1000:1000" in text and "COPY labgate" in text
    assert f"labgate image build {name} --site" in text  # how to build it, in its header


async def test_a_launch_chooses_an_image_from_the_tools_and_groups_allowlists(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_user: Any,
    settings: Settings,
    engine: Engine,
    deployment: str,
) -> None:
    alt, physics = (f"localhost/labgate/{podman.RUN}-{name}:1" for name in ("alt", "physics"))
    for image in (alt, physics):
        engine.client.api.tag(podman.BUSYBOX_IMAGE, *image.rsplit(":", 1))
    assert settings.tools_dir is not None
    tool = busybox_tool("bb-pick", ["httpd", "-f", "-p", "{port}", "-h", "/www"]).replace(
        "[container]\n",
        f'[container]\nimages = ["{alt}"]\ngroup_images = {{ physics = ["{physics}"] }}\n',
    )
    path = settings.tools_dir.parent / "bb-pick.toml"
    path.write_text(tool)
    portal = app.state.portal
    portal.catalog = Catalog([*portal.catalog, load_tool_file(path)])
    portal.instances.catalog = portal.catalog
    alice = await make_user("alice")
    # The tags go with the run's other images (tests/podman.py), the containers with the app.
    shown = (await client.get("/api/v1/tools/bb-pick", headers=alice)).json()
    assert shown["images"] == [podman.BUSYBOX_IMAGE, alt]

    iid = await launch(client, alice, tool="bb-pick", image=alt)
    body = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert body["state"] == "running", body
    (container_id,) = running_containers(engine, deployment)
    assert engine.client.api.inspect_container(container_id)["Config"]["Image"] == alt

    # Not in any list, or in a group's list alice is not in: refused, nothing launched.
    for image in (physics, "docker.io/library/python:3"):
        refused = await client.post(
            "/api/v1/instances",
            json={"site": "box", "tool": "bb-pick", "image": image},
            headers=alice,
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "image_not_allowed"
        assert alt in refused.json()["detail"]
    no_image = await client.post(
        "/api/v1/instances", json={"tool": "slow", "image": alt}, headers=alice
    )
    assert no_image.status_code == 400 and no_image.json()["error"] == "image_not_allowed"

    # In the group: its images too.
    created = await client.post("/api/v1/groups", json={"name": "physics"}, headers=admin_headers)
    assert created.status_code == 201, created.text
    added = await client.put("/api/v1/groups/physics/members/alice", headers=admin_headers)
    assert added.status_code in (200, 201), added.text
    shown = (await client.get("/api/v1/tools/bb-pick", headers=alice)).json()
    assert shown["images"] == [podman.BUSYBOX_IMAGE, alt, physics]
    second = await launch(client, alice, tool="bb-pick", image=physics)
    body = await wait_for_state(client, alice, second, {"running", "failed"})
    assert body["state"] == "running", body
