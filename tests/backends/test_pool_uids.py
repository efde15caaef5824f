"""Warm-pool instances run as uids of their own: claimers never share a uid.

A pool instance is started before anyone owns it, for the ``_pool`` account,
and handed to one user at a claim (the user's workspace is idmapped over its
HOME; the uid it runs as stays). Were that uid derived from its owner, every
pool instance, and so every claimer of every user, would run as the one uid
of ``_pool``, and everything the kernel keys by uid would be shared between
users: the uid's keyrings (a Kerberos ``KEYRING:`` cache), the right to copy
another process's descriptors (``pidfd_getfd``) given a pidfd (which a unix
socket hands out: ``SO_PEERPIDFD``), and per-uid limits (inotify instances).

Each pool instance gets a number from a counter in the database instead, never
given twice, and runs as ``instance_uid_base + POOL_UID_OFFSET + number``
(``labgate.backends.identity``). The first tests here go the whole way (the
portal's pool manager, its counter, the launch spec, the process backend, the
claim) with a "shell" tool that runs the Python files that appear in its HOME,
as a tool's terminal would: each is one of the holes, and each fails on a
labgate that runs pool instances as ``_pool``'s uid. The last ones hold the
backend to it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from helpers import needs_pool_sandbox, pool_instances, wait_for_state
from labgate.backends.base import JSON, LaunchSpec, Resources, Started
from labgate.backends.claim import Claim, ClaimError
from labgate.backends.process import ProcessBackend
from labgate.config import PoolConfig, Settings
from labgate.db.models import Instance
from labgate.db.session import Database
from labgate.errors import InstanceStartError
from labgate.tools.catalog import ProcessSpec, Tool

pytestmark = needs_pool_sandbox

MiB = 1024**2
BASE = 1_000_000_000
#: labgate.backends.identity.POOL_UID_OFFSET (spelt out: these tests must run, and fail,
#: on a labgate without it).
POOL_UID_OFFSET = 100_000_000

#: The "shell" in an instance: answers health checks on its port, and runs every
#: ``cmd-*.py`` that appears in $HOME (the user's workspace once claimed), writing what it
#: printed to ``out-*.txt`` next to it. Hex-encoded into the tool file (no braces to fill).
SHELL = r"""
import contextlib, http.server, io, os, runpy, sys, threading, time, traceback
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
home = os.environ["HOME"]
open(os.path.join(home, "ready"), "w").write(str(os.getuid()))
done = set()
while True:
    try:
        names = sorted(os.listdir(home))
    except OSError:
        names = []
    for name in names:
        if name.startswith("cmd-") and name.endswith(".py") and name not in done:
            done.add(name)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    runpy.run_path(os.path.join(home, name), run_name="__main__")
                except BaseException:
                    traceback.print_exc(file=out)
            tmp = os.path.join(home, "tmp-" + name)
            open(tmp, "w").write(out.getvalue())
            os.rename(tmp, os.path.join(home, "out-" + name[4:-3] + ".txt"))
    time.sleep(0.05)
"""

SHELL_TOOL = f"""
name = "shell"
title = "A shell: runs the Python files that appear in HOME"
health_path = "/health"
start_timeout = 30

[process]
command = ["{{python}}", "-c", "exec(bytes.fromhex('{SHELL.encode().hex()}'))", "{{port}}"]
"""

KEYS = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
USER_KEYRING = ctypes.c_long(-4)
def add(description, data, share=False):
    key = libc.syscall(248, b"user", description, data, len(data), USER_KEYRING)
    if key < 0:
        print("add failed", os.strerror(ctypes.get_errno())); return
    if share:  # possessor, user: everything (so any process of this uid reads it)
        libc.syscall(250, 5, ctypes.c_long(key), ctypes.c_ulong(0x3F3F0000))
    print("added", key)
def read(description):
    key = libc.syscall(250, 10, USER_KEYRING, b"user", description, 0)
    if key < 0:
        print("search failed", os.strerror(ctypes.get_errno())); return
    buf = ctypes.create_string_buffer(4096)
    n = libc.syscall(250, 11, ctypes.c_long(key), buf, 4096)
    print("read", buf.raw[:n].decode() if n >= 0 else os.strerror(ctypes.get_errno()))
def revoke(description):
    key = libc.syscall(250, 10, USER_KEYRING, b"user", description, 0)
    if key >= 0:
        libc.syscall(250, 3, ctypes.c_long(key))
"""


