"""Sharing an instance: with users or groups, as ``use`` or ``view``, and by link.

- ``view``: the instance shows in the person's lists, with its state, events
  and logs; they cannot reach the tool, stop it or share it.
- ``use``: view, and reach the tool through the router (its access list).
- A share link (``lgl_<random>``, only its hash kept) gives ``use`` to whoever
  signs in and opens it before it expires; it is listed and revocable, and
  revoking it removes the shares it gave.

Only the owner (or an admin) shares, lists shares and revokes them. Every
change recomputes the instance's access list and feeds it to the routers,
which then refuse the next request and close the open WebSockets of anyone
no longer on it (:meth:`labgate.wire.routes.RouteTable.add_route`).

Functions take an open session; the caller commits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from labgate.db.models import (
    GroupMember,
    Instance,
    InstanceShare,
    InstanceVisit,
    ShareAccess,
    ShareLink,
    User,
    utcnow,
)
from labgate.errors import BadRequest, Forbidden, NotFound
from labgate.security import hash_token

#: Share links start with this, so a leaked one is recognisable (and greppable).
LINK_PREFIX = "lgl_"
#: The longest a share link may live: a week.
MAX_LINK_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class Grant:
    """What a caller may do with an instance they can see."""

    #: ``owner``, ``admin``, ``use`` or ``view``.
    access: str

    @property
    def manages(self) -> bool:
        """Owner or admin: stop, share, revoke."""
        return self.access in ("owner", "admin")


def groups_of(session: Session, user_id: int) -> list[int]:
    """The ids of the groups a user is in."""
    return list(session.scalars(select(GroupMember.group_id).where(GroupMember.user_id == user_id)))


def shares_for(session: Session, user_id: int) -> dict[str, str]:
    """Instance id -> the best access shared with ``user_id`` (directly or through a group)."""
    groups = groups_of(session, user_id)
    clause = InstanceShare.user_id == user_id
    if groups:
        clause = or_(clause, InstanceShare.group_id.in_(groups))
    best: dict[str, str] = {}
    for instance_id, access in session.execute(
        select(InstanceShare.instance_id, InstanceShare.access).where(clause)
    ):
        if best.get(instance_id) != ShareAccess.use.value:
            best[instance_id] = access
    return best


def grant_of(session: Session, instance: Instance, user_id: int, is_admin: bool) -> Grant | None:
    """What ``user_id`` may do with ``instance``, or None when they may not even see it."""
    if instance.owner_id == user_id:
        return Grant("owner")
    if is_admin:
        return Grant("admin")
    access = shares_for(session, user_id).get(instance.id)
    return None if access is None else Grant(access)


def access_list(session: Session, instance_id: str) -> frozenset[int]:
    """The users, besides the owner, who may reach the instance (``use``, groups expanded)."""
    users: set[int] = set()
    groups: set[int] = set()
    for user_id, group_id in session.execute(
        select(InstanceShare.user_id, InstanceShare.group_id).where(
            InstanceShare.instance_id == instance_id,
            InstanceShare.access == ShareAccess.use.value,
        )
    ):
        if user_id is not None:
            users.add(user_id)
        if group_id is not None:
            groups.add(group_id)
    if groups:
        users.update(
            session.scalars(select(GroupMember.user_id).where(GroupMember.group_id.in_(groups)))
        )
    return frozenset(users)


def access_lists(session: Session) -> dict[str, frozenset[int]]:
    """Every instance's non-empty :func:`access_list`, in two queries (the route table's load)."""
    users: dict[str, set[int]] = {}
    groups: dict[str, set[int]] = {}
    used = InstanceShare.access == ShareAccess.use.value
    for instance_id, user_id, group_id in session.execute(
        select(InstanceShare.instance_id, InstanceShare.user_id, InstanceShare.group_id).where(used)
    ):
        if user_id is not None:
            users.setdefault(instance_id, set()).add(user_id)
        if group_id is not None:
            groups.setdefault(instance_id, set()).add(group_id)
    if groups:
        members: dict[int, set[int]] = {}
        shared_groups = select(InstanceShare.group_id).where(
            used, InstanceShare.group_id.is_not(None)
        )
        for group_id, user_id in session.execute(
            select(GroupMember.group_id, GroupMember.user_id).where(
                GroupMember.group_id.in_(shared_groups)
            )
        ):
            members.setdefault(group_id, set()).add(user_id)
        for instance_id, group_ids in groups.items():
            found = users.setdefault(instance_id, set())
            for group_id in group_ids:
                found |= members.get(group_id, set())
    return {instance_id: frozenset(ids) for instance_id, ids in users.items() if ids}


def instances_shared_with_groups(session: Session, group_ids: list[int]) -> list[str]:
    """Instances shared with any of these groups (their access lists follow membership)."""
    if not group_ids:
        return []
    return list(
        session.scalars(
            select(InstanceShare.instance_id)
            .where(InstanceShare.group_id.in_(group_ids))
            .distinct()
        )
    )


def share(
    session: Session,
    instance: Instance,
    *,
    access: str,
    user: User | None = None,
    group_id: int | None = None,
) -> InstanceShare:
    """Share with a user or a group (replacing an earlier share with the same one)."""
    if access not in (ShareAccess.use.value, ShareAccess.view.value):
        raise BadRequest("access must be 'use' or 'view'", code="bad_access")
    if (user is None) == (group_id is None):
        raise BadRequest("share with a user or a group", code="bad_share")
    if user is not None and user.id == instance.owner_id:
        raise BadRequest("the owner has the instance already", code="bad_share")
    who = (
        InstanceShare.user_id == user.id if user is not None else InstanceShare.group_id == group_id
    )
    existing = session.scalar(
        select(InstanceShare).where(
            InstanceShare.instance_id == instance.id, who, InstanceShare.link_id.is_(None)
        )
    )
    if existing is None:
        existing = InstanceShare(
            instance_id=instance.id, user_id=user.id if user else None, group_id=group_id
        )
        session.add(existing)
    existing.access = access
    session.flush()
    return existing


def unshare(session: Session, instance: Instance, share_id: int) -> None:
    """Remove one share of the instance; 404 when it has no such share."""
    row = session.get(InstanceShare, share_id)
    if row is None or row.instance_id != instance.id:
        raise NotFound(f"instance {instance.id} has no share {share_id}", code="unknown_share")
    session.delete(row)
    session.flush()


def create_link(
    session: Session, instance: Instance, *, expires_in: int, note: str = ""
) -> tuple[ShareLink, str]:
    """A new share link and its token (shown once)."""
    if not 60 <= expires_in <= MAX_LINK_SECONDS:
        raise BadRequest(
            f"a share link lives between 60 and {MAX_LINK_SECONDS} seconds", code="bad_expiry"
        )
    token = LINK_PREFIX + secrets.token_urlsafe(32)
    link = ShareLink(
        instance_id=instance.id,
        token_hash=hash_token(token),
        prefix=token[:10],
        note=note,
        expires_at=utcnow() + timedelta(seconds=expires_in),
    )
    session.add(link)
    session.flush()
    return link, token


def revoke_link(session: Session, instance: Instance, link_id: int) -> None:
    """Delete a link and every share it gave."""
    link = session.get(ShareLink, link_id)
    if link is None or link.instance_id != instance.id:
        raise NotFound(f"instance {instance.id} has no share link {link_id}", code="unknown_link")
    session.execute(delete(InstanceShare).where(InstanceShare.link_id == link.id))
    session.delete(link)
    session.flush()


def redeem_link(session: Session, token: str, user_id: int, now: datetime | None = None) -> str:
    """Give ``user_id`` ``use`` through a link; the instance id. 404 for a bad or old link."""
    link = session.scalar(select(ShareLink).where(ShareLink.token_hash == hash_token(token)))
    now = now or utcnow()
    if link is None or link.expires_at <= now:
        raise NotFound(
            "this share link is not valid (revoked, expired or mistyped)", code="bad_link"
        )
    instance = session.get(Instance, link.instance_id)
    if instance is None or instance.state.terminal:
        raise NotFound("the instance of this share link has ended", code="bad_link")
    if instance.owner_id == user_id:
        return instance.id
    already = session.scalar(
        select(InstanceShare).where(
            InstanceShare.instance_id == instance.id,
            InstanceShare.user_id == user_id,
            InstanceShare.link_id == link.id,
        )
    )
    if already is None:
        session.add(
            InstanceShare(
                instance_id=instance.id,
                user_id=user_id,
                access=ShareAccess.use.value,
                link_id=link.id,
            )
        )
        session.flush()
    return instance.id


def require_manager(grant: Grant | None, instance_id: str) -> None:
    """Refuse anyone but the owner and admins (a sharer cannot share further)."""
    if grant is None:
        raise NotFound(f"no instance {instance_id!r}", code="unknown_instance")
    if not grant.manages:
        raise Forbidden("only the owner of an instance can do this", code="not_owner")


def record_visits(session: Session, visits: dict[tuple[str, int], float]) -> None:
    """Note who reached which instance and when (from the routers' reports)."""
    for (instance_id, user_id), when in visits.items():
        at = datetime.fromtimestamp(when, UTC)
        if session.get(Instance, instance_id) is None or session.get(User, user_id) is None:
            continue
        row = session.get(InstanceVisit, (instance_id, user_id))
        if row is None:
            session.add(
                InstanceVisit(instance_id=instance_id, user_id=user_id, first_at=at, last_at=at)
            )
        elif at > row.last_at:
            row.last_at = at
    session.flush()
