"""The bubblewrap (``bwrap``) sandbox of the process backend.

:func:`bwrap_argv` builds the ``bwrap`` command line that runs one tool so it
sees the system read-only, the Python running labgate read-only, its own
workspace read-write, its mounts, and nothing else of the machine: no other
user's workspace, no instance logs, no server files, no host ``/tmp``, and
only its own processes (a new PID namespace).

Decisions, and why:

- ``--unshare-pid --unshare-ipc --unshare-uts`` but not the network: the
  tool listens on the host's loopback, where the router reaches it. Tools
  with ``private_network`` get ``--unshare-net`` too: a namespace with only
  its own loopback, reached through a listening socket the backend bound on
  the host's loopback and handed in (see :mod:`labgate.tools.gate`).
- No ``--die-with-parent``: instances outlive the server (restarts re-attach).
- No ``--new-session``: it guards against a sandboxed program injecting
  keystrokes into a controlling terminal (TIOCSTI). The backend already
  starts ``bwrap`` in a new session with stdin from ``/dev/null``, so there is
  no terminal to attack, and keeping the tool in the backend's process group
  lets one ``killpg`` reach it.
- No ``--setenv``/``--clearenv``: the backend gives ``bwrap`` itself the
  limited environment, which ``bwrap`` passes on unchanged. ``--setenv``
  would put the instance token on ``bwrap``'s command line, where ``ps``
  shows it to every local user.
- Secrets under ``/etc`` readable by the server's user (``/etc/shadow``,
  ssh host keys) are masked even though ``/etc`` is bound read-only.
- ``--cap-drop ALL``: run by root, ``bwrap`` would otherwise hand the tool
  every capability (``CAP_DAC_READ_SEARCH`` alone opens any host file through
  ``open_by_handle_at``). When labgate is root the tool also runs as another
  uid (``switch_uid``): ``bwrap`` keeps ``CAP_SETUID``, ``CAP_SETGID`` and
  ``CAP_SETPCAP`` for the launcher in front of the tool, which empties the
  bounding set and switches uid, leaving none (see
  :mod:`labgate.backends.limits`). ``bwrap`` runs as root to set up the binds,
  so sources only root can reach (``/root/.pyenv``) can still be bound; its own
  init inside the sandbox keeps uid 0 but no capabilities, and a tool of
  another uid can neither signal, trace nor read it.
- With ``switch_uid``, ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are world-writable
  (sticky) tmpfs: the tool is not their owner.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labgate.backends.base import Mount
from labgate.backends.confine import EscapesRoot, open_mount
from labgate.backends.sockets import SANDBOX_DIR

#: Top-level system directories, bound read-only (or recreated as symlinks on
#: merged-/usr systems such as Debian 12) when they exist on the machine.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
#: Files under /etc replaced by an empty file inside the sandbox.
MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
#: Private tmpfs directories of the sandbox (binds below them land in the tmpfs).
TMPFS_DIRS = ("/run", "/tmp", "/var/tmp", "/dev", "/proc")  # noqa: S108 - private, empty
#: Directories under /etc replaced by an empty tmpfs inside the sandbox.
MASKED_DIRS = ("/etc/ssh", "/etc/sudoers.d", "/etc/labgate")


class SandboxError(ValueError):
    """The sandbox cannot be set up as asked; the message says why."""


@dataclass(frozen=True)
class SandboxPlan:
    """The ``bwrap`` arguments for one instance, and what they make visible."""

    argv: list[str]
    #: Paths that exist inside the sandbox (read-only or read-write), with their subtrees.
    visible: tuple[str, ...]
    #: Open descriptors of the mounts, for ``bwrap`` to inherit (``pass_fds``); the
    #: caller closes them (:func:`close_fds`) once ``bwrap`` is started.
    fds: tuple[int, ...] = ()

    def shows(self, path: str) -> bool:
        """Whether host ``path`` is reachable inside the sandbox, as named and resolved."""
        names = (os.path.abspath(path), os.path.realpath(path))
        return all(any(_contains(root, name) for root in self.visible) for name in names)


def find_bwrap() -> str | None:
    """Absolute path of ``bwrap``, if installed."""
    return shutil.which("bwrap")


def python_dirs() -> list[str]:
    """Directories the Python running labgate needs: the venv, the base install, labgate.

    With an editable install labgate's source lives outside the venv; its
    directory (the one holding the ``labgate`` package) is bound too, and
    nothing around it.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, package_root]
    # Under both names when a symlink leads there: the venv's python links to the base by
    # its real path, while sys.executable uses the name it was started with.
    return _outermost([os.path.abspath(d) for d in dirs] + [os.path.realpath(d) for d in dirs])