def require_x86_64_keyctl() -> None:
    """KEYS calls add_key/keyctl by their x86-64 numbers."""
    if os.uname().machine != "x86_64":
        pytest.skip("the keyring scripts use x86-64 system call numbers")


def as_uid(uid: int, script: str) -> str:
    """Run ``script`` (with KEYS) as ``uid`` on the host; its output."""
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "/usr/bin/python3", "-I", "-S", "-c", KEYS + script],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return done.stdout + done.stderr


# --- the whole way: the portal's pools on the local process site, as root ------------


@pytest.fixture
def settings(settings: Settings) -> Settings:
    (settings.tools_dir / "shell.toml").write_text(SHELL_TOOL)
    settings.pools = [PoolConfig(tool="shell", size=2)]
    settings.pool_check_interval = 0.2
    settings.instance_uid_base = BASE
    # The counter starts somewhere of this test's own: parallel tests, each with a database
    # of its own, would otherwise run their pool instances as the same few uids.
    db = Database(settings.database_url)
    try:
        db.migrate()
        with contextlib.suppress(DBAPIError), db.session() as session:
            session.execute(
                text("UPDATE counters SET value = :v WHERE name = 'pool_uid'"),
                {"v": random.randrange(10_000_000, 90_000_000)},
            )
    finally:
        db.dispose()
    return settings


@pytest.fixture
async def pools(app: Any) -> AsyncIterator[Any]:
    """The pool manager, closed before the app stops everything (so nothing refills)."""
    yield app.state.pools
    await app.state.pools.close()


