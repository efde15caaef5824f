"""Unix sockets instances listen on, where only the site's agent connects to them.

At a tunneled site nothing but the agent ever connects to an instance: the
router reaches it through the agent's data connections. A tool that can
listen on a Unix socket (its ``socket_command``) then gets one instead of a
loopback port: a byte costs the kernel about half as much through a Unix
socket as through loopback TCP, and no other account on the host can connect
to the tool at all (a port on 127.0.0.1 is open to every local account, which
the tool's token check alone keeps out).

Each instance has a directory of its own, ``<data_dir>/sockets/<instance id>``
(the data dir is 0700; the directory belongs to the instance's uid, 0700),
holding the socket :data:`SOCKET_NAME`. A sandboxed tool sees that directory
at :data:`SANDBOX_DIR` and nothing else of the data dir. An unsandboxed tool binds
the socket by its path on the host, which must fit in a socket address
(:data:`MAX_PATH` bytes): a data dir too deep for that keeps such tools on
ports.

The instance's uid owns its directory, so a user with a shell in the
instance can put anything there, a symbolic link to another socket of the
host (the container engine's, say) included. The agent runs as root: it
never connects by the path itself but through :func:`connectable`, which
opens the socket file without following a link (``O_PATH | O_NOFOLLOW``)
and connects through that descriptor (``/proc/self/fd/N``). The directory
itself cannot be swapped: its parent belongs to root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Collection
from pathlib import Path

from labgate.safefs import connectable

log = logging.getLogger(__name__)

#: The socket's file name in its instance's directory.
SOCKET_NAME = "tool.sock"
#: Where a sandboxed tool sees its instance's socket directory.
SANDBOX_DIR = "/run/labgate"
#: Longest path a socket address holds (``sun_path`` is 108 bytes with its NUL).
MAX_PATH = 107


def socket_dir(sockets_dir: Path, instance_id: str) -> Path:
    """The instance's socket directory (ValueError for an id that is no plain name)."""
    if "/" in instance_id or instance_id in ("", ".", ".."):
        raise ValueError(f"not an instance id: {instance_id!r}")
    return sockets_dir.resolve() / instance_id


def fits(path: Path) -> bool:
    """Whether a tool can bind the socket of directory ``path`` by that path on the host.

    A sandboxed tool binds it as :data:`SANDBOX_DIR`, and the agent connects
    through a descriptor (:func:`connectable`): only an unsandboxed tool needs
    the host's path to fit in a socket address.
    """
    return len(os.fsencode(path / SOCKET_NAME)) <= MAX_PATH


def prepare(path: Path, uid: int | None, gid: int | None) -> None:
    """Make the instance's socket directory afresh: 0700, owned by ``uid``:``gid`` (None:
    this process's).

    Whatever an earlier run of the same instance left there goes first.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove(path)
    path.mkdir(mode=0o700)
    if uid is not None:
        os.chown(path, uid, gid if gid is not None else -1)


def remove(path: Path) -> None:
    """Remove an instance's socket directory (no link in it is followed)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def listened(path: Path) -> bool:
    """Whether a tool accepts connections on the socket in ``path`` now."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            with connectable(str(path / SOCKET_NAME)) as where:
                probe.connect(where)
        except OSError:
            return False
    return True


def sweep(sockets_dir: Path, keep: Collection[str]) -> list[str]:
    """Remove the socket directories of instances not in ``keep`` that nothing listens on.

    Returns the instance ids whose directories went. A tool still listening
    keeps its directory: processes are never stopped here.
    """
    try:
        entries = list(sockets_dir.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for path in entries:
        if path.name in keep or path.is_symlink() or not path.is_dir():
            continue
        if listened(path):
            continue
        remove(path)
        removed.append(path.name)
    if removed:
        log.info("removed the socket directories of ended instances: %s", removed)
    return removed
