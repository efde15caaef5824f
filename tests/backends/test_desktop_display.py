"""Nobody else's X server gets a desktop's windows: the abstract X socket cannot be squatted.

X clients on Linux (libxcb, hence Xlib) given ``DISPLAY=:<n>`` try the
*abstract* socket ``@/tmp/.X11-unix/X<n>`` first and the file
``/tmp/.X11-unix/X<n>`` only when nothing listens there. Abstract names
belong to the network namespace, which every sandboxed instance shares with
the host, while each instance has a ``/tmp`` of its own. So a desktop whose X
server left its abstract name free (``-nolisten local``) could be robbed of
its own windows: Alice, from a shell in any instance of hers, starts an X
server of her own on ``:0`` (``-ac``: no cookie asked), and every desktop
started afterwards (Bob's, or a warm-pool desktop nobody has claimed yet)
opens its window manager and terminal on Alice's screen, handing her its
cookie too; Alice types commands into Bob's terminal (XTEST) and they run
as Bob, on Bob's workspace.

The desktop's X server therefore owns both sockets of its display; someone
holding a display's abstract name only pushes the desktop on to another
number (``-displayfd``), and the desktop refuses to start when what answers
on its display is not its own X server (``foreign_display``).

Each test here runs in a network namespace of its own (the ``own_network``
fixture): Alice's squatting X server takes ``@/tmp/.X11-unix/X0``, which in
the host's namespace would catch the desktops of other tests running
meanwhile (and of a checkout without the fix).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labgate.backends.base import JSON, LaunchSpec, Resources, Started
from labgate.backends.claim import Claim
from labgate.backends.process import ProcessBackend
from labgate.backends.procfs import instance_processes
from labgate.backends.registry import load_catalog
from labgate.config import Settings
from labgate.tools.catalog import ProcessSpec, Tool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these hold for labgate run as root")

MiB = 1024**2
BASE = 1_000_000_000
ALICE, BOB = 31, 32
try:  # A warm-pool instance runs as a uid of its own, from the pool's range.
    from labgate.backends.identity import pool_identity_number

    POOL = pool_identity_number(33)
except ImportError:  # Before pool instances had uids of their own: the _pool account's.
    POOL = 33
CLONE_NEWNET = 0x40000000

#: Alice's "shell": once the test says ``go``, her own X server on display 0 (abstract
#: socket included, no cookie asked), then whatever cmd-*.py appears in her workspace.
ALICE_SHELL = r"""
import contextlib, io, os, runpy, subprocess, time, traceback
home = os.environ["HOME"]
while not os.path.exists(os.path.join(home, "go")):
    time.sleep(0.05)
x = subprocess.Popen(["Xtigervnc", ":0", "-ac", "-geometry", "1024x768", "-rfbport", "-1",
                      "-SecurityTypes", "None", "-nolisten", "tcp"])
while not os.path.exists("/tmp/.X11-unix/X0"):
    if x.poll() is not None:
        open(os.path.join(home, "ready"), "w").write("exited %d" % x.returncode)
        raise SystemExit(1)
    time.sleep(0.05)
open(os.path.join(home, "ready"), "w").write("ok")
done = set()
while True:
    for name in sorted(os.listdir(home)):
        if name.startswith("cmd-") and name.endswith(".py") and name not in done:
            done.add(name)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    runpy.run_path(os.path.join(home, name), run_name="__main__")
                except BaseException:
                    traceback.print_exc(file=out)
            open(os.path.join(home, "tmp-" + name), "w").write(out.getvalue())
            os.rename(os.path.join(home, "tmp-" + name), os.path.join(home, "out-" + name))
    time.sleep(0.05)
"""

#: Alice lists the windows on her display :0.
WINDOWS = (
    "import subprocess; r = subprocess.run(['xwininfo', '-root', '-tree', '-display', ':0'],"
    " capture_output=True, text=True); print(r.stdout, r.stderr)"
)

#: Types ``TEXT`` + Return into whatever window has the focus on Alice's display :0, via
#: XTEST, speaking the X protocol directly (no cookie: Alice's server runs with -ac).
TYPE = r"""
import socket, struct
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/tmp/.X11-unix/X0")
s.sendall(b"l\0" + struct.pack("<HHHH2x", 11, 0, 0, 0))
def recv(n):
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return data
head = recv(8)
assert head[0] == 1, head
body = recv(struct.unpack("<H", head[6:8])[0] * 4)
min_kc, max_kc = body[26], body[27]
seq = 0
def request(data, reply=True):
    global seq
    s.sendall(data); seq += 1
    if not reply:
        return None
    while True:
        r = recv(32)
        if r[0] == 1:
            return r + recv(struct.unpack("<I", r[4:8])[0] * 4)
        assert r[0] != 0, ("X error", r)
