"""What a container started by the containers backend cannot do, checked from inside it.

Each test starts real containers on the run's Podman (tests/podman.py) with
:class:`ContainerBackend`, runs a probe (Python in the demo image) as the
tool's own process, and reads what the probe found from the container's
output.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import podman
from labgate.backends.base import LaunchSpec, Mount, Resources, SnapshotRequest
from labgate.backends.container_security import IdRange, allocate
from labgate.backends.containers import ContainerBackend
from labgate.config import Settings
from labgate.errors import BackendError, InstanceStartError
from labgate.security import new_id
from labgate.tools.catalog import Tool
from podman import DEMO_IMAGE, RUN, Engine

engine = podman.engine
deployment = podman.deployment

MIB = 1024**2
PROBE = r"""
import json, os, socket, stat, sys, time
found = {"uid": os.getuid(), "gid": os.getgid()}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key.startswith("Cap"):
        found[key] = int(value, 16)
    if key == "NoNewPrivs":
        found[key] = int(value)
found["uid_map"] = open("/proc/self/uid_map").read().split()
found["mountinfo"] = open("/proc/self/mountinfo").read()
sockets = []
for root, dirs, files in os.walk("/"):
    if root in ("/proc", "/sys"):
        dirs[:] = []
        continue
    for name in files + dirs:
        path = os.path.join(root, name)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                sockets.append(path)
        except OSError:
            pass
found["sockets"] = sockets
connects = {}
for path in sys.argv[1:] + ["/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock"]:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
        connects[path] = "connected"
    except OSError as exc:
        connects[path] = type(exc).__name__
found["connects"] = connects
environ = {}
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            environ[pid] = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError as exc:
            environ[pid] = type(exc).__name__
found["environ"] = environ
for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
    try:
        found["pids_max"] = open(path).read().strip()
    except OSError:
        pass
try:
    open(os.path.expanduser("~/probe-wrote"), "w").write("x")
    found["home_writable"] = True
except OSError:
    found["home_writable"] = False
print("PROBE " + json.dumps(found), flush=True)
time.sleep(600)
"""


def probe_tool(image: str = DEMO_IMAGE, user: str = "", *paths: str) -> Tool:
    """A tool whose process reports what it can see and do, then sleeps."""
    return Tool.model_validate(
        {
            "name": "probe",
            "title": "Probe",
            "container": {
                "image": image,
                "command": ["python3", "-c", PROBE.replace("{", "{{").replace("}", "}}"), *paths],
                "args": [],
                "port": 8888,
                "workspace": "/home/labgate",
                "user": user,
            },
        }
    )


def sleeper_tool() -> Tool:
    """A tool that only sleeps: another user's instance, for the probe to look for."""
    return Tool.model_validate(
        {
            "name": "sleeper",
            "title": "Sleeper",
            "container": {
                "image": DEMO_IMAGE,
                "command": ["python3", "-c", "import time; time.sleep(600)"],
                "args": [],
                "port": 8888,
                "workspace": "/home/labgate",
            },
        }
    )


def spec_of(tool: Tool, owner: str, tmp_path: Path, mounts: tuple[Mount, ...] = ()) -> LaunchSpec:
    iid = new_id()
    return LaunchSpec(
        instance_id=iid,
        owner=owner,
        tool=tool,
        base_url=f"/i/{iid}/",
        workspace=tmp_path / "unused",
        resources=Resources(cpu=0.5, memory=256 * MIB),
        secret=f"secret-of-{owner}-{iid}",
        mounts=mounts,
    )


def backend_of(settings: Settings, engine: Engine, deployment: str, **options: Any) -> Any:
    backend = ContainerBackend(
        settings, {"base_url": engine.base_url, "deployment": deployment, **options}
    )

    async def progress(iid: str, message: str, data: dict[str, Any]) -> None:
        pass

    backend.attach("box", progress)
    return backend


async def probe(backend: ContainerBackend, spec: LaunchSpec) -> tuple[dict[str, Any], Any]:
    """Start the probe; what it found, and the started state."""
    started = await backend.start(spec)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in (await backend.logs(started.state, 5)).splitlines():
            if line.startswith("PROBE "):
                return json.loads(line.removeprefix("PROBE ")), started.state
        await asyncio.sleep(0.3)
    raise AssertionError(f"the probe said nothing: {await backend.logs(started.state, 20)}")


def host_pid(engine: Engine, state: dict[str, Any]) -> int:
    return int(engine.client.api.inspect_container(state["container_id"])["State"]["Pid"])


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


# --- capabilities, no_new_privs, user --------------------------------------------------


