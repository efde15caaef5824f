"""Who a process-backend instance runs as, and who owns its workspace.

When labgate runs as root, every instance runs as an unprivileged uid of its
owner's own: ``uid = gid = settings.instance_uid_base + user id``, with no
supplementary groups and no capabilities. Two users' instances then differ by
uid, so the kernel's permission checks keep them apart too (not only the
sandbox's mounts), and nothing an instance runs is root. These uids have no
``/etc/passwd`` entry; that is deliberate (no login, no home, no groups).

A workspace belongs to its user's uid, mode 0700. Workspaces created by an
older labgate (owned by root) are handed over once, at the next launch that
finds their top directory owned by someone else; a restored snapshot is
handed over right after it is extracted.

When labgate does not run as root it cannot switch uid: instances run as the
server's own account, as before (see ``docs/backends/process.md``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

#: The id files whose ranges the instance uids must stay out of.
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
#: Ids a base is checked against: user ids this far above the base.
CHECKED_SPAN = 1_000_000


@dataclass(frozen=True)
class Identity:
    """The uid and gid an instance runs as."""

    uid: int
    gid: int


def instance_identity(base: int, owner_id: int | None) -> Identity | None:
    """The identity for an instance of user ``owner_id``; None when labgate is not root.

    A launch that names no user id (a test, a direct backend call) runs as
    ``base`` itself, which no user gets: user ids start at 1.
    """
    if os.geteuid() != 0:
        return None
    warn_on_subid_overlap(base)
    uid = base + (owner_id or 0)
    return Identity(uid=uid, gid=uid)


@cache
def warn_on_subid_overlap(base: int) -> None:
    """Warn once when the instance uids may collide with a subordinate id range."""
    for name in SUBID_FILES:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            start, count = int(parts[1]), int(parts[2])
            if start < base + CHECKED_SPAN and base < start + count:
                log.warning(
                    "instance_uid_base %d overlaps the range %s in %s: a user's instance could "
                    "share a uid with %s's user namespaces; choose another instance_uid_base",
                    base,
                    f"{start}-{start + count - 1}",
                    name,
                    parts[0],
                )


def hand_over(path: Path, identity: Identity, *, everything: bool = False) -> None:
    """Make ``path`` (a workspace) and what it holds belong to ``identity``, mode 0700 on top.

    Walks the tree only when the top directory is not already the identity's
    (or when ``everything`` says so, after a restore): a workspace is handed
    over once, and a launch stays fast. Symlinks are changed, never followed, even
    one swapped in during the walk.
    """
    top = path.lstat()
    if not everything and (top.st_uid, top.st_gid) == (identity.uid, identity.gid):
        if top.st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
        return
    # fwalk and dir_fd: a link swapped in for a directory meanwhile is never followed.
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            os.chown(name, identity.uid, identity.gid, dir_fd=dir_fd, follow_symlinks=False)
    os.lchown(path, identity.uid, identity.gid)
    os.chmod(path, 0o700)
