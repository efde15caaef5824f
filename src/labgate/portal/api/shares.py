"""Sharing instances: shares with users and groups, share links, and who used it.

Only the owner (or an admin) sees and changes an instance's shares; those it
is shared with see the instance itself (``GET /instances``), not its shares.
See :mod:`labgate.portal.sharing` for the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import (
    Group,
    Instance,
    InstanceShare,
    InstanceVisit,
    ShareLink,
    User,
    utcnow,
)
from labgate.errors import BadRequest, NotFound
from labgate.portal import sharing
from labgate.portal.accounts import get_user
from labgate.portal.auth import Principal, require
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.types import MAX_ID, Strict

router = APIRouter(tags=["sharing"])


class ShareIn(Strict):
    """Share with one user or one group."""

    user: str | None = Field(None, max_length=64)
    group: str | None = Field(None, max_length=64)
    access: str = Field("use", pattern="^(use|view)$", description="use or view.")


class ShareOut(BaseModel):
    id: int
    user: str | None
    group: str | None
    access: str
    via_link: int | None = Field(None, description="The share link it came from, if any.")
    created_at: datetime


class LinkIn(Strict):
    expires_in: int = Field(
        24 * 3600, ge=60, le=sharing.MAX_LINK_SECONDS, description="Seconds until it expires."
    )
    note: str = Field("", max_length=200)


class LinkOut(BaseModel):
    id: int
    prefix: str
    note: str
    created_at: datetime
    expires_at: datetime
    expired: bool
    used_by: list[str]


class LinkCreated(LinkOut):
    url: str = Field(description="The link itself; shown once.")
    token: str


class VisitOut(BaseModel):
    user: str
    first_at: datetime
    last_at: datetime


class SharingOut(BaseModel):
    instance: str
    owner: str
    shares: list[ShareOut]
    links: list[LinkOut]
    visits: list[VisitOut] = Field(description="Who reached it through the router, and when.")


class RedeemIn(Strict):
    token: str = Field(min_length=8, max_length=200)


class RedeemOut(BaseModel):
    instance: str
    url: str


def managed_instance(session: Session, caller: Principal, instance_id: str) -> Instance:
    """The instance, when the caller owns it or is an admin; 404 / 403 otherwise."""
    instance = session.get(Instance, instance_id)
    grant = (
        None
        if instance is None
        else sharing.grant_of(session, instance, caller.user_id, caller.has("admin"))
    )
    sharing.require_manager(grant, instance_id)
    if instance is None:  # for the type checker: require_manager raised already
        raise NotFound(f"no instance {instance_id!r}", code="unknown_instance")
    return instance


def _share_out(row: InstanceShare) -> ShareOut:
    return ShareOut(
        id=row.id,
        user=row.user.name if row.user else None,
        group=row.group.name if row.group else None,
        access=row.access,
        via_link=row.link_id,
        created_at=row.created_at,
    )


def _link_out(session: Session, link: ShareLink) -> LinkOut:
    used = session.scalars(
        select(User.name)
        .join(InstanceShare, InstanceShare.user_id == User.id)
        .where(InstanceShare.link_id == link.id)
        .order_by(User.name)
    )
    return LinkOut(
        id=link.id,
        prefix=link.prefix,
        note=link.note,
        created_at=link.created_at,
        expires_at=link.expires_at,
        expired=link.expires_at <= utcnow(),
        used_by=list(used),
    )


def sharing_out(
    session: Session, instance: Instance, seen: dict[int, float] | None = None
) -> SharingOut:
    """Everything about who may see, use and used an instance.

    ``seen`` is what the routers report now (user id -> last request); it is
    stored first, so the access log outlives router and portal restarts.
    """
    if seen:
        sharing.record_visits(session, {(instance.id, user): at for user, at in seen.items()})
    shares = session.scalars(
        select(InstanceShare)
        .where(InstanceShare.instance_id == instance.id)
        .order_by(InstanceShare.id)
    )
    links = session.scalars(
        select(ShareLink).where(ShareLink.instance_id == instance.id).order_by(ShareLink.id)
    )
    visits = session.execute(
        select(User.name, InstanceVisit.first_at, InstanceVisit.last_at)
        .join(User, User.id == InstanceVisit.user_id)
        .where(InstanceVisit.instance_id == instance.id)
        .order_by(InstanceVisit.last_at.desc())
    )
    return SharingOut(
        instance=instance.id,
        owner=instance.owner.name,
        shares=[_share_out(row) for row in shares],
        links=[_link_out(session, link) for link in links],
        visits=[VisitOut(user=n, first_at=f, last_at=last) for n, f, last in visits],
    )


def routers_saw(portal: Portal, instance_id: str) -> dict[int, float]:
    """Who the routers let into an instance, and when last."""
    activity = portal.activity.get(instance_id)
    return {} if activity is None else activity.users


async def _withdraw(
    portal: Portal,
    caller: Principal,
    instance_id: str,
    remove: Callable[[Session, Instance, int], None],
    row_id: int,
) -> Response:
    """Remove a share or a link of an instance the caller manages, and tell the routers."""

    def run(session: Session) -> None:
        instance = managed_instance(session, caller, instance_id)
        remove(session, instance, row_id)
        _changed(portal, session, instance.id)

    await portal.run_db(run)
    return Response(status_code=204)


def _changed(portal: Portal, session: Session, instance_id: str) -> None:
    if portal.routes is not None:
        portal.routes.access_changed(session, instance_id)


@router.get(
    "/instances/{instance_id}/shares", response_model=SharingOut, responses=errors(403, 404)
)
async def list_shares(
    instance_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> SharingOut:
    """The instance's shares, share links and access log (owner and admins)."""
    seen = routers_saw(portal, instance_id)
    return await portal.run_db(
        lambda s: sharing_out(s, managed_instance(s, caller, instance_id), seen)
    )


