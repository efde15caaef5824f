"""The process backend with real processes: lifecycle, re-attach, cleanup, limits, sandbox.

Most tests run twice, unsandboxed and under bubblewrap (the ``sandbox``
fixture); the sandbox's own tests run under bubblewrap only. They skip when
bubblewrap is missing, except in CI (``CI=true``) where they fail. Every
instance is started through the ``launch`` fixture, which stops whatever is
left when the test ends, so no process outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from labgate.backends import process as process_module
from labgate.backends.base import JSON, LaunchSpec, Mount, Resources, Started, mount_variables
from labgate.backends.process import ProcessBackend
from labgate.backends.procfs import tail
from labgate.backends.sockets import SOCKET_NAME, connectable
from labgate.config import Settings
from labgate.errors import InstanceStartError
from labgate.tools.catalog import Catalog, ProcessSpec, Tool

Launch = Callable[..., Awaitable[tuple[Started, LaunchSpec]]]
MiB = 1024**2
#: User ids of the test's owners: run as root, each gets a uid of its own.
OWNER_IDS = {"alice": 1, "bob": 2}

# A tool that starts a child, which starts a grandchild in a new session with
# an empty environment: out of the tool's process group and without the
# instance's LABGATE_* marker, like a Jupyter kernel that cleans its env.
FORKER = """\
import os, signal, subprocess, sys, time
token = sys.argv[1]
role = sys.argv[2] if len(sys.argv) > 2 else "tool"
if role == "tool":
    subprocess.Popen([sys.executable, __file__, token, "child"])
elif role == "child":
    subprocess.Popen([sys.executable, __file__, token, "grandchild"],
                     start_new_session=True, env={})
