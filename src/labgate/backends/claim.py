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

from labgate.backends.procfs import instance_processes
from labgate.errors import LabgateError

#: Runs as ``python -I -S -c HELPER <pid> <source> <target>``: single-threaded, so setns works.
HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, source, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def fail(what):
    sys.stderr.write(f"{what}: {os.strerror(ctypes.get_errno())}\n"); sys.exit(1)
if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
    sys.stderr.write("the instance shares labgate's mount namespace\n"); sys.exit(2)
AT_FDCWD, OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_MOUNT_F_EMPTY_PATH = -100, 1, 0x8000, 4
tree = libc.syscall(428, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)
if tree < 0: fail("open_tree")
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


async def mount_into(pid: int, source: Path, target: str) -> None:
    """Mount ``source`` (a host directory) at ``target`` inside ``pid``'s mount namespace."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        HELPER,
        str(pid),
        str(source),
        target,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), HELPER_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ClaimError("mounting the workspace into the sandbox timed out") from None
    if process.returncode != 0:
        reason = err.decode(errors="replace").strip() or f"exit code {process.returncode}"
        raise ClaimError(f"cannot mount the workspace into the sandbox: {reason}")