@router.post(
    "/instances/{instance_id}/shares",
    response_model=ShareOut,
    status_code=201,
    responses=errors(400, 403, 404),
)
async def add_share(
    instance_id: str,
    body: ShareIn,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> ShareOut:
    """Share with a user or a group as ``use`` or ``view`` (again: change the access)."""

    def add(session: Session) -> ShareOut:
        instance = managed_instance(session, caller, instance_id)
        if (body.user is None) == (body.group is None):
            raise BadRequest("name a user or a group", code="bad_share")
        user = get_user(session, body.user) if body.user is not None else None
        group_id = None
        if body.group is not None:
            group_id = session.scalar(select(Group.id).where(Group.name == body.group))
            if group_id is None:
                raise NotFound(f"no group called {body.group!r}", code="unknown_group")
        row = sharing.share(session, instance, access=body.access, user=user, group_id=group_id)
        _changed(portal, session, instance.id)
        session.refresh(row, ["user", "group"])
        return _share_out(row)

    return await portal.run_db(add)


@router.delete(
    "/instances/{instance_id}/shares/{share_id}", status_code=204, responses=errors(403, 404)
)
async def remove_share(
    instance_id: str,
    share_id: int = Path(ge=1, le=MAX_ID),
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Stop sharing: the person's next request is refused and their WebSockets close."""
    return await _withdraw(portal, caller, instance_id, sharing.unshare, share_id)


@router.post(
    "/instances/{instance_id}/links",
    response_model=LinkCreated,
    status_code=201,
    responses=errors(400, 403, 404),
)
async def add_link(
    instance_id: str,
    body: LinkIn,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> LinkCreated:
    """A share link giving ``use`` to whoever signs in with it before it expires."""

    def add(session: Session) -> LinkCreated:
        instance = managed_instance(session, caller, instance_id)
        link, token = sharing.create_link(
            session, instance, expires_in=body.expires_in, note=body.note
        )
        out = _link_out(session, link)
        url = f"{portal.settings.effective_public_url}/share/{token}"
        return LinkCreated(**out.model_dump(), url=url, token=token)

    return await portal.run_db(add)


@router.delete(
    "/instances/{instance_id}/links/{link_id}", status_code=204, responses=errors(403, 404)
)
async def remove_link(
    instance_id: str,
    link_id: int = Path(ge=1, le=MAX_ID),
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Revoke a share link and the access it gave."""
    return await _withdraw(portal, caller, instance_id, sharing.revoke_link, link_id)


async def redeem(portal: Portal, caller: Principal, token: str) -> RedeemOut:
    """Take up a share link for the caller."""

    def take(session: Session) -> str:
        instance_id = sharing.redeem_link(session, token, caller.user_id)
        _changed(portal, session, instance_id)
        return instance_id

    instance_id = await portal.run_db(take)
    return RedeemOut(instance=instance_id, url=portal.settings.instance_url(instance_id))


@router.post("/shares/redeem", response_model=RedeemOut, responses=errors(404))
async def redeem_link(
    body: RedeemIn,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> RedeemOut:
    """Take up a share link: the instance is then shared with you (``use``)."""
    return await redeem(portal, caller, body.token)