if role == "tool" and os.environ.get("FORKER_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(role + ".ready", "w").close()  # in the workspace: every role's working directory
time.sleep(600)
"""


# --- fixtures ----------------------------------------------------------------
# Here rather than in a conftest.py: tests import helpers "from conftest", and a
# second conftest module on sys.path would shadow the root one.


def require_bwrap() -> None:
    """Skip when bubblewrap is missing; in CI (CI=true) that is a failure instead."""
    if shutil.which("bwrap") is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("bubblewrap is required in CI: apt-get install bubblewrap")
    pytest.skip("bubblewrap not installed: apt-get install bubblewrap")


@pytest.fixture(params=["none", "bwrap"])
def sandbox(request: pytest.FixtureRequest) -> str:
    """Run the test unsandboxed and under bubblewrap (override with indirect parametrize)."""
    mode: str = request.param
    if mode == "bwrap":
        require_bwrap()
    return mode


@pytest.fixture
def settings(tmp_path: Path, sandbox: str) -> Settings:
    """Settings with a private data dir, in the sandbox mode of the test."""
    return Settings(data_dir=tmp_path / "data", sandbox=sandbox)


@pytest.fixture
def backend(settings: Settings) -> ProcessBackend:
    """A process backend on the test's settings."""
    return ProcessBackend(settings)


@pytest.fixture
def demo() -> Tool:
    """The real demo tool from the built-in catalog."""
    tool = Catalog.load().get("demo")
    assert tool is not None
    return tool


@pytest.fixture
async def launch(settings: Settings, backend: ProcessBackend) -> AsyncIterator[Launch]:
    """Start instances; every one of them is stopped when the test ends."""
    started: list[JSON] = []

    async def start(
        tool: Tool,
        *,
        owner: str = "alice",
        env: dict[str, str] | None = None,
        resources: Resources | None = None,
        mounts: tuple[Mount, ...] = (),
        using: ProcessBackend | None = None,
        on_socket: bool = False,
    ) -> tuple[Started, LaunchSpec]:
        instance_id = f"t{uuid.uuid4().hex[:12]}"
        spec = LaunchSpec(
            instance_id=instance_id,
            owner=owner,
            owner_id=OWNER_IDS.get(owner),
            tool=tool,
            base_url=f"/i/{instance_id}/",
            workspace=settings.workspaces_dir / owner,
            resources=resources or tool.resources.default(),
            secret=uuid.uuid4().hex,
            env=env or {},
            mounts=mounts,
            on_socket=on_socket,
        )
        result = await (using or backend).start(spec)
        started.append(result.state)
        return result, spec

    yield start
    cleaner = ProcessBackend(settings)
    for state in started:
        await cleaner.stop(state, 0)
        await backend.poll(state)  # reap our children


# --- helpers -----------------------------------------------------------------


def read_bytes(path: str) -> bytes:
    """The file's bytes, or b"" when it cannot be read (process gone)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def live_pids() -> set[int]:
    """Every process that is not a zombie."""
    pids = set()
    for name in os.listdir("/proc"):
        stat = read_bytes(f"/proc/{name}/stat") if name.isdigit() else b""
        if stat and stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X"):
            pids.add(int(name))
    return pids


def instance_pids(instance_id: str) -> set[int]:
    """Live processes whose environment names the instance."""
    marker = f"\0LABGATE_INSTANCE_ID={instance_id}\0".encode()
    return {pid for pid in live_pids() if marker in b"\0" + read_bytes(f"/proc/{pid}/environ")}


def pids_with_arg(token: str) -> set[int]:
    """Live processes with ``token`` on their command line."""
    return {pid for pid in live_pids() if token.encode() in read_bytes(f"/proc/{pid}/cmdline")}


async def wait_until(predicate: Callable[[], Any], timeout: float = 15) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return value


def auth(spec: LaunchSpec) -> dict[str, str]:
    """The header the router adds to proxied requests."""
    return {"Authorization": f"token {spec.secret}"}


async def wait_healthy(started: Started, spec: LaunchSpec, timeout: float = 30) -> None:
    """Wait until the demo answers its health check."""
    url = f"{started.endpoint}{spec.base_url}api/health"
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url, headers=auth(spec))).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not healthy after {timeout}s")
            await asyncio.sleep(0.1)


async def demo_get(started: Started, spec: LaunchSpec, route: str, **params: str) -> httpx.Response:
    """GET a demo endpoint the way the router would."""
    async with httpx.AsyncClient(base_url=started.endpoint + spec.base_url) as client:
        return await client.get(route, params=params, headers=auth(spec))


async def read_file(started: Started, spec: LaunchSpec, path: str) -> str | None:
    """A file as the instance sees it, or None when it cannot read it."""
    response = await demo_get(started, spec, "api/file", path=path)
    return str(response.json()["content"]) if response.status_code == 200 else None


async def write_file(started: Started, spec: LaunchSpec, path: str) -> bool:
    """Whether the instance can write ``path``."""
    async with httpx.AsyncClient(base_url=started.endpoint + spec.base_url) as client:
        response = await client.put(
            "api/file", params={"path": path}, content=b"probe", headers=auth(spec)
        )
    return response.status_code == 200


async def wait_dead(backend: ProcessBackend, state: dict[str, Any]) -> Any:
    """Poll until the instance is reported dead; return that status."""
    deadline = time.monotonic() + 15
    while (status := await backend.poll(state)).alive:
        assert time.monotonic() < deadline, "instance still alive"
        await asyncio.sleep(0.05)
    return status


async def wait_forker_ready(workspace: Path) -> None:
    """Wait until the FORKER tool, its child and grandchild are all set up."""
    roles = ("tool", "child", "grandchild")
    await wait_until(lambda: all((workspace / f"{role}.ready").exists() for role in roles))


def process_of(tool: Tool) -> ProcessSpec:
    """The tool's validated ``[process]`` table."""
    process = tool.parsed("process", ProcessSpec)
    assert process is not None
    return process


def forker_tool(workspace: Path) -> Tool:
    """The FORKER script as a tool, its file placed in the owner's workspace."""
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "forker.py").write_text(FORKER)
    command = ["{python}", "{workspace}/forker.py", f"lgtest-{uuid.uuid4().hex}"]
    return Tool(name="forker", title="Forker", process=ProcessSpec(command=command))


