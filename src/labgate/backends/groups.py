"""Which group volumes a site holds: the plain-named directories under its ``group_root``.

The portal mounts a member's group volume only where the group's directory
exists on the site (docs/operations.md#shared-group-volumes). For a site in
the portal's process the portal looks itself; a network site's agent looks
on its own machine (:func:`group_dirs`) and reports what it found in its
hello and, when that changes, in a heartbeat.

Only a plain group name (:data:`NAME_PATTERN`: one lower-case path component)
has a volume: a group named otherwise (an operator's ``group_map`` may name
any) would reach a folder inside another group's volume (``physics/private``)
or, on a file system that ignores case, another group's (``Physics``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from labgate.wire.agent import MAX_GROUPS

#: A group name that may have a volume: the API's group names (one path component).
NAME_PATTERN = r"[a-z][a-z0-9_.-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


def plain_name(name: str) -> bool:
    """Whether ``name`` is a group name that may have a volume (one plain component)."""
    return _NAME.fullmatch(name) is not None


def group_dirs(root: Path) -> list[str]:
    """The plain names of the directories directly under ``root``, sorted (none when it is
    missing or unreadable).

    A symbolic link is no volume (the backends open the volume below ``root``
    with no link followed, so a launch with it would fail), nor is a file.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    names = []
    for entry in entries:
        if not plain_name(entry.name):
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            names.append(entry.name)
    return sorted(names)[:MAX_GROUPS]  # more are left out, in name order
