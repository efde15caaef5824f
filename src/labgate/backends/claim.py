"""Handing a running, pre-started instance to a user: the warm-pool claim.

A warm-pool instance is started before anyone asks for it, for nobody: its
workspace is an empty directory of its own (``workspaces/_pool/<id>``). When a
launch claims it, the user's workspace has to appear inside it, and nothing
of the pool's own files may remain visible.

How each backend does that:

``process`` with the bubblewrap sandbox
    The pool instance's workspace is bound into the sandbox at its host path
    and is the tool's ``HOME`` and working directory. A claim clones the
    user's workspace as a detached mount (``open_tree(OPEN_TREE_CLONE)``) in
    the host's mount namespace, enters the sandbox's mount namespace
    (``setns``) and attaches the clone over the pool workspace
    (``move_mount``). From then on every path under the tool's ``HOME`` is the
    user's workspace; the pool directory underneath is hidden and deleted when
    the instance stops. Only the sandbox sees the new mount; the host's mount
    table is untouched, and the mount ends with the sandbox. It needs root
    (``CAP_SYS_ADMIN``) and Linux 5.2 or later; the few lines that do it run
    in a fresh single-threaded helper process (``setns`` refuses threaded
    callers), which checks that it enters a mount namespace other than its
    own.

    Run as root, the pool instance runs as the pool account's uid while the
    user's files belong to the user's uid (see
    :mod:`labgate.backends.identity`). The clone is then made an **idmapped
    mount** (``mount_setattr(MOUNT_ATTR_IDMAP)``, Linux 5.12 or later, on a
    file system that supports it: ext4, xfs, btrfs, tmpfs since 6.3) through a
    throwaway user namespace whose only mapping is user uid → pool uid (and the
    same for the gid): the tool sees the user's files as its own and what it
    writes lands on disk owned by the user. Files of any other owner show as
    ``nobody`` and stay out of its reach. Where idmapped mounts are not
    supported the claim fails and the launch starts cold.

    A process that had opened a file or directory under ``HOME`` before the
    claim keeps that handle on the (empty) pool directory; paths opened
    later resolve to the user's workspace. That is why a tool can declare a
    ``claim_path``: the agent then POSTs ``{"user", "workspace"}`` there (with
    the instance token) and the tool re-reads what it cached (the demo tool
    changes directory and its idea of the user). Tools that only resolve
    paths on use (JupyterLab's contents manager, new kernels and terminals)
    need no notice.

``process`` without a sandbox
    The tool runs in the host's own mount namespace, where mounting over a
    directory would show on the whole machine. It cannot take on a user:
    launches start cold.

``containers``
    A container's volumes are fixed when it is created; the Docker Engine API
    cannot add one to a running container. Launches start cold.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labgate.aio import wait_for
from labgate.backends.procfs import instance_processes
from labgate.errors import LabgateError

#: Runs as ``python -I -S -c HELPER <pid> <source> <target> [<disk id> <seen id>]``:
#: single-threaded, so setns works. With the two ids the clone is idmapped: files of
#: uid/gid ``disk id`` are shown as ``seen id``, and ``seen id`` writes as ``disk id``.
HELPER = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, source, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def fail(what):
    sys.stderr.write(f"{what}: {os.strerror(ctypes.get_errno())}\n"); sys.exit(1)
if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
    sys.stderr.write("the instance shares labgate's mount namespace\n"); sys.exit(2)
AT_FDCWD, OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_MOUNT_F_EMPTY_PATH = -100, 1, 0x8000, 4
AT_EMPTY_PATH, MOUNT_ATTR_IDMAP, CLONE_NEWUSER = 0x1000, 0x100000, 0x10000000
tree = libc.syscall(428, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)
if tree < 0: fail("open_tree")
if len(sys.argv) > 5:
    disk, seen = int(sys.argv[4]), int(sys.argv[5])
    ready, go = os.pipe(), os.pipe()
    child = os.fork()
    if child == 0:  # holds a user namespace open until the maps are written and used
        code = 0 if libc.unshare(CLONE_NEWUSER) == 0 else 1
        os.write(ready[1], b"%d" % code); os.read(go[0], 1); os._exit(0)
    if os.read(ready[0], 1) != b"0": fail("unshare(CLONE_NEWUSER)")
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as handle:
            handle.write(f"{disk} {seen} 1\n")
    userns = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    os.write(go[1], b"x"); os.waitpid(child, 0)
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns))
    if libc.syscall(442, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE, attr, 32) != 0:
        fail("mount_setattr(MOUNT_ATTR_IDMAP)")
namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
if libc.setns(namespace, 0x00020000) != 0: fail("setns")
if libc.syscall(429, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH) != 0:
    fail("move_mount")
"""
HELPER_TIMEOUT = 10.0


class ClaimError(LabgateError):
    """A running instance could not be handed to a user; the launch starts cold instead."""

    status = 409
    default_code = "claim_failed"


@dataclass(frozen=True)
class Claim:
    """A warm-pool instance given to a user."""

    instance_id: str
    owner: str
    #: The user's workspace on the site (a host directory for the process backend).
    workspace: Path
    #: The user's id (the process backend derives the uid owning the workspace from it).
    owner_id: int | None = None


@dataclass(frozen=True)
class Claimed:
    """What a backend's claim returns."""

    #: The instance's new backend state.
    state: dict[str, Any]
    #: Where the tool now sees the user's workspace (its HOME).
    workspace: str


def mount_namespace(pid: int) -> int | None:
    """The inode of a process's mount namespace, or None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def sandboxed_pid(instance_id: str, tracked: int) -> int | None:
    """A live process of the instance inside its own mount namespace (the sandbox)."""
    own = mount_namespace(os.getpid())
    candidates: list[int] = []
    try:
        children = Path(f"/proc/{tracked}/task/{tracked}/children").read_text().split()
        candidates = [int(pid) for pid in children]
    except (OSError, ValueError):
        pass
    if not candidates:
        candidates = sorted(instance_processes(instance_id, tracked, {}))
    for pid in candidates:
        namespace = mount_namespace(pid)
        if namespace is not None and namespace != own:
            return pid
    return None


async def mount_into(
    pid: int, source: Path, target: str, idmap: tuple[int, int] | None = None
) -> None:
    """Mount ``source`` (a host directory) at ``target`` inside ``pid``'s mount namespace.

    ``idmap`` = (disk id, seen id): the mount shows uid and gid ``disk id`` as
    ``seen id`` (and writes of ``seen id`` as ``disk id``).
    """
    ids = [str(idmap[0]), str(idmap[1])] if idmap is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        HELPER,
        str(pid),
        str(source),
        target,
        *ids,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await wait_for(process.communicate(), HELPER_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ClaimError("mounting the workspace into the sandbox timed out") from None
    if process.returncode != 0:
        reason = err.decode(errors="replace").strip() or f"exit code {process.returncode}"
        raise ClaimError(f"cannot mount the workspace into the sandbox: {reason}")