# --- lifecycle ---------------------------------------------------------------


async def test_start_poll_health_stop(launch: Launch, backend: ProcessBackend, demo: Tool) -> None:
    started, spec = await launch(demo)
    state = started.state
    assert started.endpoint == f"http://127.0.0.1:{state['port']}"
    assert state["sandbox"] is (backend.settings.sandbox == "bwrap")
    assert json.loads(json.dumps(state)) == state
    assert (await backend.poll(state)).alive

    await wait_healthy(started, spec)
    assert (await demo_get(started, spec, "api/health")).json() == {"ready": True}
    async with httpx.AsyncClient() as client:
        refused = await client.get(f"{started.endpoint}{spec.base_url}api/health")
    assert refused.status_code == 403
    assert instance_pids(spec.instance_id)

    await backend.stop(state, grace=5)
    status = await backend.poll(state)
    assert not status.alive
    assert status.detail
    assert instance_pids(spec.instance_id) == set()
    await backend.stop(state, grace=5)  # idempotent
    assert "demo: listening on 127.0.0.1" in await backend.logs(state)


async def test_a_launch_on_a_socket_listens_there_and_discard_removes_it(
    launch: Launch, settings: Settings, sandbox: str, demo: Tool
) -> None:
    """Unsandboxed the tool binds the host path; sandboxed, /run/labgate/tool.sock."""
    with tempfile.TemporaryDirectory(prefix="lg-", dir="/tmp") as short:
        site = ProcessBackend(Settings(data_dir=Path(short) / "data", sandbox=sandbox))
        started, spec = await launch(demo, on_socket=True, using=site)
        directory = Path(short).resolve() / "data" / "sockets" / spec.instance_id
        assert started.endpoint == f"unix:{directory / SOCKET_NAME}"
        assert started.state["port"] == 0 and started.state["socket_dir"] == str(directory)
        answer = None
        for _ in range(300):  # until the tool listens and answers, as the agent asks
            with contextlib.suppress(OSError, httpx.TransportError):
                with connectable(str(directory / SOCKET_NAME)) as where:
                    transport = httpx.AsyncHTTPTransport(uds=where, verify=False)
                    async with httpx.AsyncClient(transport=transport) as client:
                        answer = await client.get(
                            f"http://tool{spec.base_url}api/health",
                            headers={"Authorization": f"token {spec.secret}"},
                        )
                break
            await asyncio.sleep(0.05)
        assert answer is not None
        assert answer.json() == {"ready": True}
        bound = "/run/labgate/tool.sock" if sandbox == "bwrap" else str(directory / SOCKET_NAME)
        assert f"demo: listening on {bound}" in await site.logs(started.state)
        await site.discard(spec.instance_id, 0)
        assert not directory.exists()
        assert instance_pids(spec.instance_id) == set()


async def test_a_data_dir_too_deep_for_a_socket_address_keeps_an_unsandboxed_tool_on_a_port(
    launch: Launch, tmp_path: Path, sandbox: str, demo: Tool
) -> None:
    deep = Settings(data_dir=tmp_path / ("d" * 100) / "data", sandbox=sandbox)
    started, _ = await launch(demo, on_socket=True, using=ProcessBackend(deep))
    if sandbox == "none":
        assert started.endpoint.startswith("http://127.0.0.1:")
    else:  # the sandboxed tool binds /run/labgate/tool.sock; the agent needs no short path
        assert started.endpoint.startswith("unix:") and len(started.endpoint) > 110


