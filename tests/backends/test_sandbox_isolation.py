"""What code inside a sandboxed process-backend instance cannot do, labgate running as root.

Each test starts a real instance through the real :class:`ProcessBackend`
(real ``bwrap``, real uids, real cgroups) running a probe script as the tool.
The probe tries one route out of the sandbox and writes what happened to
``probe.json`` in its workspace; the test reads it from the host. One test per
route: capabilities and uid, file handles, ``/proc``, ``ptrace``, unix
sockets, plain file permissions (DAC), CPU and memory limits, and the
warm-pool claim's idmapped workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import httpx
import pytest

from labgate.agent.site import listening, probe_address
from labgate.backends import limits as limits_module
from labgate.backends.archive import save_workspace
from labgate.backends.base import JSON, LaunchSpec, Mount, Resources, SnapshotRef, Started
from labgate.backends.claim import Claim
from labgate.backends.process import ProcessBackend
from labgate.backends.procfs import instance_processes
from labgate.backends.registry import load_catalog
from labgate.backends.sockets import SANDBOX_DIR, SOCKET_NAME, connectable
from labgate.config import Settings
from labgate.tools.catalog import ProcessSpec, Tool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these hold for labgate run as root")

MiB = 1024**2
BASE = 1_000_000_000
ALICE, BOB = 11, 12
#: A warm-pool instance's own uid number (labgate.backends.identity.pool_identity_number).
POOL = 100_000_013

# The probe: one route per name on its command line; every attempt is recorded as
# {"ok": true, "value": ...} or {"ok": false, "errno": N}. Then it waits to be stopped.
PROBE = r"""
import ctypes, errno, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
config = json.loads(os.environ.get("PROBE", "{}"))
out = {}

def attempt(name, fn):
    try:
        out[name] = {"ok": True, "value": fn()}
    except OSError as exc:
        out[name] = {"ok": False, "errno": exc.errno}

def fail(what):
    code = ctypes.get_errno()
    raise OSError(code, what + ": " + os.strerror(code))

def by_handle(handle, flags):
    raw = bytes.fromhex(handle)
    mount_fd = os.open(os.environ["HOME"], os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.open_by_handle_at(mount_fd, ctypes.create_string_buffer(raw, len(raw)), flags)
    if fd < 0:
        fail("open_by_handle_at")
    return fd

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    names = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
             "NoNewPrivs")
    return {name: fields[name].split() for name in names}

def own_handle():
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf).value = 128
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, os.environ["HOME"].encode(), buf, ctypes.byref(mount_id), 0):
        fail("name_to_handle_at")
    return True

def listing(fd):
    return sorted(os.listdir(fd))

def read_fd(fd):
    return os.read(fd, 100).decode(errors="replace")

def markers():
    found = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError as exc:
            found[pid] = f"errno {exc.errno}"
            continue
        ids = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LABGATE_INSTANCE_ID=")]
        found[pid] = ids[0] if ids else ""
    return found