async def test_no_capabilities_no_new_privileges_and_not_root_inside_or_outside(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment)
    found, state = await probe(backend, spec_of(probe_tool(), "alice", tmp_path))
    try:
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert found[key] == 0, (key, found[key])
        assert found["NoNewPrivs"] == 1
        assert found["uid"] == 1000 and found["home_writable"]

        # A user namespace: the container's ids are a range of host ids far from any account.
        inside, outside, count = (int(x) for x in found["uid_map"])
        assert inside == 0 and outside >= 2**31 and count == 65536, found["uid_map"]
        pid = host_pid(engine, state)
        uid = host_uid(pid)
        assert uid == outside + 1000
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)  # no local account owns the container's processes

        # pids limit (and memory, cpu) are the container's own.
        assert found.get("pids_max") == "1024"
        hostconfig = engine.client.api.inspect_container(state["container_id"])["HostConfig"]
        assert hostconfig["PidsLimit"] == 1024 and hostconfig["Memory"] == 256 * MIB
        assert hostconfig["NanoCpus"] == 500_000_000
    finally:
        await backend.stop(state, grace=1)
        await backend.close()


async def test_an_image_that_runs_as_root_runs_as_the_default_user(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    # The demo image with USER root, as many public images are.
    root_image = f"localhost/labgate/demo-root:{RUN}"
    created = engine.client.api.create_container(DEMO_IMAGE, command=["true"])
    engine.client.api.commit(
        created["Id"], repository=root_image.split(":")[0], tag=RUN, changes=["USER root"]
    )
    engine.remove(created["Id"])
    backend = backend_of(settings, engine, deployment, default_user="4242:4242")
    try:
        found, state = await probe(backend, spec_of(probe_tool(root_image), "carol", tmp_path))
        try:
            assert (found["uid"], found["gid"]) == (4242, 4242)
            assert found["home_writable"]  # the new workspace volume is the user's
            outside = int(found["uid_map"][1])
            assert host_uid(host_pid(engine, state)) == outside + 4242
        finally:
            await backend.stop(state, grace=1)
    finally:
        await backend.close()
        engine.client.api.remove_image(root_image, force=True)


def test_capabilities_and_confinement_cannot_be_configured_away(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    for options, message in (
        ({"cap_drop": []}, 'must contain "ALL"'),
        ({"cap_add": ["SYS_ADMIN"]}, "SYS_ADMIN"),
        ({"cap_add": ["CAP_DAC_READ_SEARCH"]}, "DAC_READ_SEARCH"),
        ({"cap_add": ["SYS_PTRACE"]}, "SYS_PTRACE"),
        ({"security_opt": ["seccomp=unconfined"]}, "confinement"),
        ({"security_opt": ["label=disable"]}, "confinement"),
        ({"security_opt": ["no-new-privileges=false"]}, "confinement"),
        ({"pids_limit": 0}, "pids_limit"),
        ({"default_user": "0:0"}, "default_user"),
        ({"default_user": "root"}, "default_user"),
        ({"userns": "0:0:65536"}, "userns"),
        ({"userns_range": "0:4096"}, "userns_range"),
    ):
        with pytest.raises(ValueError, match=message):
            ContainerBackend(settings, options)
    allowed = ContainerBackend(settings, {"cap_add": ["chown", "SETUID"], "security_opt": []})
    assert allowed.config.cap_add == ["CHOWN", "SETUID"]


def test_a_container_always_gets_a_cpu_limit() -> None:
    """However small the request, the limit sent is never 0, which the engine reads as none."""
    from labgate.backends.container_security import MIN_NANO_CPUS, nano_cpus

    assert nano_cpus(0.5) == 500_000_000
    assert nano_cpus(1e-10) == MIN_NANO_CPUS > 0
    assert nano_cpus(0.0) == MIN_NANO_CPUS


async def test_no_new_privileges_even_when_the_site_lists_other_options(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment, security_opt=[])
    found, state = await probe(backend, spec_of(probe_tool(), "alice", tmp_path))
    try:
        assert found["NoNewPrivs"] == 1
    finally:
        await backend.stop(state, grace=1)
        await backend.close()


# --- the engine ----------------------------------------------------------------------


async def test_no_engine_socket_is_visible_or_reachable(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment)
    socket_path = engine.base_url.removeprefix("unix://")
    spec = spec_of(probe_tool(DEMO_IMAGE, "", socket_path), "alice", tmp_path)
    found, state = await probe(backend, spec)
    try:
        assert found["sockets"] == [], found["sockets"]
        assert set(found["connects"].values()) == {"FileNotFoundError"}, found["connects"]
        for path in (socket_path, "/run/podman", "/var/run/docker.sock", "/var/lib/containers"):
            assert f" {path} " not in found["mountinfo"]
    finally:
        await backend.stop(state, grace=1)
        await backend.close()


async def test_a_mount_that_would_show_the_engine_is_refused(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment)
    socket_dir = Path(engine.base_url.removeprefix("unix://")).parent
    try:
        for source in (socket_dir, Path("/run"), Path("/var/lib/containers/storage")):
            mount = Mount(source=source, target="/data/x")
            spec = spec_of(probe_tool(), "alice", tmp_path, mounts=(mount,))
            with pytest.raises(InstanceStartError, match="container engine"):
                await backend.start(spec)
        assert engine.containers_of(deployment) == []
    finally:
        await backend.close()


# --- other users, the host's files, the instance secret --------------------------------


async def test_a_container_sees_only_its_own_workspace_and_processes(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment)
    bob = spec_of(sleeper_tool(), "bob", tmp_path)
    bob_started = await backend.start(bob)
    alice = spec_of(probe_tool(), "alice", tmp_path)
    found, state = await probe(backend, alice)
    try:
        mountinfo = found["mountinfo"]
        assert f"labgate-{deployment}-alice" in mountinfo
        assert f"labgate-{deployment}-bob" not in mountinfo
        assert str(settings.data_dir) not in mountinfo
        # Own pid namespace: the init, the probe; bob's process and secret are nowhere.
        assert len(found["environ"]) <= 3, found["environ"].keys()
        assert not any(bob.secret in text for text in found["environ"].values())
        assert any(alice.secret in text for text in found["environ"].values())

        # Bob's volume has its own host id range: his files are no one alice's
        # container knows, should a file of his ever reach it.
        alice_map = int(found["uid_map"][1])
        bob_uid = host_uid(host_pid(engine, bob_started.state))
        assert bob_uid - 1000 != alice_map
        assert abs(bob_uid - 1000 - alice_map) >= 65536
    finally:
        await backend.stop(state, grace=1)
        await backend.stop(bob_started.state, grace=1)
        await backend.close()


async def test_workspace_files_keep_their_owner_across_instances(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    # Two instances of one user at once share the volume's ids (plain --userns=auto would
    # give the second another range, and the files would show as nobody's).
    backend = backend_of(settings, engine, deployment)
    first, first_state = await probe(backend, spec_of(probe_tool(), "alice", tmp_path))
    second, second_state = await probe(backend, spec_of(probe_tool(), "alice", tmp_path))
    try:
        assert first["uid_map"] == second["uid_map"]
        assert first["home_writable"] and second["home_writable"]
        volume = engine.client.api.inspect_volume(f"labgate-{deployment}-alice")
        assert volume["Labels"]["labgate.userns"] == f"{first['uid_map'][1]}:65536"
    finally:
        await backend.stop(first_state, grace=1)
        await backend.stop(second_state, grace=1)
        await backend.close()


async def test_the_instance_secret_is_not_readable_by_other_local_users(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    backend = backend_of(settings, engine, deployment)
    spec = spec_of(probe_tool(), "alice", tmp_path)
    _, state = await probe(backend, spec)
    try:
        pid = host_pid(engine, state)
        attrs = engine.client.api.inspect_container(state["container_id"])
        # Every route a local account would try, as "nobody": the process's environment,
        # Podman's own view (rootless podman sees its own, empty storage), the engine's
        # socket, the container's config on disk.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        userdata = Path(attrs["GraphDriver"]["Data"]["UpperDir"]).parent
        for command in (
            ["cat", f"/proc/{pid}/environ"],
            ["cat", str(Path(attrs["ResolvConfPath"]).parent / "config.json")],
            ["cat", str(userdata / "merged" / "proc" / "self" / "environ")],
            [
                "curl",
                "-s",
                "--unix-socket",
                engine.base_url.removeprefix("unix://"),
                f"http://d/containers/{state['container_id']}/json",
            ],
        ):
            result = subprocess.run(
                nobody + command,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
            )
            assert spec.secret not in result.stdout, command
        # The one exception a local account would have: the container's host uid. None has it.
        with pytest.raises(KeyError):
            pwd.getpwuid(host_uid(pid))
        assert spec.secret not in Path(f"/proc/{pid}/cmdline").read_text()
    finally:
        await backend.stop(state, grace=1)
        await backend.close()


async def test_an_image_snapshot_of_a_user_namespaced_container_is_refused_clearly(
    settings: Settings, engine: Engine, deployment: str, tmp_path: Path
) -> None:
    # Podman 4.3 would commit the files with their host ids: an image no launch can use.
    backend = backend_of(settings, engine, deployment)
    spec = spec_of(probe_tool(), "alice", tmp_path)
    _, state = await probe(backend, spec)
    try:
        request = SnapshotRequest(
            snapshot_id=new_id(), instance_id=spec.instance_id, owner="alice", tool="probe"
        )
        with pytest.raises(BackendError, match="user namespace"):
            await backend.snapshot(state, request)
    finally:
        await backend.stop(state, grace=1)
        await backend.close()


# --- without Podman ---------------------------------------------------------------------


def test_id_ranges_are_handed_out_from_the_top_without_overlap() -> None:
    pool = IdRange(100_000, 65536 * 3)
    first = allocate(pool, 65536, [])
    assert first == IdRange(100_000 + 2 * 65536, 65536)
    second = allocate(pool, 65536, [first])
    assert second == IdRange(100_000 + 65536, 65536)
    assert allocate(pool, 65536, [first, second]) == IdRange(100_000, 65536)
    # A range Podman gave some other container is stepped around, never shared.
    stepped = allocate(pool, 65536, [IdRange(100_000 + 2 * 65536 + 7, 5)])
    assert stepped == IdRange(100_000 + 65536 + 7, 65536)
    with pytest.raises(ValueError, match="no free block"):
        allocate(pool, 65536, [first, second, IdRange(100_000 + 10, 5)])
