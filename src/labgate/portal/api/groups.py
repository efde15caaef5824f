"""Groups and limits: admins create groups, add users and set limits; users read theirs.

A group's limits cap what its members charge to it together; a user's own
limits replace the settings' per-user defaults (see
:mod:`labgate.scheduler.quotas`). Limits are ``instances``, ``cpu``,
``memory`` (bytes or ``16G``) and ``core_hours`` (per calendar month); in a
change, a limit set to ``null`` is removed and one left out is kept.

A group's shared volume (:mod:`labgate.scheduler.group_volumes`) follows its
membership: taking a member out, or deleting the group, stops the instances
that mount it and takes it out of those that have not started. A group whose
volume is still on a site is not deleted (409 ``group_volume_exists``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labgate.db.models import Group, GroupMember, User, UserLimits
from labgate.errors import Conflict, LabgateError, NotFound
from labgate.portal.accounts import get_user
from labgate.portal.auth import Caller, Principal, require
from labgate.portal.openapi import errors
from labgate.portal.sharing import instances_shared_with_groups
from labgate.portal.state import Portal, get_portal
from labgate.scheduler import group_volumes, quotas
from labgate.types import Strict
from labgate.units import MAX_SIZE, parse_size

router = APIRouter(tags=["groups"])

#: One plain, lower-case path component: the name of the group's volume on a site too.
GROUP_NAME = f"^{group_volumes.NAME_PATTERN}$"
#: The longest lifetime a group may set: ten years, in seconds.
MAX_LIFETIME = 10 * 366 * 86400


class LimitsIn(Strict):
    """Limits to set; a field given as null removes that limit, one left out is kept."""

    instances: int | None = Field(None, ge=0, le=10**6, description="Instances at once.")
    cpu: float | None = Field(None, ge=0, le=10**6, description="CPU cores held at once.")
    memory: int | None = Field(
        None, ge=0, le=MAX_SIZE, description="Memory held at once: bytes or 16G."
    )
    core_hours: float | None = Field(
        None, ge=0, le=10**9, description="Core-hours per calendar month."
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    def changes(self) -> dict[str, Any]:
        """Only the limits the request named."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class GroupIn(Strict):
    """A new group."""

    name: str = Field(pattern=GROUP_NAME, description="Lower-case group name.")
    description: str = Field("", max_length=2000)
    limits: LimitsIn | None = None
    max_lifetime: float | None = Field(
        None,
        gt=0,
        le=MAX_LIFETIME,
        description="Seconds an instance charged to the group may run.",
    )


class GroupPatch(Strict):
    """Changes to a group; fields left out are kept."""

    description: str | None = Field(None, max_length=2000)
    limits: LimitsIn | None = None
    max_lifetime: float | None = Field(
        None, gt=0, le=MAX_LIFETIME, description="null removes the limit."
    )


class GroupOut(BaseModel):
    """A group, its members, limits and current use."""

    name: str
    description: str
    members: list[str]
    limits: dict[str, Any]
    max_lifetime: float | None
    use: dict[str, Any] = Field(description="What its launches hold now and used this month.")
    created_at: datetime


class LimitsOut(BaseModel):
    """A user's limits: their own, the effective ones, their use, and their groups'."""

    user: str
    limits: dict[str, Any] = Field(description="The user's own limits (null: the default).")
    effective: dict[str, Any] = Field(description="What applies: own, else the settings'.")
    use: dict[str, Any]
    groups: list[GroupOut]


def get_group(session: Session, name: str) -> Group:
    """The group called ``name``; 404 otherwise."""
    group = session.scalar(select(Group).where(Group.name == name))
    if group is None:
        raise NotFound(f"no group called {name!r}", code="unknown_group")
    return group


def group_out(session: Session, group: Group) -> GroupOut:
    """The public view of a group."""
    members = session.scalars(
        select(User.name)
        .join(GroupMember, GroupMember.user_id == User.id)
        .where(GroupMember.group_id == group.id)
        .order_by(User.name)
    ).all()
    return GroupOut(
        name=group.name,
        description=group.description,
        members=list(members),
        limits=quotas.stored_limits(group).as_json(),
        max_lifetime=group.max_lifetime,
        use=quotas.group_use(session, group.name).as_json(),
        created_at=group.created_at,
    )


def _member(session: Session, group: Group, user_id: int) -> bool:
    return session.get(GroupMember, (group.id, user_id)) is not None


async def _stop_mounting(portal: Portal, instance_ids: list[str], reason: str, why: str) -> None:
    """Stop the instances that still have a group's volume mounted, saying why."""
    for instance_id in instance_ids:
        try:
            await portal.instances.stop(
                instance_id, reason=reason, message=f"stopped: {why}, whose volume it mounts"
            )
        except LabgateError:
            continue  # stopped or gone meanwhile


@router.get("/groups", response_model=list[GroupOut])
async def list_groups(caller: Caller, portal: Portal = Depends(get_portal)) -> list[GroupOut]:
    """Every group (admins), or the groups you are in."""

    def query(session: Session) -> list[GroupOut]:
        if caller.has("admin"):
            groups = session.scalars(select(Group).order_by(Group.name)).all()
        else:
            groups = quotas.groups_of(session, caller.user_id)
        return [group_out(session, group) for group in groups]

    return await portal.run_db(query)