def attach(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        fail("ptrace")
    os.waitpid(pid, 0x40000000)  # __WALL: wait for the stop, then let go again
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    return True

def connect(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
    return True

def connect_by_handle(handle, name):
    fd = by_handle(handle, os.O_PATH | os.O_DIRECTORY)
    return connect(f"/proc/self/fd/{fd}/{name}")

def read_path(path):
    with open(path) as handle:
        return handle.read(100)

def connect_tcp(port):
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return True

def http_status(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(100).decode().split("\r\n")[0]

def affinity():
    before = sorted(os.sched_getaffinity(0))
    attempt("setaffinity", lambda: os.sched_setaffinity(0, set(config["all_cpus"])))
    return {"before": before, "after": sorted(os.sched_getaffinity(0))}

for route in sys.argv[1:]:
    if route == "identity":
        out["status"] = status()
        attempt("signal_init", lambda: os.kill(1, 0))
    elif route == "handles":
        attempt("own_handle", own_handle)
        DIR = os.O_RDONLY | os.O_DIRECTORY
        attempt("data_dir", lambda: listing(by_handle(config["data_dir"], DIR)))
        attempt("host_root", lambda: listing(by_handle(config["root"], DIR)))
        attempt("secret_key", lambda: read_fd(by_handle(config["secret_key"], os.O_RDONLY)))
        attempt("bob", lambda: listing(by_handle(config["bob"], DIR)))
    elif route == "proc":
        out["markers"] = markers()
        attempt("init_root", lambda: os.listdir("/proc/1/root"))
        attempt("init_cwd", lambda: os.listdir("/proc/1/cwd"))
        attempt("init_environ", lambda: read_path("/proc/1/environ"))
        attempt("init_mem", lambda: os.close(os.open("/proc/1/mem", os.O_RDONLY)))
    elif route == "ptrace":
        attempt("attach_init", lambda: attach(1))
        attempt("attach_bob", lambda: attach(config["bob_pid"]))
    elif route == "sockets":
        attempt("engine", lambda: connect("/run/podman/podman.sock"))
        attempt("portal_path", lambda: connect(config["portal_socket"]))
        attempt("portal_handle", lambda: connect_by_handle(config["data_dir"], "portal.sock"))
    elif route == "dac":
        attempt("root_only_file", lambda: read_path(config["root_only_file"]))
        attempt("root_only_dir", lambda: os.listdir(config["root_only_dir"]))
        attempt("bob_file", lambda: read_path("/data/bob/secret.txt"))
        attempt("own_write", lambda: open(os.environ["HOME"] + "/mine.txt", "w").write("mine"))
    elif route == "network":
        attempt("app", lambda: connect_tcp(config["app_port"]))
        attempt("gate", lambda: http_status(config["gate_port"]))
    elif route == "limits":
        out["affinity"] = affinity()
with open(os.path.join(os.environ["HOME"], "probe.json.part"), "w") as handle:
    json.dump(out, handle)
os.rename(os.path.join(os.environ["HOME"], "probe.json.part"),
          os.path.join(os.environ["HOME"], "probe.json"))
time.sleep(600)
"""

Launch = Callable[..., Awaitable[tuple[Started, LaunchSpec]]]


def require_bwrap() -> None:
    """Skip when bubblewrap is missing; in CI (CI=true) that is a failure instead."""
    if shutil.which("bwrap") is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("bubblewrap is required in CI: apt-get install bubblewrap")
    pytest.skip("bubblewrap not installed: apt-get install bubblewrap")


def file_handle(path: Path) -> str:
    """``name_to_handle_at`` of a host path, as hex: what an attacker would forge or guess."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint.from_buffer(buf).value = 128
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, str(path).encode(), buf, ctypes.byref(mount_id), 0) != 0:
        raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
    size = ctypes.c_uint.from_buffer(buf).value
    return buf.raw[: 8 + size].hex()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A data dir as ``labgate serve`` makes it: 0700, a key, a database, Bob's workspace."""
    require_bwrap()
    settings = Settings(data_dir=tmp_path / "data", sandbox="bwrap", instance_uid_base=BASE)
    data = settings.data_dir
    data.mkdir(mode=0o700)
    (data / "secret_key").write_text("k" * 64)
    (data / "labgate.db").write_bytes(b"SQLite format 3\0")
    for path in (data / "secret_key", data / "labgate.db"):
        path.chmod(0o600)
    bob = settings.workspaces_dir / "bob"
    bob.mkdir(parents=True)
    (bob / "secret.txt").write_text("bob's data")
    return settings


@pytest.fixture
async def launch(settings: Settings) -> AsyncIterator[Launch]:
    """Start instances of the probe (or another tool); all are stopped at the end."""
    backend = ProcessBackend(settings)
    started: list[JSON] = []

    async def start(
        *routes: str,
        owner: str = "alice",
        owner_id: int = ALICE,
        config: dict[str, Any] | None = None,
        tool: Tool | None = None,
        resources: Resources | None = None,
        mounts: tuple[Mount, ...] = (),
        using: ProcessBackend | None = None,
        workspace: Path | None = None,
        snapshot: SnapshotRef | None = None,
        params: dict[str, str] | None = None,
        on_socket: bool = False,
    ) -> tuple[Started, LaunchSpec]:
        instance_id = f"t{uuid.uuid4().hex[:12]}"
        workspace = workspace or settings.workspaces_dir / owner
        if tool is None:
            probe = settings.data_dir.parent / "probe.py"
            probe.write_text(PROBE)
            probe.chmod(0o644)
            command = ["{python}", "{workspace}/probe.py", *routes]
            tool = Tool(name="probe", title="Probe", process=ProcessSpec(command=command))
            workspace.mkdir(parents=True, exist_ok=True)
            shutil.copy(probe, workspace / "probe.py")
        spec = LaunchSpec(
            instance_id=instance_id,
            owner=owner,
            owner_id=owner_id,
            tool=tool,
            base_url=f"/i/{instance_id}/",
            workspace=workspace,
            resources=resources or Resources(cpu=1, memory=1024 * MiB),
            secret=uuid.uuid4().hex,
            env={"PROBE": json.dumps(config or {})}
            | {f"LABGATE_PARAM_{k.upper()}": v for k, v in (params or {}).items()},
            mounts=mounts,
            snapshot=snapshot,
            params=params or {},
            on_socket=on_socket,
        )
        result = await (using or backend).start(spec)
        started.append(result.state)
        return result, spec

    yield start
    for state in started:
        await backend.stop(state, 0)
        await backend.poll(state)


async def probe_result(started: Started, spec: LaunchSpec, timeout: float = 20) -> dict[str, Any]:
    """Wait for the probe's report in its workspace."""
    report = Path(started.state["workspace"]) / "probe.json"
    deadline = time.monotonic() + timeout
    while not report.exists():
        log = Path(started.state["log"]).read_text()
        assert time.monotonic() < deadline, f"no probe report; log:\n{log}"
        await asyncio.sleep(0.05)
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def refused(result: dict[str, Any], name: str, *codes: str) -> bool:
    """Whether attempt ``name`` failed with one of the errno names ``codes``."""
    import errno

    entry = result[name]
    return not entry["ok"] and errno.errorcode.get(entry["errno"]) in codes


def caps(status: dict[str, list[str]], name: str) -> int:
    return int(status[name][0], 16)


# --- who the tool runs as ------------------------------------------------------


async def test_instance_runs_unprivileged_as_its_owners_uid(
    launch: Launch, settings: Settings
) -> None:
    started, spec = await launch("identity")
    result = await probe_result(started, spec)
    status = result["status"]
    uid = BASE + ALICE
    assert status["Uid"] == [str(uid)] * 4
    assert status["Gid"] == [str(uid)] * 4
    assert status["Groups"] == []
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert caps(status, name) == 0, name
    assert status["NoNewPrivs"] == ["1"]
    assert started.state["uid"] == uid and started.state["gid"] == uid

    # bwrap's init inside the sandbox stays uid 0 but holds no capability, and the
    # tool cannot even signal it.
    assert refused(result, "signal_init", "EPERM")
    (init,) = (
        Path(f"/proc/{started.state['pid']}/task/{started.state['pid']}/children")
        .read_text()
        .split()
    )
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{init}/status").read_text().splitlines()
    )
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0

    # The workspace is the user's, by uid, mode 0700; it was created for them.
    workspace = spec.workspace.stat()
    assert (workspace.st_uid, workspace.st_gid) == (uid, uid)
    assert stat.S_IMODE(workspace.st_mode) == 0o700


# --- file handles (open_by_handle_at needs CAP_DAC_READ_SEARCH) -------------------


async def test_file_handles_do_not_open_host_files(launch: Launch, settings: Settings) -> None:
    data = settings.data_dir
    config = {
        "data_dir": file_handle(data),
        "root": file_handle(Path("/")),
        "secret_key": file_handle(data / "secret_key"),
        "bob": file_handle(settings.workspaces_dir / "bob"),
    }
    started, spec = await launch("handles", config=config)
    result = await probe_result(started, spec)
    assert result["own_handle"]["ok"]  # the syscalls exist; only opening is refused
    for name in ("data_dir", "host_root", "secret_key", "bob"):
        assert refused(result, name, "EPERM"), (name, result[name])


# --- /proc: no host processes, nothing of init's ---------------------------------


async def test_proc_shows_no_other_process(launch: Launch, settings: Settings) -> None:
    bob, _ = await launch("identity", owner="bob", owner_id=BOB)
    await probe_result(bob, _)
    started, spec = await launch("proc")
    result = await probe_result(started, spec)
    markers = result["markers"]
    # Only the sandbox's init and the tool; no host process, no other instance.
    assert len(markers) <= 2, markers
    assert bob.state["instance_id"] not in markers.values()
    assert all(m in (spec.instance_id, "errno 13") for m in markers.values()), markers
    for name in ("init_root", "init_cwd", "init_environ", "init_mem"):
        assert refused(result, name, "EACCES", "EPERM"), (name, result[name])


# --- ptrace -----------------------------------------------------------------------


async def test_ptrace_reaches_nothing(launch: Launch, settings: Settings) -> None:
    bob, bob_spec = await launch("identity", owner="bob", owner_id=BOB)
    await probe_result(bob, bob_spec)
    bob_tool = max(int(p) for p in os.listdir("/proc") if p.isdigit() and _marker(p, bob))
    started, spec = await launch("ptrace", config={"bob_pid": bob_tool})
    result = await probe_result(started, spec)
    assert refused(result, "attach_init", "EPERM")
    # Bob's tool has no pid in Alice's namespace (or the number is someone else's there).
    assert refused(result, "attach_bob", "ESRCH", "EPERM")


def _marker(pid: str, started: Started) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"LABGATE_INSTANCE_ID={started.state['instance_id']}".encode() in environ.split(b"\0")


# --- unix sockets of the portal and the container engine -----------------------


async def test_unix_sockets_are_out_of_reach(launch: Launch, settings: Settings) -> None:
    portal = settings.data_dir / "portal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(portal))
        server.listen(8)
        config = {"data_dir": file_handle(settings.data_dir), "portal_socket": str(portal)}
        started, spec = await launch("sockets", config=config)
        result = await probe_result(started, spec)
    assert refused(result, "engine", "ENOENT")  # a private /run
    assert refused(result, "portal_path", "ENOENT")  # the data dir is not there
    assert refused(result, "portal_handle", "EPERM")  # nor reachable by file handle


async def tool_answers_on_its_socket(
    started: Started, spec: LaunchSpec, timeout: float = 30
) -> None:
    """Wait until the tool answers its health path on its socket, the way the agent asks."""
    path = started.endpoint.removeprefix("unix:")
    prefix = spec.base_url.rstrip("/") if spec.tool.supports_prefix else ""
    health = f"http://tool{prefix}{spec.tool.health_path}"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError), connectable(path) as where:
            transport = httpx.AsyncHTTPTransport(uds=where)
            async with httpx.AsyncClient(transport=transport, timeout=5) as client:
                token = {"Authorization": f"token {spec.secret}"}
                if (await client.get(health, headers=token)).status_code == 200:
                    return
        log = Path(started.state["log"]).read_text()
        assert time.monotonic() < deadline, f"no answer on {path}; log:\n{log}"
        await asyncio.sleep(0.1)


