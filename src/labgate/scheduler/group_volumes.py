"""Shared group volumes: read-write storage every member of a group gets, beside datasets.

A site with ``group_root`` keeps one directory per group there,
``<group_root>/<group name>``, made by the operator with the permissions the
site's backend needs (see docs/operations.md#shared-group-volumes). A launch
on that site mounts, read-write at ``/groups/<group name>``, the directory of
every group its owner belongs to that exists on the site now; the tool finds
each in ``LABGATE_DATA_<NAME>`` too. The mounts are recorded on the instance
with the root they must stay in, so a restart mounts the same, and backends
open them below that root with no symbolic link followed, like replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from labgate.backends.confine import EscapesRoot, check_beneath
from labgate.db.models import Site, User
from labgate.scheduler.images import groups_of

#: Where group volumes appear inside instances.
GROUP_MOUNT_ROOT = "/groups"


def group_mounts(session: Session, user: User, site: Site | None) -> list[dict[str, Any]]:
    """The mount records of ``user``'s group volumes on ``site`` (none without ``group_root``)."""
    root = (site.options or {}).get("group_root") if site is not None else None
    if not root:
        return []
    mounts = []
    for name in sorted(groups_of(session, user)):
        try:
            check_beneath(Path(root), name)  # there, a directory or file, and no link
        except EscapesRoot:
            continue  # not made for this group on this site: nothing to mount
        if not (Path(root) / name).is_dir():
            continue
        mounts.append(
            {
                "group": name,
                "source": str(Path(root) / name),
                "root": str(root),
                "target": f"{GROUP_MOUNT_ROOT}/{name}",
                "read_only": False,
            }
        )
    return mounts