@router.post("/groups", response_model=GroupOut, status_code=201, responses=errors(409))
async def create_group(
    body: GroupIn, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> GroupOut:
    """Create a group (admins)."""

    def create(session: Session) -> GroupOut:
        if session.scalar(select(Group.id).where(Group.name == body.name)) is not None:
            raise Conflict(f"a group called {body.name!r} exists", code="group_exists")
        group = Group(name=body.name, description=body.description, max_lifetime=body.max_lifetime)
        if body.limits is not None:
            quotas.store_limits(group, body.limits.changes())
        session.add(group)
        try:
            session.flush()
        except IntegrityError:
            raise Conflict(f"a group called {body.name!r} exists", code="group_exists") from None
        return group_out(session, group)

    return await portal.run_db(create)


@router.get("/groups/{name}", response_model=GroupOut)
async def show_group(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> GroupOut:
    """One group: its members, limits and use (admins and members)."""

    def show(session: Session) -> GroupOut:
        group = get_group(session, name)
        if not caller.has("admin") and not _member(session, group, caller.user_id):
            raise NotFound(f"no group called {name!r}", code="unknown_group")
        return group_out(session, group)

    return await portal.run_db(show)


@router.patch("/groups/{name}", response_model=GroupOut)
async def change_group(
    name: str,
    body: GroupPatch,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> GroupOut:
    """Change a group's description, limits or maximum lifetime (admins)."""

    def change(session: Session) -> GroupOut:
        group = get_group(session, name)
        if body.description is not None:
            group.description = body.description
        if body.limits is not None:
            quotas.store_limits(group, body.limits.changes())
        if "max_lifetime" in body.model_fields_set:
            group.max_lifetime = body.max_lifetime
        session.flush()
        return group_out(session, group)

    return await portal.run_db(change)


@router.delete("/groups/{name}", status_code=204, responses=errors(409))
async def delete_group(
    name: str, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> Response:
    """Delete a group (admins); usage records keep its name.

    Refused (409 ``group_volume_exists``) while a site's ``group_root`` still
    holds the group's volume: move it away or remove it first, so that its
    files are neither lost nor handed to a later group of the same name.
    Instances that still mount the volume are stopped.
    """

    def delete(session: Session) -> list[str]:
        group = get_group(session, name)
        volumes = group_volumes.volumes_of(session, group.name)
        if volumes:
            where = ", ".join(f"{path} on site {site}" for site, path in volumes)
            raise Conflict(
                f"group {name} still has its volume ({where}): move it away or remove it "
                f"first; a group made later with this name would get its files",
                code="group_volume_exists",
            )
        shared = instances_shared_with_groups(session, [group.id])
        mounting = group_volumes.withdraw(session, group.name)
        session.delete(group)
        session.flush()
        if portal.routes is not None:
            for instance_id in shared:
                portal.routes.access_changed(session, instance_id)
        return mounting

    mounting = await portal.run_db(delete)
    await _stop_mounting(portal, mounting, "group_deleted", f"group {name} was deleted")
    return Response(status_code=204)


@router.put(
    "/groups/{name}/members/{user}",
    response_model=GroupOut,
    responses={201: {"model": GroupOut, "description": "Added now."}},
)
async def add_member(
    name: str,
    user: str,
    response: Response,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> GroupOut:
    """Add a user to a group (admins): 201, or 200 when they already were in it."""

    def add(session: Session) -> GroupOut:
        group, member = get_group(session, name), get_user(session, user)
        if _member(session, group, member.id):
            response.status_code = 200
        else:
            session.add(GroupMember(group_id=group.id, user_id=member.id))
            session.flush()
            response.status_code = 201
            if portal.routes is not None:
                portal.routes.group_changed(session, group.id)
        return group_out(session, group)

    return await portal.run_db(add)


@router.delete("/groups/{name}/members/{user}", status_code=204)
async def remove_member(
    name: str,
    user: str,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Take a user out of a group (admins); their instances mounting its volume are stopped."""

    def remove(session: Session) -> list[str]:
        group, member = get_group(session, name), get_user(session, user)
        row = session.get(GroupMember, (group.id, member.id))
        if row is None:
            raise NotFound(f"{user} is not in group {name}", code="not_a_member")
        session.delete(row)
        # Their instances lose the volume: those not started yet start without it.
        mounting = group_volumes.withdraw(session, group.name, member.id)
        session.flush()
        if portal.routes is not None:
            portal.routes.group_changed(session, group.id)
        return mounting

    mounting = await portal.run_db(remove)
    why = f"{user} was taken out of group {name}"
    await _stop_mounting(portal, mounting, "group_left", why)
    return Response(status_code=204)


def limits_out(session: Session, portal: Portal, user: User) -> LimitsOut:
    """A user's limits, use and groups."""
    defaults = portal.instances.user_defaults()
    return LimitsOut(
        user=user.name,
        limits=quotas.stored_limits(session.get(UserLimits, user.id)).as_json(),
        effective=quotas.user_limits(session, defaults, user.id).as_json(),
        use=quotas.user_use(session, user.id).as_json(),
        groups=[group_out(session, g) for g in quotas.groups_of(session, user.id)],
    )


@router.get("/users/{name}/limits", response_model=LimitsOut, responses=errors(403))
async def show_limits(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> LimitsOut:
    """Your limits and use (``me``), or anyone's for admins."""
    name = caller.name if name == "me" else name
    if name != caller.name:
        caller.require("admin")
    return await portal.run_db(lambda s: limits_out(s, portal, get_user(s, name)))


@router.put("/users/{name}/limits", response_model=LimitsOut)
async def set_limits(
    name: str,
    body: LimitsIn,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> LimitsOut:
    """Set a user's own limits (admins); null removes one (the default applies again)."""
    name = caller.name if name == "me" else name

    def change(session: Session) -> LimitsOut:
        user = get_user(session, name)
        row = session.get(UserLimits, user.id)
        if row is None:
            row = UserLimits(user_id=user.id)
            session.add(row)
        quotas.store_limits(row, body.changes())
        session.flush()
        return limits_out(session, portal, user)

    return await portal.run_db(change)