def _outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without duplicates and without those inside another one."""
    result: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in result):
            result.append(path)
    return result


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _parents(targets: Sequence[str], bound: Sequence[str]) -> list[str]:
    """The directories above ``targets`` that bwrap would create, outermost first.

    Those inside (or equal to) ``bound`` paths exist already, and so do the
    sandbox's own tmpfs mount points.
    """
    parents: set[str] = set()
    for target in targets:
        parent = os.path.dirname(os.path.normpath(target))
        while (
            parent != "/"
            and parent not in TMPFS_DIRS
            and not any(_contains(top, parent) for top in bound)
        ):
            parents.add(parent)
            parent = os.path.dirname(parent)
    return sorted(parents, key=lambda p: (p.count("/"), p))


def bwrap_argv(
    bwrap: str,
    *,
    workspace: Path,
    mounts: Sequence[Mount] = (),
    private: Sequence[Path] = (),
    extra_ro: Sequence[str] = (),
    hostname: str = "labgate",
    switch_uid: bool = False,
    private_network: bool = False,
    socket_dir: Path | None = None,
) -> SandboxPlan:
    """The ``bwrap`` command line (up to and including ``--``) for one instance.

    ``private`` are host directories that must never be visible (the data
    dir: every user's workspace, the logs); a read-only bind that would
    contain one of them is refused rather than silently exposing it.
    ``switch_uid``: the command switches to an unprivileged uid itself, so
    ``bwrap`` keeps exactly the capabilities that needs for it.
    ``private_network``: a network namespace of its own, with only a loopback.
    ``socket_dir``: the instance's socket directory (of the data dir), bound at
    :data:`~labgate.backends.sockets.SANDBOX_DIR`.
    """
    argv = [
        bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        *(["--unshare-net"] if private_network else []),
        "--hostname",
        hostname,
        "--cap-drop",
        "ALL",
    ]
    if switch_uid:
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"):
            argv += ["--cap-add", cap]
    sticky = ["--perms", "01777"] if switch_uid else []
    visible: list[str] = []
    for top in SYSTEM_DIRS:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
            visible.append(top)
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
            visible.append(top)
    for path in MASKED_FILES:
        if os.path.isfile(path):
            argv += ["--ro-bind", "/dev/null", path]
    for path in MASKED_DIRS:
        if os.path.isdir(path):
            argv += ["--tmpfs", path, "--remount-ro", path]

    # Private, empty /tmp and /run; binds under them (a venv or workspace in /tmp) come after.
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run"]
    scratch = ["/tmp", "/var/tmp"] + (["/dev/shm"] if switch_uid else [])  # noqa: S108
    for path in scratch:  # private and empty
        argv += [*sticky, "--tmpfs", path]

    mounted = len(visible)  # the system dirs; what follows are binds into the tmpfs root
    binds: list[str] = []
    private_real = [os.path.realpath(p) for p in private]
    for path in _outermost([*python_dirs(), *(os.path.abspath(p) for p in extra_ro)]):
        if any(_contains(os.path.realpath(path), hidden) for hidden in private_real):
            raise SandboxError(
                f"{path} is needed inside the sandbox but contains the data dir; "
                "move the data dir out of it"
            )
        if any(_contains(shown, path) for shown in visible):
            continue
        if os.path.exists(path):
            binds += ["--ro-bind", path, path]
            visible.append(path)

    ws = str(workspace)
    binds += ["--bind", ws, ws]
    visible.append(ws)
    if socket_dir is not None:
        binds += ["--bind", str(socket_dir), SANDBOX_DIR]
        visible.append(SANDBOX_DIR)
    fds = mount_args(bwrap, mounts, binds)
    visible += [mount.target for mount in mounts]
    if switch_uid:
        # bwrap makes the missing parents of a bind 0700 root; the uid must pass through them.
        for parent in _parents(visible[mounted:], visible[:mounted]):
            argv += ["--perms", "0755", "--dir", parent]
    argv += binds
    # Switching uid, the launcher enters the workspace (the uid's, 0700) once it is that uid.
    argv += ["--chdir", "/" if switch_uid else ws, "--"]
    return SandboxPlan(argv=argv, visible=tuple(visible), fds=fds)


def mount_args(bwrap: str, mounts: Sequence[Mount], argv: list[str]) -> tuple[int, ...]:
    """Append the binds of ``mounts`` to ``argv``; the descriptors ``bwrap`` must inherit.

    Each source is opened below its root with no symbolic link followed
    (:func:`~labgate.backends.confine.open_mount`) and ``bwrap`` binds that
    descriptor (``--ro-bind-fd``, bubblewrap 0.8+), then closes it before the
    tool starts: a link swapped in after the check is never followed. An older
    ``bwrap`` binds the checked path by name, which leaves the window between
    this check and ``bwrap``'s mount (docs/datasets.md).
    """
    fds: list[int] = []
    by_fd = _binds_fds(bwrap)
    try:
        for mount in mounts:
            if not os.path.isabs(mount.target):
                raise SandboxError(f"mount target {mount.target!r} is not an absolute path")
            try:
                fd = open_mount(mount)
            except EscapesRoot as exc:
                raise SandboxError(f"mount source refused: {exc}") from None
            if not by_fd:
                os.close(fd)
                argv += ["--ro-bind" if mount.read_only else "--bind", str(mount.source)]
            else:
                fds.append(fd)
                argv += ["--ro-bind-fd" if mount.read_only else "--bind-fd", str(fd)]
            argv.append(mount.target)
    except BaseException:
        close_fds(fds)
        raise
    return tuple(fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close the descriptors of a plan once ``bwrap`` holds its own copies (or failed)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@functools.cache
def _binds_fds(bwrap: str) -> bool:
    """Whether this ``bwrap`` has ``--ro-bind-fd`` (bubblewrap 0.8.0 and later)."""
    try:
        result = subprocess.run(
            [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return "--ro-bind-fd" in result.stdout + result.stderr
