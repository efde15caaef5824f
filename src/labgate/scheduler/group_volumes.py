"""Shared group volumes: read-write storage every member of a group gets, beside datasets.

A site with ``group_root`` keeps one directory per group there,
``<group_root>/<group name>``, made by the operator with the permissions the
site's backend needs (see docs/operations.md#shared-group-volumes). A launch
on that site mounts, read-write at ``/groups/<group name>``, the directory of
every group its owner belongs to that exists on the site now; the tool finds
each in ``LABGATE_DATA_<NAME>`` too. The mounts are recorded on the instance
with the root they must stay in, so a restart mounts the same, and backends
open them below that root with no symbolic link followed, like replicas.

Only a plain group name (:func:`~labgate.backends.groups.plain_name`) has a
volume. Whether a group's directory exists is looked up on the portal's own
disk for a site in its process, and taken from the agent's last report
(``agent_info["groups"]``, :func:`~labgate.backends.groups.group_dirs` on the
site's machine) for a network site.

Access ends with membership: a member taken out of a group, or a group
deleted, takes the volume out of the mount records of the instances that have
not started (:func:`withdraw`), and those that started with it mounted (or
may have: a start already sent) are stopped by the caller. A group whose
volume is still on a site is not deleted (:func:`volumes_of`): a group made
later under the same name would get the old members' files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.backends.confine import EscapesRoot, check_beneath
from labgate.backends.groups import NAME_PATTERN, plain_name
from labgate.db.models import TERMINAL_STATES, Instance, InstanceState, Site, SiteKind, User
from labgate.scheduler.images import groups_of

__all__ = ["GROUP_MOUNT_ROOT", "NAME_PATTERN", "group_mounts", "plain_name", "volumes_of"]

#: Where group volumes appear inside instances.
GROUP_MOUNT_ROOT = "/groups"


def reported_groups(site: Site) -> set[str]:
    """The group volumes a network site's agent last said its ``group_root`` holds."""
    said = (site.agent_info or {}).get("groups")
    return {name for name in said if isinstance(name, str)} if isinstance(said, list) else set()


def _holds(site: Site, root: str, name: str, *, anything: bool = False) -> bool:
    """Whether ``site`` has a directory for group ``name`` under ``root`` now (with
    ``anything``: any entry, a file or a link too).

    A network site's disk is not this machine's: there, what its agent last
    reported (the directories it found) counts.
    """
    if site.kind == SiteKind.network:
        return name in reported_groups(site)
    if anything:
        return os.path.lexists(Path(root) / name)
    try:
        check_beneath(Path(root), name)  # there, a directory or file, and no link
    except EscapesRoot:
        return False  # not made for this group on this site: nothing to mount
    return (Path(root) / name).is_dir()


def group_mounts(session: Session, user: User, site: Site | None) -> list[dict[str, Any]]:
    """The mount records of ``user``'s group volumes on ``site`` (none without ``group_root``)."""
    root = (site.options or {}).get("group_root") if site is not None else None
    if site is None or not root:
        return []
    mounts = []
    for name in sorted(groups_of(session, user)):
        if not plain_name(name):
            continue  # no volume: it would name another group's, or a folder inside one
        if not _holds(site, root, name):
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


def volumes_of(session: Session, name: str) -> list[tuple[str, Path]]:
    """The sites whose ``group_root`` holds something called ``name`` now, and its path.

    Anything there counts (a directory, a file, a link): deleting the group
    would leave it to a later group of that name. On a network site, what its
    agent last reported counts (the directories it found). A name that is not plain
    has no volume (:func:`group_mounts` mounts none), so nothing is looked for.
    """
    if not plain_name(name):
        return []
    found = []
    for site in session.scalars(select(Site).order_by(Site.name)):
        root = (site.options or {}).get("group_root")
        if not root:
            continue
        if _holds(site, root, name, anything=True):
            found.append((site.name, Path(root) / name))
    return found


def withdraw(session: Session, name: str, owner_id: int | None = None) -> list[str]:
    """Take group ``name``'s volume out of unfinished instances (``owner_id``'s, or all).

    The mount records of those instances lose the group's volume, so an
    instance that has not started yet (queued, or pending while its site is
    away) starts without it. Returned: the ids of the instances that may have
    it mounted now (pending, starting, running, unreachable), which the caller
    stops; one queued never reached its site and one stopping is on its way out.
    """
    query = select(Instance).where(Instance.state.not_in(list(TERMINAL_STATES)))
    if owner_id is not None:
        query = query.where(Instance.owner_id == owner_id)
    to_stop = []
    for instance in session.scalars(query):
        records = list(instance.mounts or [])
        kept = [r for r in records if r.get("group") != name]
        if len(kept) == len(records):
            continue
        instance.mounts = kept
        if instance.state not in (InstanceState.queued, InstanceState.stopping):
            to_stop.append(instance.id)
    session.flush()
    return to_stop