class Claimed:
    """A user's instance taken from the pool: its id, workspace and backend state."""

    def __init__(self, app: Any, instance_id: str, workspace: Path) -> None:
        self.app = app
        self.id = instance_id
        self.workspace = workspace

    async def state(self) -> JSON:
        row = await self.app.state.portal.run_db(lambda s: s.get(Instance, self.id))
        return dict(row.backend_state)

    async def run(self, script: str, timeout: float = 30) -> str:
        """Run ``script`` in the instance's own tool process (its "shell"); its output."""
        name = uuid.uuid4().hex[:8]
        (self.workspace / f"cmd-{name}.py").write_text(script)
        return await wait_for_file(self.workspace / f"out-{name}.txt", timeout)

    async def tool_uid(self) -> int:
        """The real uid of the instance's tool process (the sandbox init's child)."""
        pid = (await self.state())["pid"]
        (init,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        tool = Path(f"/proc/{init}/task/{init}/children").read_text().split()[0]
        for line in Path(f"/proc/{tool}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        raise AssertionError("no Uid line")


async def wait_for_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        await asyncio.sleep(0.05)
    return path.read_text()


async def wait_for_pool_of(app: Any, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(await pool_instances(app, "shell")) < count:
        assert time.monotonic() < deadline, "the shell pool never filled"
        await asyncio.sleep(0.1)


async def claim(
    app: Any, client: httpx.AsyncClient, settings: Settings, user: str, headers: dict[str, str]
) -> Claimed:
    """``user`` launches the shell and gets a pool instance."""
    await wait_for_pool_of(app, 1)
    workspace = settings.workspaces_dir / user
    workspace.mkdir(parents=True, exist_ok=True)
    launched = await client.post("/api/v1/instances", json={"tool": "shell"}, headers=headers)
    assert launched.status_code == 202, launched.text
    body = launched.json()
    assert body["state"] == "running", f"{user} got no pool instance: {body}"
    claimed = Claimed(app, body["id"], workspace)
    assert (await claimed.state())["workspace"] == str(workspace.resolve())
    return claimed


async def test_two_users_claimed_pool_instances_run_as_uids_of_their_own(
    app, client, make_user, pools, settings
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    await wait_for_pool_of(app, 2)
    alices = await claim(app, client, settings, "alice", alice)
    bobs = await claim(app, client, settings, "bob", bob)
    alice_uid, bob_uid = await alices.tool_uid(), await bobs.tool_uid()
    assert alice_uid != bob_uid, f"alice's and bob's claimed instances both run as {alice_uid}"
    # Each is a pool uid (not the _pool account's, nor the claimer's), recorded in its state,
    # and its files of the workspace are the user's on disk.
    for claimed, uid in ((alices, alice_uid), (bobs, bob_uid)):
        state = await claimed.state()
        assert state["uid"] == uid and state["own_uid"] is True
        assert BASE + POOL_UID_OFFSET < uid < BASE + 2 * POOL_UID_OFFSET
        number = await app.state.portal.run_db(lambda s, i=claimed.id: s.get(Instance, i).pool_uid)
        assert uid == BASE + POOL_UID_OFFSET + number
    # (By its path: the shell's working directory is still the pool's, hidden by the claim.)
    out = await alices.run(
        "import os; open(os.environ['HOME'] + '/mine.txt', 'w').write('x'); print('ok')"
    )
    assert out.strip() == "ok"
    alice_id = await app.state.portal.run_db(
        lambda s: s.get(Instance, alices.id).owner_id  # the claimer, now
    )
    assert (alices.workspace / "mine.txt").stat().st_uid == BASE + alice_id


async def test_a_claimer_cannot_read_another_claimers_kernel_keyring(
    app, client, make_user, pools, settings
) -> None:
    require_x86_64_keyctl()
    alice, bob = await make_user("alice"), await make_user("bob")
    await wait_for_pool_of(app, 2)
    alices = await claim(app, client, settings, "alice", alice)
    bobs = await claim(app, client, settings, "bob", bob)
    description = f"labgate-test-{uuid.uuid4().hex[:8]}"
    try:
        # Bob's tool keeps a secret in its user keyring (as krb5 KEYRING: caches do).
        out = await bobs.run(KEYS + f"add(b{description!r}, b'bob-kerberos-ticket')")
        assert out.startswith("added"), out
        # Alice, from a shell in her own claimed instance.
        seen = await alices.run(KEYS + f"read(b{description!r})")
        assert "bob-kerberos-ticket" not in seen, f"alice read bob's key: {seen!r}"
        assert seen.startswith("search failed"), seen
    finally:
        as_uid((await bobs.state())["uid"], f"revoke(b{description!r})")


async def test_a_key_planted_by_one_claimer_is_not_inherited_by_the_next(
    app, client, make_user, pools, settings
) -> None:
    require_x86_64_keyctl()
    alice, bob = await make_user("alice"), await make_user("bob")
    alices = await claim(app, client, settings, "alice", alice)
    alice_uid = (await alices.state())["uid"]
    description = f"labgate-test-{uuid.uuid4().hex[:8]}"
    try:
        planted = await alices.run(KEYS + f"add(b{description!r}, b'planted by alice', share=True)")
        assert planted.startswith("added"), planted
        await client.delete(f"/api/v1/instances/{alices.id}", headers=alice)
        await wait_for_state(client, alice, alices.id, {"stopped"})
        # The pool refills; the next instance is claimed by Bob.
        bobs = await claim(app, client, settings, "bob", bob)
        seen = await bobs.run(KEYS + f"read(b{description!r})")
        assert "planted by alice" not in seen, f"bob inherited alice's key: {seen!r}"
        assert (await bobs.state())["uid"] != alice_uid
        # Nobody runs as alice's pool uid again; what it kept was dropped at its stop.
        left = as_uid(alice_uid, f"read(b{description!r})")
        assert left.startswith("search failed"), f"alice's key outlived her instance: {left}"
    finally:
        as_uid(alice_uid, f"revoke(b{description!r})")


#: Alice listens on an abstract unix socket; whoever connects hands her a pidfd of their
#: process (SO_PEERPIDFD), and with the same uid she could copy its descriptors (pidfd_getfd).
ALICE_STEALS = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SO_PEERPIDFD = 77
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\0" + NAME)
server.listen(1)
open(os.path.join(os.environ["HOME"], "listening"), "w").write("1")
server.settimeout(30)
conn, _ = server.accept()
try:
    pidfd = int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little")
except OSError as exc:
    print(json.dumps({"no pidfd": exc.strerror})); raise SystemExit
found, refused = {}, set()
for fd in range(3, 64):
    stolen = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
    if stolen < 0:
        refused.add(errno.errorcode.get(ctypes.get_errno(), "?"))
        continue
    try:
        os.lseek(stolen, 0, 0)
        found[fd] = os.read(stolen, 200).decode(errors="replace")
    except OSError as exc:
        found[fd] = "not readable: " + exc.strerror
found["refused"] = sorted(refused)
print(json.dumps(found))
"""

#: Bob's process (any client of a socket Alice can squat: an X client trying the abstract
#: display socket first, a D-Bus client...) holding a file of his workspace open.
BOB_CONNECTS = r"""
import os, socket, time
handle = open(os.path.join(os.environ["HOME"], "diary.txt"))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + NAME)
time.sleep(3)
print("connected")
"""


async def test_a_claimer_cannot_copy_another_claimers_open_files(
    app, client, make_user, pools, settings
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    await wait_for_pool_of(app, 2)
    alices = await claim(app, client, settings, "alice", alice)
    bobs = await claim(app, client, settings, "bob", bob)
    diary = bobs.workspace / "diary.txt"
    diary.write_text("bob's private diary")
    owner = bobs.workspace.stat()
    os.chown(diary, owner.st_uid, owner.st_gid)
    diary.chmod(0o600)
    name = f"labgate-test-{uuid.uuid4().hex[:8]}"
    steal = asyncio.create_task(alices.run(f"NAME = {name!r}\n" + ALICE_STEALS))
    await wait_for_file(alices.workspace / "listening")
    connected = await bobs.run(f"NAME = {name!r}\n" + BOB_CONNECTS)
    assert connected.strip() == "connected", connected
    found = await steal
    assert "bob's private diary" not in found, f"alice copied bob's descriptors: {found}"
    result = json.loads(found)
    if "no pidfd" in result:
        pytest.skip(f"this kernel gives no SO_PEERPIDFD (Linux 6.5+): {result}")
    assert set(result) == {"refused"} and result["refused"], result  # every descriptor refused


#: Alice holds every inotify instance her uid may have (fs.inotify.max_user_instances, a
#: count per uid), and keeps them while her instance runs.
HOARD_INOTIFY = r"""
import builtins, ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
held = []
while True:
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        break
    held.append(fd)
builtins.labgate_test_held = held  # stays open in the shell process
print("holding", len(held), os.strerror(ctypes.get_errno()))
"""

WATCH = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
print("ok" if fd >= 0 else "failed: " + os.strerror(ctypes.get_errno()))
"""


async def test_one_claimer_cannot_use_up_another_claimers_per_uid_limits(
    app, client, make_user, pools, settings
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    await wait_for_pool_of(app, 2)
    alices = await claim(app, client, settings, "alice", alice)
    bobs = await claim(app, client, settings, "bob", bob)
    held = await alices.run(HOARD_INOTIFY)
    assert held.startswith("holding"), held
    # Bob's file watcher (JupyterLab's, VS Code's, any tool's) still starts.
    seen = await bobs.run(WATCH)
    assert seen.strip() == "ok", f"alice used up bob's inotify instances ({held.strip()}): {seen}"


# --- the backend on its own ---------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Settings:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    settings = Settings(data_dir=tmp_path / "data", sandbox="bwrap", instance_uid_base=BASE)
    settings.data_dir.mkdir(mode=0o700)
    (settings.data_dir / "secret_key").write_text("k" * 64)
    return settings


class Starts:
    """Instances started straight on a process backend; all stopped at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = ProcessBackend(settings)
        self.states: list[JSON] = []

    async def start(self, workspace: Path, owner: str, owner_id: int) -> Started:
        instance_id = f"p{uuid.uuid4().hex[:12]}"
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "shell.py").write_text(SHELL)
        tool = Tool(
            name="shell",
            title="Shell",
            process=ProcessSpec(command=["{python}", "{workspace}/shell.py", "{port}"]),
        )
        spec = LaunchSpec(
            instance_id=instance_id,
            owner=owner,
            owner_id=owner_id,
            tool=tool,
            base_url=f"/i/{instance_id}/",
            workspace=workspace,
            resources=Resources(cpu=1, memory=1024 * MiB),
            secret=uuid.uuid4().hex,
        )
        started = await self.backend.start(spec)
        self.states.append(started.state)
        await wait_for_file(workspace / "ready")
        return started

    async def close(self) -> None:
        for state in self.states:
            await self.backend.stop(state, 0)
            await self.backend.poll(state)


@pytest.fixture
async def starts(site: Settings) -> AsyncIterator[Starts]:
    starts = Starts(site)
    yield starts
    await starts.close()


def pool_number() -> int:
    """A pool instance's number no other test (nor labgate on this machine) is using."""
    return POOL_UID_OFFSET + random.randrange(90_000_000, 99_000_000)


async def test_a_pool_instance_never_starts_as_its_owners_uid(
    starts: Starts, site: Settings
) -> None:
    """A portal that sends the _pool account's id for a pool instance gets no start."""
    pool_ws = site.workspaces_dir / "_pool" / f"p{uuid.uuid4().hex[:12]}"
    with pytest.raises(InstanceStartError, match="uid of its own"):
        await starts.start(pool_ws, "_pool", 23)
    assert not starts.states


async def test_a_user_id_in_the_pool_range_runs_nothing(starts: Starts, site: Settings) -> None:
    """Users' uids and pool instances' never meet: a user id that large is refused."""
    with pytest.raises(InstanceStartError, match="out of the range"):
        await starts.start(site.workspaces_dir / "huge", "huge", POOL_UID_OFFSET + 7)
    assert not starts.states


async def test_the_claim_of_an_instance_with_a_shared_uid_is_refused(
    starts: Starts, site: Settings
) -> None:
    """An instance not started with a uid of its own (an older labgate's pool instance,
    run as _pool's uid like every other) is never handed to a user."""
    started = await starts.start(site.workspaces_dir / "someone", "someone", 23)
    assert not started.state.get("own_uid")
    alice_ws = site.workspaces_dir / "alice"
    with pytest.raises(ClaimError, match="share"):
        await starts.backend.claim(
            started.state, Claim(started.state["instance_id"], "alice", alice_ws, 21)
        )


async def test_a_stopped_pool_instances_keyrings_are_emptied(
    starts: Starts, site: Settings
) -> None:
    require_x86_64_keyctl()
    number = pool_number()
    pool_ws = site.workspaces_dir / "_pool" / f"p{uuid.uuid4().hex[:12]}"
    started = await starts.start(pool_ws, "_pool", number)
    uid = started.state["uid"]
    assert uid == BASE + number
    description = f"labgate-test-{uuid.uuid4().hex[:8]}"
    try:
        name = uuid.uuid4().hex[:8]
        (pool_ws / f"cmd-{name}.py").write_text(KEYS + f"add(b{description!r}, b'left')")
        assert (await wait_for_file(pool_ws / f"out-{name}.txt")).startswith("added")
        assert as_uid(uid, f"read(b{description!r})").startswith("read left")
        await starts.backend.stop(started.state, 0)
        left = as_uid(uid, f"read(b{description!r})")
        assert left.startswith("search failed"), f"the key outlived the instance: {left}"
        assert started.state.get("own_uid") is True
    finally:
        as_uid(uid, f"revoke(b{description!r})")