async def test_an_instance_on_a_socket_listens_on_no_port_and_only_its_uid_enters(
    launch: Launch, settings: Settings
) -> None:
    """A tunneled site's tool on its Unix socket: no port of the host, no other account in."""
    started, spec = await launch(tool=app_tool("demo"), on_socket=True)
    directory = Path(started.state["socket_dir"])
    assert started.endpoint == f"unix:{directory / SOCKET_NAME}"
    assert directory.parent == settings.data_dir / "sockets"
    info = directory.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (BASE + ALICE, BASE + ALICE, 0o700)
    await tool_answers_on_its_socket(started, spec)
    pids = instance_processes(spec.instance_id, int(started.state["pid"]), {})
    assert pids and host_listening_ports(pids) == set()

    # Another local account, even one that could pass the data dir, cannot connect (by a
    # path relative to sockets/: pytest's may be too long for a socket address).
    for passable in (settings.data_dir, directory.parent):
        passable.chmod(0o711)
    connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    other = subprocess.run(
        ["python3", "-I", "-S", "-c", connect, f"{directory.name}/{SOCKET_NAME}"],
        user=BASE + BOB, cwd=directory.parent, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr
    # Bob's own instance does not see the path at all (the data dir is not in his sandbox).
    bobs, bob_spec = await launch(
        "dac", owner="bob", owner_id=BOB,
        config={"root_only_file": str(directory / SOCKET_NAME), "root_only_dir": str(directory)},
    )  # fmt: skip
    seen = await probe_result(bobs, bob_spec)
    assert refused(seen, "root_only_file", "ENOENT") and refused(seen, "root_only_dir", "ENOENT")

    await ProcessBackend(settings).stop(started.state, 5)
    assert not directory.exists()


@pytest.mark.slow
@pytest.mark.parametrize("tool_name", ["jupyterlab", "vscode"])
async def test_the_builtin_tools_listen_on_their_sockets_where_a_site_asks(
    launch: Launch, tool_name: str
) -> None:
    """JupyterLab (``--sock``) and code-server (``--socket``, without the gate) at a
    tunneled site: they answer on the socket and listen on no port of the host."""
    tool = app_tool(tool_name)
    started, spec = await launch(tool=tool, on_socket=True)
    assert started.endpoint.startswith("unix:")
    await tool_answers_on_its_socket(started, spec, timeout=120)
    pids = instance_processes(spec.instance_id, int(started.state["pid"]), {})
    assert pids and host_listening_ports(pids) == set()


async def test_a_link_put_in_place_of_the_socket_is_not_followed(
    launch: Launch, settings: Settings
) -> None:
    """A shell in the instance swaps its socket for a link to a root-only socket of the host:
    the agent (root) connects to nothing through it."""
    started, spec = await launch(tool=app_tool("demo"), on_socket=True)
    await tool_answers_on_its_socket(started, spec)
    engine = settings.data_dir / "engine.sock"  # stands for the container engine's socket
    with socket.socket(socket.AF_UNIX) as decoy:
        decoy.bind(str(engine))
        decoy.listen(8)
        decoy.setblocking(False)
        pids = instance_processes(spec.instance_id, int(started.state["pid"]), {})
        ours = os.readlink("/proc/self/ns/mnt")
        inner = [pid for pid in pids if os.readlink(f"/proc/{pid}/ns/mnt") != ours]
        swap = (
            "import os\n"
            f"os.unlink({SANDBOX_DIR + '/' + SOCKET_NAME!r})\n"
            f"os.symlink({str(engine)!r}, {SANDBOX_DIR + '/' + SOCKET_NAME!r})\n"
        )
        await _run_in(inner[0], BASE + ALICE, swap)
        planted = Path(started.state["socket_dir"]) / SOCKET_NAME
        assert planted.is_symlink()
        assert not await listening(probe_address(started.endpoint))
        with pytest.raises(OSError), connectable(str(planted)):
            pass
        with pytest.raises(BlockingIOError):
            decoy.accept()  # nothing reached the host's socket


# --- plain file permissions ------------------------------------------------------


async def test_visible_host_files_keep_their_permissions(
    launch: Launch, settings: Settings, tmp_path: Path
) -> None:
    # An admin binds a tool directory holding a root-only file; a dataset mount
    # shows Bob's workspace by mistake. File permissions still hold.
    tool_dir = tmp_path / "opt-tool"
    (tool_dir / "private").mkdir(parents=True)
    (tool_dir / "private").chmod(0o700)
    (tool_dir / "license.key").write_text("root only")
    (tool_dir / "license.key").chmod(0o600)
    backend = ProcessBackend(settings, {"extra_ro_binds": [str(tool_dir)]})
    bob_ws = settings.workspaces_dir / "bob"
    await launch("identity", owner="bob", owner_id=BOB)  # Bob's workspace becomes Bob's
    config = {
        "root_only_file": str(tool_dir / "license.key"),
        "root_only_dir": str(tool_dir / "private"),
    }
    mounts = (Mount(bob_ws, "/data/bob"),)
    started, spec = await launch("dac", config=config, mounts=mounts, using=backend)
    result = await probe_result(started, spec)
    for name in ("root_only_file", "root_only_dir", "bob_file"):
        assert refused(result, name, "EACCES"), (name, result[name])
    assert result["own_write"]["ok"]
    mine = (spec.workspace / "mine.txt").stat()
    assert (mine.st_uid, mine.st_gid) == (BASE + ALICE, BASE + ALICE)
    assert (bob_ws / "secret.txt").stat().st_uid == BASE + BOB


async def test_root_owned_workspace_is_handed_over_once(launch: Launch, settings: Settings) -> None:
    legacy = settings.workspaces_dir / "carol"
    (legacy / "notes" / "deep").mkdir(parents=True)
    (legacy / "notes" / "deep" / "a.txt").write_text("old")
    os.symlink("/etc/passwd", legacy / "link")
    started, spec = await launch("identity", owner="carol", owner_id=14)
    await probe_result(started, spec)
    uid = BASE + 14
    for path in (legacy, legacy / "notes", legacy / "notes" / "deep" / "a.txt"):
        assert path.lstat().st_uid == uid, path
    assert (legacy / "link").lstat().st_uid == uid
    assert Path("/etc/passwd").stat().st_uid == 0  # the link was not followed


async def test_restored_snapshot_belongs_to_the_user(launch: Launch, settings: Settings) -> None:
    source = settings.data_dir / "source"
    (source / "results").mkdir(parents=True)
    (source / "results" / "table.csv").write_text("a,b\n")
    saved = save_workspace(source, settings.snapshots_dir, "s1")
    ref = SnapshotRef("s1", saved.kind, saved.reference, saved.digest)
    restored = settings.workspaces_dir / "_restored" / "r1"
    sleeper = Tool(name="sleep", title="Sleep", process=ProcessSpec(command=["sleep", "600"]))
    await launch(tool=sleeper, workspace=restored, snapshot=ref)
    for path in (restored, restored / "results", restored / "results" / "table.csv"):
        assert path.stat().st_uid == BASE + ALICE, path


# --- CPU and memory limits the tool cannot lift ------------------------------------


def _cgroup_file(paths: list[str], controller: str, name: str) -> str:
    for path in paths:
        if Path(path, name).exists() and (controller in path or len(paths) == 1):
            return Path(path, name).read_text().strip()
    raise AssertionError(f"no {name} in {paths}")


async def test_cpu_and_memory_limits_hold(launch: Launch, settings: Settings) -> None:
    all_cpus = sorted(os.sched_getaffinity(0))
    started, spec = await launch(
        "limits", config={"all_cpus": all_cpus}, resources=Resources(cpu=1, memory=512 * MiB)
    )
    result = await probe_result(started, spec)
    cgroup = started.state["limits"]["cgroup"]
    assert cgroup is not None, "no cgroup was made"
    assert cgroup["cpu_quota_us"] == cgroup["cpu_period_us"]
    paths = cgroup["paths"]
    if cgroup["version"] == 1:
        quota = _cgroup_file(paths, "cpu", "cpu.cfs_quota_us")
        assert int(quota) == int(_cgroup_file(paths, "cpu", "cpu.cfs_period_us"))
        assert int(_cgroup_file(paths, "memory", "memory.limit_in_bytes")) == 512 * MiB
    else:
        assert _cgroup_file(paths, "cpu", "cpu.max").split()[0] == str(cgroup["cpu_quota_us"])
        assert int(_cgroup_file(paths, "memory", "memory.max")) == 512 * MiB
    assert int(_cgroup_file(paths, "pids", "pids.max")) == cgroup["pids"]
    tool_pids = {p for p in os.listdir("/proc") if p.isdigit() and _marker(p, started)}
    for path in paths:
        assert tool_pids <= set(Path(path, "cgroup.procs").read_text().split())
    for path in paths:  # files of root's: the tool's uid cannot change them
        assert Path(path, "cgroup.procs").stat().st_uid == 0

    affinity = result["affinity"]
    if len(all_cpus) > 1:
        assert len(affinity["after"]) == 1  # asking for every core changed nothing
        assert set(affinity["after"]) <= set(cgroup["cpus"] or all_cpus)

    await ProcessBackend(settings).stop(started.state, 0)
    assert not any(Path(path).exists() for path in paths)  # removed with the instance


# --- warm-pool claims: the pool uid works on the user's files, which stay the user's --


async def test_claim_idmaps_the_users_workspace(launch: Launch, settings: Settings) -> None:
    backend = ProcessBackend(settings)
    alice_ws = settings.workspaces_dir / "alice"
    alice_ws.mkdir(parents=True)
    (alice_ws / "old.txt").write_text("alice's")
    pool_ws = settings.workspaces_dir / "_pool" / "p1"
    started, spec = await launch(
        "identity", owner="_pool", owner_id=POOL, workspace=pool_ws, using=backend
    )
    await probe_result(started, spec)
    claimed = await backend.claim(started.state, Claim(spec.instance_id, "alice", alice_ws, ALICE))
    assert claimed.state["workspace"] == str(alice_ws.resolve())

    # The pool's tool writes into HOME (now Alice's workspace) with a process of its uid.
    home = str(pool_ws.resolve())
    script = (
        f"import os; os.chdir({home!r}); open('new.txt', 'w').write('x');"
        " print(os.stat('new.txt').st_uid, os.stat('old.txt').st_uid, open('old.txt').read())"
    )
    (init,) = (
        Path(f"/proc/{started.state['pid']}/task/{started.state['pid']}/children")
        .read_text()
        .split()
    )
    tool = Path(f"/proc/{init}/task/{init}/children").read_text().split()[0]
    out = await _run_in(int(tool), BASE + POOL, script)
    seen_new, seen_old, content = out.split()
    assert (int(seen_new), int(seen_old), content) == (BASE + POOL, BASE + POOL, "alice's")
    # On disk the new file is Alice's, not the pool's.
    assert (alice_ws / "new.txt").stat().st_uid == BASE + ALICE
    assert (alice_ws / "old.txt").stat().st_uid == BASE + ALICE


async def _run_in(pid: int, uid: int, script: str) -> str:
    """Run ``script`` as ``uid`` in the mount and PID namespaces of ``pid`` (nsenter)."""
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--target={pid}", "--mount", "--pid", f"--setuid={uid}", f"--setgid={uid}",
        "python3", "-I", "-S", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


def test_launcher_drops_everything_without_setpriv() -> None:
    """The fallback when the system has no setpriv: the launcher itself, run as root."""
    # Not under tmp_path: pytest's base directory is root's, 0700, and the uid must pass.
    top = Path(tempfile.mkdtemp(prefix="labgate-drop-"))
    try:
        top.chmod(0o755)
        workspace = top / "ws"
        workspace.mkdir(mode=0o700)
        uid = BASE + ALICE
        os.chown(workspace, uid, uid)
        launcher = [sys.executable, "-I", "-S", str(limits_module.__file__)]
        argv = [*launcher, "--drop", f"{uid}:{uid}", "--chdir", str(workspace), "--"]
        argv += ["sh", "-c", "pwd; cat /proc/self/status"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(top)
    cwd, *lines = done.stdout.splitlines()
    fields = {k: v.split() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    assert cwd == str(workspace)
    assert fields["Uid"] == [str(uid)] * 4 and fields["Groups"] == []
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name][0], 16) == 0, name
    assert fields["NoNewPrivs"] == ["1"]


# --- apps that cannot check the instance token ------------------------------------

APPS = {
    "streamlit": ("app.py", "import streamlit as st\nst.write('hello')\n"),
    "shiny": (
        "app.R",
        "library(shiny)\nshinyApp(fluidPage('hello'), function(input, output) {})\n",
    ),
}


def host_listening_ports(pids: Collection[int]) -> set[int]:
    """Ports that processes ``pids`` listen on in the host's network namespace (ours)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def app_tool(tool_name: str) -> Tool:
    """The built-in tool; skipped (failed in CI) where this machine cannot run it."""
    tool = load_catalog().get(tool_name)
    assert tool is not None
    if (reason := ProcessBackend.unavailable_reason(tool)) is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{tool_name} cannot run: {reason}")
        pytest.skip(f"{tool_name} cannot run here: {reason}")
    return tool


async def only_the_gate_answers(state: JSON, secret: str, base_url: str, tool: Tool) -> int:
    """Check the instance is reachable only through its gate; the app's port inside.

    The gate answers with the token and 403 without; the instance listens on no
    other port of the host; the app's port, named in the gate's log line, is
    refused on the host's loopback and answers inside the instance's own
    network namespace (entered as root).
    """
    port = int(state["port"])
    path = base_url.rstrip("/") + tool.health_path if tool.supports_prefix else tool.health_path
    health = f"http://127.0.0.1:{port}{path}"
    deadline = time.monotonic() + 90
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = await client.get(health, headers={"Authorization": f"token {secret}"})
                if answer.status_code == 200:
                    break
            log = Path(state["log"]).read_text()
            assert time.monotonic() < deadline, f"{tool.name} did not come up; log:\n{log}"
            await asyncio.sleep(0.2)
    # A connection of its own: the gate checks each connection's first request.
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(health)).status_code == 403

    log = Path(state["log"]).read_text()
    app_port = int(re.search(r"gate: \S+ -> 127\.0\.0\.1:(\d+)", log).group(1))  # type: ignore[union-attr]
    pids = instance_processes(str(state["instance_id"]), int(state["pid"]), {})
    assert host_listening_ports(pids) == {port}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", app_port), timeout=5).close()
    ours = os.readlink("/proc/self/ns/net")
    inner = [pid for pid in pids if os.readlink(f"/proc/{pid}/ns/net") != ours]
    assert inner
    get = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).status)"
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{inner[0]}/ns/net", sys.executable, "-c", get,
         f"http://127.0.0.1:{app_port}{path}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert inside.stdout.strip() == "200", inside.stderr
    return app_port


@pytest.mark.parametrize("tool_name", list(APPS))
async def test_an_app_that_cannot_check_the_token_is_reached_only_through_the_gate(
    launch: Launch, settings: Settings, tool_name: str
) -> None:
    """Streamlit and Shiny listen in a network namespace of their own, behind the token gate.

    From the host and from another user's instance the only port of the
    instance is the gate's, which answers 403 without the token; the app's own
    port exists only inside the instance's namespace.
    """
    tool = app_tool(tool_name)
    name, source = APPS[tool_name]
    alice = settings.workspaces_dir / "alice"
    alice.mkdir(parents=True, exist_ok=True)
    (alice / name).write_text(source)
    started, spec = await launch(tool=tool, params={"app": name})
    assert started.state["private_network"] is True
    app_port = await only_the_gate_answers(started.state, spec.secret, spec.base_url, tool)

    # Bob, in an instance of his own, finds only the gate.
    port = int(started.state["port"])
    bobs, bob_spec = await launch(
        "network", owner="bob", owner_id=BOB, config={"app_port": app_port, "gate_port": port}
    )
    result = await probe_result(bobs, bob_spec)
    assert refused(result, "app", "ECONNREFUSED"), result
    assert result["gate"] == {"ok": True, "value": "HTTP/1.1 403 Forbidden"}


#: Tries to open X displays 0-5 and those named on its command line on the abstract sockets
#: (shared by every network namespace's users: the host's and the instances'), then on the
#: host's /tmp sockets, with no credential. Prints {"@X0": status or errno, "/X0": ...}:
#: status 1 is a display that took it, 0 one that refused it.
X_PROBE = r"""
import json, socket, sys
SETUP = b"l\0\x0b\0\0\0\0\0\0\0\0\0"  # little-endian, X11.0, no authorization
out = {}
for n in sorted(set(range(6)) | {int(arg) for arg in sys.argv[1:]}):
    for name, address in (("@X%d" % n, "\0/tmp/.X11-unix/X%d" % n),
                          ("/X%d" % n, "/tmp/.X11-unix/X%d" % n)):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(address)
                s.sendall(SETUP)
                reply = s.recv(8)
            out[name] = reply[0] if reply else "closed"
        except OSError as exc:
            out[name] = "errno %d" % exc.errno
print(json.dumps(out))
"""


async def test_nobody_else_opens_a_desktops_x_display(launch: Launch, settings: Settings) -> None:
    """The desktop's X server takes no client from another instance nor from the host.

    Another user's instance shares the host's network namespace, and with it
    the abstract sockets: the X server holds its display's abstract name (else
    anyone could, see test_desktop_display.py), and there, as on its socket in
    the instance's own /tmp, it takes only the desktop's cookie. A display that
    took a client would let it type commands into the desktop's terminal.
    """
    desktop = app_tool("desktop")
    bob, _ = await launch(tool=desktop, owner="bob", owner_id=BOB, params={"geometry": "800x600"})
    log = Path(bob.state["log"])
    deadline = time.monotonic() + 60
    while (found := re.search(r"desktop: :(\d+)", log.read_text())) is None:
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.3)
    display = found.group(1)
    xvnc = [p for p in instance_processes(bob.state["instance_id"], int(bob.state["pid"]), {})
            if Path(f"/proc/{p}/comm").read_text().strip() == "Xtigervnc"]  # fmt: skip
    assert xvnc, "no X server among the instance's processes"

    # Alice, from a shell in her own instance (her uid, the host's network namespace).
    alice = settings.workspaces_dir / "alice"
    alice.mkdir(parents=True, exist_ok=True)
    (alice / "x_probe.py").write_text(X_PROBE)
    command = ["{python}", "{workspace}/x_probe.py", display]
    probe = Tool(name="x-probe", title="X probe", process=ProcessSpec(command=command))
    alices, _ = await launch(tool=probe)
    alices_log = Path(alices.state["log"])
    deadline = time.monotonic() + 30
    while "{" not in alices_log.read_text():
        assert time.monotonic() < deadline, alices_log.read_text()
        await asyncio.sleep(0.2)
    from_alice = json.loads(alices_log.read_text().splitlines()[-1])
    # A local account on the host (nobody).
    host = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
         sys.executable, "-c", X_PROBE, display],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    from_host = json.loads(host.stdout)
    # Even root on the host, through the instance's own /tmp, gets no display without the cookie.
    own = f"/proc/{xvnc[0]}/root/tmp/.X11-unix/X{display}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(own)
        s.sendall(b"l\0\x0b\0\0\0\0\0\0\0\0\0")
        own_reply = s.recv(8)

    assert 1 not in from_alice.values(), from_alice
    assert 1 not in from_host.values(), from_host
    # Both reached the desktop's own server on its abstract name, which refused them.
    abstract = f"@X{display}"
    assert (from_alice[abstract], from_host[abstract]) == (0, 0), (from_alice, from_host)
    assert own_reply[:1] == b"\0", own_reply  # Failed: authorization required


# Run as an ordinary account: the backend starts the tool and prints the instance's state.
START_AS_ACCOUNT = """
import asyncio, json, sys, uuid
from pathlib import Path
from labgate.backends.base import LaunchSpec, Resources
from labgate.backends.process import ProcessBackend
from labgate.backends.registry import load_catalog
from labgate.backends.sockets import SANDBOX_DIR, SOCKET_NAME, connectable
from labgate.config import Settings