async def test_crash_reports_exit_code_and_logs(
    launch: Launch, backend: ProcessBackend, demo: Tool
) -> None:
    started, _ = await launch(demo, env={"DEMO_CRASH": "1"})
    status = await wait_dead(backend, started.state)
    assert status.exit_code == 3
    assert status.detail == "exited with code 3"
    assert "crashing on purpose" in await backend.logs(started.state, lines=5)
    assert (await backend.poll(started.state)).exit_code == 3  # remembered after reaping


async def test_reattach_from_saved_state(
    launch: Launch, settings: Settings, backend: ProcessBackend, demo: Tool
) -> None:
    started, spec = await launch(demo)
    await wait_healthy(started, spec)
    saved = json.loads(json.dumps(started.state))

    restarted = ProcessBackend(settings)  # a new server process knows only the state
    assert (await restarted.poll(saved)).alive
    assert "listening" in await restarted.logs(saved)
    await restarted.stop(saved, grace=5)
    assert not (await restarted.poll(saved)).alive
    assert instance_pids(spec.instance_id) == set()


async def test_pid_reuse_is_not_taken_for_the_instance(
    launch: Launch, backend: ProcessBackend, demo: Tool
) -> None:
    started, _ = await launch(demo)
    # The saved state of an instance long gone, whose pid the demo now happens to have.
    forged = {**started.state, "instance_id": "gone", "start_time": started.state["start_time"] - 1}
    status = await ProcessBackend(backend.settings).poll(forged)
    assert not status.alive
    assert status.detail == "process vanished"
    await ProcessBackend(backend.settings).stop(forged, grace=0)
    assert (await backend.poll(started.state)).alive  # a stranger's pid was left alone


async def test_stop_kills_setsid_grandchild(
    launch: Launch, settings: Settings, backend: ProcessBackend
) -> None:
    tool = forker_tool(settings.workspaces_dir / "alice")
    token = process_of(tool).command[-1]
    started, spec = await launch(tool)
    await wait_forker_ready(spec.workspace)
    grandchild = pids_with_arg(f"{token}\0grandchild")
    assert len(grandchild) == 1
    assert grandchild.isdisjoint(instance_pids(spec.instance_id))  # no marker, own session

    await backend.stop(started.state, grace=5)
    assert pids_with_arg(token) == set()
    assert instance_pids(spec.instance_id) == set()


async def test_stop_kills_after_grace_without_blocking_the_loop(
    launch: Launch, settings: Settings, backend: ProcessBackend
) -> None:
    tool = forker_tool(settings.workspaces_dir / "alice")
    token = process_of(tool).command[-1]
    started, spec = await launch(tool, env={"FORKER_IGNORE_TERM": "1"})
    await wait_forker_ready(spec.workspace)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    began = time.monotonic()
    await backend.stop(started.state, grace=1)
    took = time.monotonic() - began
    task.cancel()
    assert 1 <= took < 5
    assert ticks > 30  # the loop kept running during the grace period
    assert pids_with_arg(token) == set()
    assert (await backend.poll(started.state)).exit_code is not None


# --- environment and limits ----------------------------------------------------