name = b"XTEST"
r = request(struct.pack("<BxHHxx", 98, 2 + (len(name) + 3) // 4, len(name)) + name.ljust(8, b"\0"))
assert r[8] == 1, "no XTEST"
xtest = r[9]
count = max_kc - min_kc + 1
r = request(struct.pack("<BxHBBxx", 101, 2, min_kc, count))
per = r[1]
syms = struct.unpack("<%dI" % (count * per), r[32:32 + count * per * 4])
where = {}
for i in range(count):
    for level in (1, 0):
        sym = syms[i * per + level]
        if sym:
            where[sym] = (min_kc + i, level)
shift = where[0xFFE1][0]
def fake(kind, keycode):
    request(struct.pack("<BBHBBxxIIxxxxxxxxhhxxxxxxxB", xtest, 2, 9, kind, keycode, 0, 0, 0, 0, 0),
            reply=False)
def key(sym):
    keycode, level = where[sym]
    if level:
        fake(2, shift)
    fake(2, keycode); fake(3, keycode)
    if level:
        fake(3, shift)
for ch in TEXT:
    key(ord(ch))
key(0xFF0D)
request(struct.pack("<BxH", 43, 1))  # GetInputFocus: a round trip, so all was sent
print("typed")
"""


def network_namespace() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture
async def own_network() -> AsyncIterator[str]:
    """This test in a network namespace of its own (with its loopback up).

    Namespaces belong to threads: the test's thread (the event loop's) moves
    into a new one, and the loop gets a fresh default executor, whose threads
    (where the backend starts instances) are made from that thread, so in it.
    Back to the host's namespace at the end.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        executor = ThreadPoolExecutor(thread_name_prefix="own-network")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
            asyncio.get_running_loop().set_default_executor(executor)
            yield network_namespace()
        finally:
            executor.shutdown(wait=True)
            if libc.setns(host, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host's network")
    finally:
        os.close(host)


@pytest.fixture
def settings(tmp_path: Path, own_network: str) -> Settings:
    if shutil.which("bwrap") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("bubblewrap is required in CI: apt-get install bubblewrap")
        pytest.skip("bubblewrap not installed")
    settings = Settings(data_dir=tmp_path / "data", sandbox="bwrap", instance_uid_base=BASE)
    settings.data_dir.mkdir(mode=0o700)
    (settings.data_dir / "secret_key").write_text("k" * 64)
    return settings


@pytest.fixture
async def backend(settings: Settings) -> AsyncIterator[tuple[ProcessBackend, list[JSON]]]:
    backend = ProcessBackend(settings)
    states: list[JSON] = []
    yield backend, states
    for state in reversed(states):
        await backend.stop(state, 2)
        await backend.poll(state)


def desktop_tool() -> Tool:
    """The built-in desktop; skipped (failed in CI) where this machine cannot run it."""
    tool = load_catalog().get("desktop")
    assert tool is not None
    if (reason := ProcessBackend.unavailable_reason(tool)) is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"desktop cannot run: {reason}")
        pytest.skip(f"desktop cannot run here: {reason}")
    if shutil.which("xwininfo") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("xwininfo is required in CI: apt-get install x11-utils")
        pytest.skip("xwininfo not installed: apt-get install x11-utils")
    return tool


async def start(
    backend: ProcessBackend,
    states: list[JSON],
    settings: Settings,
    tool: Tool,
    owner: str,
    owner_id: int,
    params: dict[str, str] | None = None,
    workspace: Path | None = None,
) -> Started:
    instance_id = f"x{uuid.uuid4().hex[:12]}"
    spec = LaunchSpec(
        instance_id=instance_id,
        owner=owner,
        owner_id=owner_id,
        tool=tool,
        base_url=f"/i/{instance_id}/",
        workspace=workspace or settings.workspaces_dir / owner,
        resources=Resources(cpu=1, memory=1024 * MiB),
        secret=uuid.uuid4().hex,
        params=params or {},
    )
    started = await backend.start(spec)
    states.append(started.state)
    # Never let a squatting X server loose in the host's namespace.
    assert Path(f"/proc/{started.state['pid']}/ns/net").readlink().name == network_namespace()
    return started


async def wait_for(
    predicate: Callable[[], bool], what: str, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text()}"
        await asyncio.sleep(0.2)


async def run(workspace: Path, log: Path, script: str) -> str:
    """Run ``script`` in Alice's shell; what it printed."""
    name = f"cmd-{uuid.uuid4().hex[:8]}.py"
    (workspace / name).write_text(script)
    out = workspace / f"out-{name}"
    await wait_for(out.exists, f"no output of {name}", log)
    return out.read_text()


async def alice_squats_display_0(
    backend: ProcessBackend, states: list[JSON], settings: Settings
) -> tuple[Path, Path]:
    """Alice's shell with her X server on :0, abstract socket included: (workspace, log)."""
    alice_ws = settings.workspaces_dir / "alice"
    alice_ws.mkdir(parents=True)
    (alice_ws / "shell.py").write_text(ALICE_SHELL)
    shell = Tool(
        name="shell",
        title="Shell",
        process=ProcessSpec(command=["{python}", "{workspace}/shell.py"]),
    )
    alices = await start(backend, states, settings, shell, "alice", ALICE)
    log = Path(alices.state["log"])
    (alice_ws / "go").write_text("")
    await wait_for((alice_ws / "ready").exists, "alice's X server did not start", log)
    assert (alice_ws / "ready").read_text() == "ok", log.read_text()
    return alice_ws, log


async def desktop_display(started: Started) -> tuple[str, int, str]:
    """The desktop's display number, its X server's pid, and that server's cookie file."""
    log = Path(started.state["log"])
    await wait_for(
        lambda: re.search(r"desktop: :(\d+)", log.read_text()) is not None, "no desktop", log
    )
    found = re.search(r"desktop: :(\d+)", log.read_text())
    assert found is not None
    processes = instance_processes(started.state["instance_id"], int(started.state["pid"]), {})
    for pid in processes:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if Path(f"/proc/{pid}/comm").read_text().strip() == "Xtigervnc":
            auth = command[command.index(b"-auth") + 1].decode()
            return found.group(1), pid, auth
    raise AssertionError(f"no X server among the desktop's processes; log:\n{log.read_text()}")


def own_screen(display: str, server: int, auth: str) -> str:
    """The windows on the desktop's own X server, reached through its socket file alone.

    Run in the desktop's mount namespace (its /tmp) and a network namespace
    with no abstract sockets at all, so nobody else's server can answer.
    """
    listing = subprocess.run(
        ["nsenter", f"--target={server}", "--mount", "unshare", "--net",
         "env", f"DISPLAY=:{display}", f"XAUTHORITY={auth}", "xwininfo", "-root", "-tree"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return listing.stdout + listing.stderr


async def where_the_terminal_opens(
    alice_ws: Path, alice_log: Path, display: str, server: int, auth: str
) -> tuple[str, str]:
    """Alice's screen and the desktop's own, once the terminal is on either (or after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        alices = await run(alice_ws, alice_log, WINDOWS)
        own = await asyncio.to_thread(own_screen, display, server, auth)
        if "Terminal" in alices + own or time.monotonic() > deadline:
            return alices, own
        await asyncio.sleep(0.5)


async def alice_types_into_her_screen(
    alice_ws: Path, alice_log: Path, command: str, victim_ws: Path
) -> str | None:
    """Alice types ``command`` into the focused window of her screen: what it left in
    ``victim_ws`` (its ``pwned-by-alice``), if anything."""
    await asyncio.sleep(1)
    await run(alice_ws, alice_log, f"TEXT = {command!r}\n" + TYPE)
    pwned = victim_ws / "pwned-by-alice"
    deadline = time.monotonic() + 15
    while not pwned.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return pwned.read_text() if pwned.exists() else None


async def test_another_instance_squatting_the_abstract_display_cannot_take_over_a_desktops_terminal(
    backend: tuple[ProcessBackend, list[JSON]], settings: Settings
) -> None:
    process, states = backend
    desktop = desktop_tool()
    # Alice: any instance of hers, with her own X server on :0 (abstract socket too).
    alice_ws, alice_log = await alice_squats_display_0(process, states, settings)

    # Bob starts a desktop afterwards.
    bob_ws = settings.workspaces_dir / "bob"
    bob_ws.mkdir(parents=True)
    bobs = await start(process, states, settings, desktop, "bob", BOB, {"geometry": "800x600"})
    display, server, auth = await desktop_display(bobs)
    alices, own = await where_the_terminal_opens(alice_ws, alice_log, display, server, auth)

    if "Terminal" in alices:  # Alice types a command into Bob's terminal: it runs as Bob
        pwned = await alice_types_into_her_screen(alice_ws, alice_log, "id >pwned-by-alice", bob_ws)
        assert pwned is None, f"alice ran a command in bob's desktop terminal: {pwned}"
    assert "Terminal" not in alices, f"bob's terminal is a window on alice's display:\n{alices}"
    assert "Terminal" in own, f"bob's terminal is not on his own display :{display}:\n{own}"
    assert display != "0", "bob's desktop shares the number alice holds"


async def test_a_squatter_does_not_catch_a_pool_desktop_before_it_is_claimed(
    backend: tuple[ProcessBackend, list[JSON]], settings: Settings
) -> None:
    """A warm-pool desktop, started for nobody, is handed over with nobody else's hands on it."""
    process, states = backend
    desktop = desktop_tool()
    alice_ws, alice_log = await alice_squats_display_0(process, states, settings)

    # The pool refills: a desktop started ahead of time, for nobody.
    pool_ws = settings.workspaces_dir / "_pool" / "p-desktop"
    pool_ws.mkdir(parents=True)
    pooled = await start(
        process, states, settings, desktop, "_pool", POOL, {"geometry": "800x600"}, pool_ws
    )
    display, server, auth = await desktop_display(pooled)
    alices, own = await where_the_terminal_opens(alice_ws, alice_log, display, server, auth)

    # Bob launches a desktop and gets the pool's.
    bob_ws = settings.workspaces_dir / "bob"
    bob_ws.mkdir(parents=True)
    (bob_ws / "thesis.txt").write_text("bob's thesis")
    claimed = await process.claim(
        pooled.state, Claim(pooled.state["instance_id"], "bob", bob_ws, BOB)
    )
    pooled.state.update(claimed.state)
    if "Terminal" in alices:
        pwned = await alice_types_into_her_screen(
            alice_ws, alice_log, "ls ~ >~/pwned-by-alice", bob_ws
        )
        assert pwned is None, f"alice ran a command in bob's claimed desktop: {pwned}"
    assert "Terminal" not in alices, f"the pool desktop's terminal is on alice's display:\n{alices}"
    assert "Terminal" in own, f"the pool desktop's terminal is not on its own display:\n{own}"


async def test_a_desktop_refuses_a_display_whose_sockets_are_not_its_x_servers(
    own_network: str,
) -> None:
    """The check the desktop makes before it lets a program of its own open the display."""
    from labgate.tools.desktop import foreign_display

    number = 4242  # no X server's; its socket file in /tmp does not exist
    stand_in = subprocess.Popen(["sleep", "60"])  # "the desktop's X server"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
            # Nothing on the display at all.
            assert "nothing answers on @/tmp/.X11-unix/X4242" in (
                foreign_display(f":{number}", stand_in.pid) or ""
            )
            # Someone else holds its abstract name.
            squatter.bind(f"\0/tmp/.X11-unix/X{number}")
            squatter.listen()
            problem = foreign_display(f":{number}", stand_in.pid) or ""
            assert f"belongs to another process (pid {os.getpid()})" in problem, problem
            # The abstract name is the server's, but the socket file is missing.
            problem = foreign_display(f":{number}", os.getpid()) or ""
            assert "nothing answers on /tmp/.X11-unix/X4242" in problem, problem
    finally:
        stand_in.kill()
        stand_in.wait()