settings = Settings(data_dir=Path(sys.argv[1]), sandbox="bwrap")
workspace = settings.workspaces_dir / "alice"
workspace.mkdir(parents=True)
(workspace / "app.py").write_text(sys.argv[2])
name = "t" + uuid.uuid4().hex[:12]
spec = LaunchSpec(
    instance_id=name, owner="alice", tool=load_catalog().get("streamlit"), base_url=f"/i/{name}/",
    workspace=workspace, resources=Resources(cpu=1, memory=2**30), secret=uuid.uuid4().hex,
    params={"app": "app.py"},
)
started = asyncio.run(ProcessBackend(settings).start(spec))
print(json.dumps({"state": started.state, "secret": spec.secret, "base_url": spec.base_url}))
"""


async def test_without_root_the_app_has_a_network_namespace_of_its_own_too() -> None:
    """labgate run by an ordinary account: bwrap makes the namespace in a user namespace."""
    require_bwrap()
    tool = app_tool("streamlit")
    account = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-i",
               "PATH=/usr/bin:/bin", "HOME=/nonexistent"]  # fmt: skip
    imports = subprocess.run(
        [*account, sys.executable, "-c", "import labgate, streamlit"], capture_output=True
    )
    if imports.returncode != 0:
        reason = f"uid 65534 cannot run this checkout's Python: {imports.stderr[-300:]!r}"
        if os.environ.get("CI") == "true":  # .ci/run opens the way (setfacl): nothing skips
            pytest.fail(reason)
        pytest.skip(f"{reason}; let it through each directory (setfacl -m u:65534:x)")
    home = Path(tempfile.mkdtemp(prefix="labgate-account-"))
    os.chown(home, 65534, 65534)
    state: JSON | None = None
    try:
        source = APPS["streamlit"][1]
        started = subprocess.run(
            [*account, sys.executable, "-c", START_AS_ACCOUNT, str(home / "data"), source],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        launched = json.loads(started.stdout)
        state = launched["state"]
        assert state["private_network"] is True and state["uid"] is None
        await only_the_gate_answers(state, launched["secret"], launched["base_url"], tool)
    finally:
        if state is not None:
            await ProcessBackend(Settings(data_dir=home / "data")).stop(state, 5)
        shutil.rmtree(home, ignore_errors=True)