async def test_environment_is_limited(
    launch: Launch, backend: ProcessBackend, demo: Tool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABGATE_TEST_SERVER_SECRET", "do-not-leak")
    started, spec = await launch(demo, env={"EXTRA": "given", "LABGATE_DEPLOYMENT": "forged"})
    await wait_healthy(started, spec)
    environ = await read_file(started, spec, "/proc/self/environ")
    assert environ is not None
    env = dict(item.split("=", 1) for item in environ.split("\0") if item)
    assert "LABGATE_TEST_SERVER_SECRET" not in env
    assert env["LABGATE_INSTANCE_ID"] == spec.instance_id
    assert env["LABGATE_INSTANCE_TOKEN"] == spec.secret
    assert env["LABGATE_USER"] == "alice"
    assert env["LABGATE_BASE_URL"] == spec.base_url
    assert env["EXTRA"] == "given"
    # The marks a reconcile finds its orphans by: a launch cannot forge them.
    assert env["LABGATE_DEPLOYMENT"] == backend.deployment
    assert backend.deployment == (backend.settings.data_dir / "deployment_id").read_text().strip()
    assert env["LABGATE_INSTANCE_SITE"] == backend.site
    assert env["HOME"] == str(spec.workspace.resolve())
    info = (await demo_get(started, spec, "api/info")).json()
    assert info["home"] == str(spec.workspace.resolve())
    assert spec.secret not in read_bytes(f"/proc/{started.state['pid']}/cmdline").decode()


async def test_reconcile_stops_this_sites_orphans_and_nothing_else(
    launch: Launch,
    settings: Settings,
    sandbox: str,
    tmp_path: Path,
    demo: Tool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restored database forgot two instances: the site stops them (at once), and only them.

    Beside them run an instance the record keeps, one of another site of the
    same labgate (same data dir) and one of another labgate on the host; and
    a user's process dressed up with this site's marks and the other site's
    instance id, which must not get that instance stopped.
    """
    monkeypatch.setattr(process_module, "ORPHAN_MIN_AGE", 0.0)
    monkeypatch.setattr(process_module, "ORPHAN_GRACE", 2.0)
    site_a = ProcessBackend(settings)
    site_a.site = "a"
    site_b = ProcessBackend(settings)
    site_b.site = "b"
    elsewhere = ProcessBackend(Settings(data_dir=tmp_path / "other-labgate", sandbox=sandbox))
    elsewhere.site = "a"
    assert elsewhere.deployment != site_a.deployment == site_b.deployment
    (orphan, orphan_spec), (second, second_spec), (kept, kept_spec) = [
        await launch(demo, using=site_a) for _ in "123"
    ]
    other_site, other_site_spec = await launch(demo, using=site_b)
    other_labgate, other_labgate_spec = await launch(demo, using=elsewhere)
    for started, spec in [
        (orphan, orphan_spec),
        (second, second_spec),
        (kept, kept_spec),
        (other_site, other_site_spec),
        (other_labgate, other_labgate_spec),
    ]:
        await wait_healthy(started, spec)
    marks = {"LABGATE_DEPLOYMENT": site_a.deployment, "LABGATE_INSTANCE_SITE": "a"}
    dressed_up = subprocess.Popen(
        ["sleep", "60"],
        env={**marks, "LABGATE_INSTANCE_ID": other_site_spec.instance_id},
        start_new_session=True,
    )
    await wait_until(lambda: dressed_up.pid in instance_pids(other_site_spec.instance_id))
    # The real discard, watched: how many run at once (a restore may leave many orphans, and
    # the portal waits on a reconcile only so long).
    discard = site_a.discard
    running, most = 0, 0

    async def watched(instance_id: str, grace: float) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await discard(instance_id, grace)
        finally:
            running -= 1

    monkeypatch.setattr(site_a, "discard", watched)

    try:
        removed = await site_a.reconcile({kept_spec.instance_id})
    finally:
        dressed_up.kill()
        dressed_up.wait()

    assert removed == sorted([orphan_spec.instance_id, second_spec.instance_id])
    assert most == 2  # both stopped at once
    for started, spec in [(orphan, orphan_spec), (second, second_spec)]:
        assert instance_pids(spec.instance_id) == set()
        assert not (await site_a.poll(started.state)).alive
    for started, spec in [
        (kept, kept_spec),
        (other_site, other_site_spec),
        (other_labgate, other_labgate_spec),
    ]:
        assert (await site_a.poll(started.state)).alive, spec.instance_id
        assert (await demo_get(started, spec, "api/health")).status_code == 200
    assert await site_a.reconcile({kept_spec.instance_id}) == []  # nothing more to stop


@pytest.mark.parametrize("sandbox", ["none"], indirect=True)
async def test_reconcile_spares_a_young_instance_and_ids_labgate_never_gives(
    launch: Launch, backend: ProcessBackend, demo: Tool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch younger than a minute may not be in the record yet; a marked process whose id
    is no instance id (a user's process dressed up as one) is not one of the site's."""
    started, spec = await launch(demo)
    await wait_healthy(started, spec)
    assert await backend.reconcile(set()) == []
    assert (await backend.poll(started.state)).alive

    monkeypatch.setattr(process_module, "ORPHAN_MIN_AGE", 0.0)
    marks = {"LABGATE_DEPLOYMENT": backend.deployment, "LABGATE_INSTANCE_SITE": backend.site}
    dressed_up = subprocess.Popen(
        ["sleep", "60"],
        env={**marks, "LABGATE_INSTANCE_ID": "../not-an-id"},
        start_new_session=True,
    )
    try:
        await wait_until(lambda: instance_pids("../not-an-id"))
        assert await backend.reconcile({spec.instance_id}) == []
        assert dressed_up.poll() is None
        assert (await backend.poll(started.state)).alive
    finally:
        dressed_up.kill()
        dressed_up.wait()


@pytest.mark.parametrize("sandbox", ["none"], indirect=True)
async def test_mounts_whose_names_collide_each_get_a_variable(
    launch: Launch, tmp_path: Path, demo: Tool
) -> None:
    """A dataset ``ml-a`` and a group volume ``ml_a`` map to one name: neither is lost."""
    dataset, group = tmp_path / "datasets" / "ml-a", tmp_path / "groups" / "ml_a"
    for directory in (dataset, group):
        directory.mkdir(parents=True)
    mounts = (
        Mount(dataset, "/data/ml-a", root=tmp_path / "datasets"),
        Mount(group, "/groups/ml_a", read_only=False, root=tmp_path / "groups"),
    )
    started, spec = await launch(demo, mounts=mounts)
    await wait_healthy(started, spec)
    environ = await read_file(started, spec, "/proc/self/environ")
    assert environ is not None
    env = dict(item.split("=", 1) for item in environ.split("\0") if item)
    # Unsandboxed nothing is bound: each variable holds its mount's host path.
    assert env["LABGATE_DATA_ML_A"] == str(dataset)
    assert env["LABGATE_DATA_ML_A_2"] == str(group)


def test_mount_variables_are_unique_in_launch_order() -> None:
    mounts = [
        Mount(Path("/d/1"), "/data/ml-a"),
        Mount(Path("/d/2"), "/groups/ml_a"),
        Mount(Path("/d/3"), "/data/ml_a_2"),
        Mount(Path("/d/4"), "/data/iris/"),
    ]
    assert mount_variables(mounts, lambda mount: mount.target) == {
        "LABGATE_DATA_ML_A": "/data/ml-a",
        "LABGATE_DATA_ML_A_2": "/groups/ml_a",
        "LABGATE_DATA_ML_A_2_2": "/data/ml_a_2",
        "LABGATE_DATA_IRIS": "/data/iris/",
    }


async def test_memory_cpu_and_file_limits(launch: Launch, demo: Tool) -> None:
    started, spec = await launch(demo, resources=Resources(cpu=1, memory=768 * MiB))
    await wait_healthy(started, spec)
    limits = started.state["limits"]
    assert limits["memory"] == 768 * MiB
    expected = f"Max address space         {768 * MiB:<21}{768 * MiB:<21}bytes"
    assert expected in read_bytes(f"/proc/{started.state['pid']}/limits").decode()
    inside = await read_file(started, spec, "/proc/self/limits")
    assert inside is not None and expected in inside
    assert f"Max open files            {limits['nofile']:<21}{limits['nofile']:<21}" in inside

    cpus = set(limits["cpus"]) or set(os.sched_getaffinity(0))
    assert len(limits["cpus"]) in (0, 1)
    for pid in instance_pids(spec.instance_id):
        assert os.sched_getaffinity(pid) == cpus


@pytest.mark.parametrize("sandbox", ["none"], indirect=True)
async def test_unknown_executable(launch: Launch, backend: ProcessBackend) -> None:
    for command in (["labgate-no-such-executable", "--port", "{port}"], ["/nonexistent/tool"]):
        tool = Tool(name="missing", title="Missing", process=ProcessSpec(command=command))
        with pytest.raises(InstanceStartError, match="executable"):
            await launch(tool)
    spec = ProcessSpec(command=["{python}"], requires=["labgate_no_such_module"])
    with pytest.raises(InstanceStartError, match="labgate_no_such_module"):
        await launch(Tool(name="needy", title="Needy", process=spec))


def test_tail_reads_from_the_end(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    with log.open("w") as handle:
        handle.writelines(f"line {i}\n" for i in range(300_000))
    assert tail(log, 3) == "line 299997\nline 299998\nline 299999\n"
    assert tail(log, 0) == ""
    assert tail(tmp_path / "missing.log", 10) == ""
    log.write_text("a\nb\nno newline")
    assert tail(log, 2) == "b\nno newline"
    assert tail(log, 10) == "a\nb\nno newline"


# --- the sandbox -------------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["bwrap"], indirect=True)
async def test_sandbox_isolates_users(launch: Launch, settings: Settings, demo: Tool) -> None:
    bob_ws = settings.workspaces_dir / "bob"
    bob_ws.mkdir(parents=True)
    (bob_ws / "secret.txt").write_text("bob's data")
    bob, bob_spec = await launch(demo, owner="bob")
    alice, spec = await launch(demo, owner="alice")
    await wait_healthy(alice, spec)
    await wait_healthy(bob, bob_spec)
    ws = spec.workspace.resolve()

    assert await read_file(bob, bob_spec, str(bob_ws / "secret.txt")) == "bob's data"
    assert await read_file(alice, spec, str(bob_ws / "secret.txt")) is None
    assert await read_file(alice, spec, bob.state["log"]) is None
    assert await read_file(alice, spec, "/etc/shadow") in (None, "")
    assert await read_file(alice, spec, "/etc/hostname") is not None  # the system is visible

    assert await write_file(alice, spec, str(ws / "notes.txt"))
    assert (ws / "notes.txt").read_bytes() == b"probe"
    for outside in ("/usr/labgate-probe", "/etc/labgate-probe", str(bob_ws / "x")):
        assert not await write_file(alice, spec, outside)
    assert not Path("/usr/labgate-probe").exists()
    assert not (bob_ws / "x").exists()
    probe = f"/tmp/labgate-probe-{uuid.uuid4().hex}"
    assert await write_file(alice, spec, probe)
    assert not Path(probe).exists()  # the sandbox's /tmp is its own


@pytest.mark.parametrize("sandbox", ["bwrap"], indirect=True)
async def test_sandbox_mounts(launch: Launch, tmp_path: Path, demo: Tool) -> None:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "table.csv").write_text("a,b\n1,2\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)  # a shared folder: writable by the instance's own uid too
    mounts = (Mount(dataset, "/data"), Mount(scratch, "/scratch", read_only=False))
    started, spec = await launch(demo, mounts=mounts)
    await wait_healthy(started, spec)
    assert await read_file(started, spec, "/data/table.csv") == "a,b\n1,2\n"
    assert not await write_file(started, spec, "/data/new.csv")
    assert await write_file(started, spec, "/scratch/out.txt")
    assert (scratch / "out.txt").read_bytes() == b"probe"


@pytest.mark.parametrize("sandbox", ["bwrap"], indirect=True)
async def test_sandbox_tracks_bwrap_and_its_pid_namespace(
    launch: Launch, backend: ProcessBackend, demo: Tool
) -> None:
    started, spec = await launch(demo)
    await wait_healthy(started, spec)
    pid = started.state["pid"]
    assert Path(f"/proc/{pid}/exe").resolve().name == "bwrap"
    # The tracked bwrap stays in the host's PID namespace; the tool runs in a new one.
    host_ns = Path("/proc/self/ns/pid").readlink()
    assert Path(f"/proc/{pid}/ns/pid").readlink() == host_ns
    inner = {Path(f"/proc/{p}/ns/pid").readlink() for p in instance_pids(spec.instance_id) - {pid}}
    assert inner and host_ns not in inner
    inside = await read_file(started, spec, "/proc/1/cmdline")
    assert inside is not None and inside.split("\0")[0].endswith("bwrap")  # its own init
    await backend.stop(started.state, grace=5)
    assert instance_pids(spec.instance_id) == set()


@pytest.mark.parametrize("sandbox", ["none"], indirect=True)
async def test_bwrap_required_but_missing(
    launch: Launch, tmp_path: Path, demo: Tool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    required = ProcessBackend(Settings(data_dir=tmp_path / "data", sandbox="bwrap"))
    with pytest.raises(InstanceStartError, match="apt-get install bubblewrap"):
        await launch(demo, using=required)


@pytest.mark.parametrize("sandbox", ["auto"], indirect=True)
async def test_auto_without_bwrap_refuses_as_root_and_warns_once_otherwise(
    launch: Launch,
    tmp_path: Path,
    demo: Tool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without bubblewrap a tool would run as labgate's own account: never as root."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(process_module, "_warned_unsandboxed", False)
    if os.geteuid() == 0:
        with pytest.raises(InstanceStartError, match="runs as root and bubblewrap is not"):
            await launch(demo)
        return
    with caplog.at_level(logging.WARNING, logger="labgate.backends.process"):
        first, _ = await launch(demo)
        second, _ = await launch(demo, owner="bob")
    assert first.state["sandbox"] is False and second.state["sandbox"] is False
    warnings = [r for r in caplog.records if "UNSANDBOXED" in r.getMessage()]
    assert len(warnings) == 1


# --- a real tool whose children start their own sessions -------------------------


@pytest.mark.e2e
async def test_jupyterlab_kernels_are_stopped_with_the_instance(
    launch: Launch, backend: ProcessBackend
) -> None:
    pytest.importorskip("jupyterlab", reason="JupyterLab not installed: pip install -e .[jupyter]")
    tool = Catalog.load().get("jupyterlab")
    assert tool is not None
    if os.getuid() == 0:  # Jupyter refuses root without this flag
        command = [*process_of(tool).command, "--allow-root"]
        process = process_of(tool).model_copy(update={"command": command})
        tool = Tool.model_validate({**tool.model_dump(), "process": process})
    started, spec = await launch(tool)
    base = started.endpoint + spec.base_url
    async with httpx.AsyncClient(base_url=base, headers=auth(spec), timeout=30) as client:

        async def ready() -> bool:
            try:
                return (await client.get("api")).status_code == 200
            except httpx.TransportError:
                return False

        deadline = time.monotonic() + 60
        while not await ready():
            assert (await backend.poll(started.state)).alive, await backend.logs(started.state)
            assert time.monotonic() < deadline, "JupyterLab did not start"
            await asyncio.sleep(0.2)
        kernel = await client.post("api/kernels", json={"name": "python3"})
        assert kernel.status_code == 201, kernel.text

    kernel_id = kernel.json()["id"]
    await wait_until(lambda: pids_with_arg(kernel_id), timeout=30)
    (kernel_pid,) = pids_with_arg(kernel_id)
    assert kernel_pid in instance_pids(spec.instance_id)
    await backend.stop(started.state, grace=10)
    assert pids_with_arg(kernel_id) == set()
    assert instance_pids(spec.instance_id) == set()


def test_tools_get_ports_below_the_ephemeral_range() -> None:
    """Outgoing connections (even the health check's own) never take a tool's port."""
    from labgate.tools.ports import free_port, tool_port_range

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = tool_port_range()
    assert ports and ports.stop == low
    assert all(p in ports for p in (free_port() for _ in range(20)))
