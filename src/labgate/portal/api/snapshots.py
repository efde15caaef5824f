"""Snapshots: save a running instance, list, show, delete, share and revoke.

A snapshot is visible to its owner, to the users it is shared with and to
admins; to anyone else it answers 404. Launching one is
``POST /api/v1/instances {"snapshot": id}`` (owner and shared users).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from labgate.db.models import Snapshot, SnapshotShare, User
from labgate.errors import Forbidden, NotFound
from labgate.portal.api.instances import visible_instance
from labgate.portal.auth import Principal, require
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.snapshots import SnapshotManager, visible_snapshot
from labgate.types import LineText, PlainText, Strict

router = APIRouter(tags=["snapshots"])


class SnapshotIn(Strict):
    name: LineText = Field(
        "", max_length=100, description="A name for people; need not be unique (one line)."
    )
    description: PlainText = Field("", max_length=2000)


class SnapshotOut(BaseModel):
    id: str
    name: str
    description: str
    owner: str
    tool: str
    site: str | None
    backend: str
    kind: str = Field(description="image (container image) or archive (workspace archive).")
    state: str = Field(
        description="saving, ready, failed, or missing (its image or archive is gone)."
    )
    reason: str
    reference: str = Field(description="Image reference or archive file name.")
    digest: str
    size: int = Field(description="Bytes: the image's size, or the archive's.")
    source_instance: str
    created_at: datetime
    ready_at: datetime | None
    shared_with: list[str] = Field(
        default_factory=list, description="Users who may launch it (shown to owner and admins)."
    )


class ShareOut(BaseModel):
    snapshot: str
    user: str
    created_at: datetime


def is_admin(caller: Principal) -> bool:
    """An admin acting with the admin scope."""
    return caller.is_admin and "admin" in caller.scopes


def snapshot_out(session: Session, snapshot: Snapshot, caller: Principal) -> SnapshotOut:
    """The public view of a snapshot; the share list only for its owner and admins."""
    session.refresh(snapshot, ["owner", "site", "shares"])
    manages = caller.can_manage(snapshot.owner_id)
    shared = sorted(share.user.name for share in snapshot.shares) if manages else []
    return SnapshotOut(
        id=snapshot.id,
        name=snapshot.name,
        description=snapshot.description,
        owner=snapshot.owner.name,
        tool=snapshot.tool,
        site=snapshot.site.name if snapshot.site else None,
        backend=snapshot.backend,
        kind=snapshot.kind,
        state=snapshot.state.value,
        reason=snapshot.reason,
        reference=snapshot.reference,
        digest=snapshot.digest,
        size=snapshot.size,
        source_instance=snapshot.source_instance_id,
        created_at=snapshot.created_at,
        ready_at=snapshot.ready_at,
        shared_with=shared,
    )


def snapshots_of(
    session: Session,
    caller: Principal,
    *,
    everyone: bool = False,
    tool: str | None = None,
    source_instance: str | None = None,
) -> list[SnapshotOut]:
    """The snapshots the caller owns or has been shared (``everyone``: all), newest first."""
    stmt = select(Snapshot)
    if not everyone:
        shared = select(SnapshotShare.snapshot_id).where(SnapshotShare.user_id == caller.user_id)
        stmt = stmt.where(or_(Snapshot.owner_id == caller.user_id, Snapshot.id.in_(shared)))
    if tool is not None:
        stmt = stmt.where(Snapshot.tool == tool)
    if source_instance is not None:
        stmt = stmt.where(Snapshot.source_instance_id == source_instance)
    rows = session.scalars(stmt.order_by(Snapshot.created_at.desc())).all()
    return [snapshot_out(session, row, caller) for row in rows]


def managed_snapshot(session: Session, caller: Principal, snapshot_id: str) -> Snapshot:
    """A snapshot the caller owns (or administers); 403 for one merely shared with them."""
    snapshot = visible_snapshot(session, snapshot_id, caller.user_id, is_admin(caller))
    if not caller.can_manage(snapshot.owner_id):
        raise Forbidden(f"snapshot {snapshot_id} is shared with you; only its owner can do that")
    return snapshot


def manager(portal: Portal) -> SnapshotManager:
    """The portal's snapshot manager (present once the app has started)."""
    if portal.snapshots is None:
        raise RuntimeError("the portal is not started: it has no snapshot manager")
    return portal.snapshots


@router.post(
    "/instances/{instance_id}/snapshot",
    response_model=SnapshotOut,
    status_code=202,
    responses=errors(409),
)
async def take_snapshot(
    instance_id: str,
    body: SnapshotIn | None = None,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> SnapshotOut:
    """Save a running instance; progress in its events.

    The snapshot comes back as it is when the answer is written: ``saving``,
    or already ``ready`` when a small workspace saved in the meantime.

    A container instance is committed, tagged and pushed to the snapshot
    registry; a process instance's workspace is archived. The snapshot belongs
    to the instance's owner.
    """
    body = body or SnapshotIn()
    await portal.run_db(lambda s: visible_instance(s, caller, instance_id))
    taken = await manager(portal).take(instance_id, body.name, body.description)

    def show(session: Session) -> SnapshotOut:
        snapshot = session.get(Snapshot, taken.id)
        if snapshot is None:  # deleted already: unlikely, but not a 500
            raise NotFound(f"no snapshot {taken.id!r}", code="unknown_snapshot")
        return snapshot_out(session, snapshot, caller)

    return await portal.run_db(show)


@router.get("/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    all: bool = Query(False, description="Admins: everyone's snapshots."),
    tool: str | None = None,
) -> list[SnapshotOut]:
    """Your snapshots and those shared with you, newest first."""
    if all and not is_admin(caller):
        caller.require("admin")

    return await portal.run_db(lambda s: snapshots_of(s, caller, everyone=all, tool=tool))


@router.get("/snapshots/{snapshot_id}", response_model=SnapshotOut)
async def show_snapshot(
    snapshot_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> SnapshotOut:
    """One snapshot."""
    return await portal.run_db(
        lambda s: snapshot_out(
            s, visible_snapshot(s, snapshot_id, caller.user_id, is_admin(caller)), caller
        )
    )


@router.delete("/snapshots/{snapshot_id}", status_code=204, responses=errors(409, 502))
async def delete_snapshot(
    snapshot_id: str,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Delete a snapshot: its image leaves the registry (or its archive the store)."""
    await portal.run_db(lambda s: managed_snapshot(s, caller, snapshot_id))
    await manager(portal).delete(snapshot_id)
    return Response(status_code=204)


@router.get("/snapshots/{snapshot_id}/shares", response_model=list[ShareOut])
async def list_shares(
    snapshot_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> list[ShareOut]:
    """Who a snapshot is shared with (owner and admins)."""

    def query(session: Session) -> list[ShareOut]:
        snapshot = managed_snapshot(session, caller, snapshot_id)
        return [
            ShareOut(snapshot=snapshot.id, user=share.user.name, created_at=share.created_at)
            for share in sorted(snapshot.shares, key=lambda share: share.created_at)
        ]

    return await portal.run_db(query)


@router.put(
    "/snapshots/{snapshot_id}/shares/{user}",
    response_model=ShareOut,
    responses={201: {"model": ShareOut, "description": "Shared now."}},
)
async def share_snapshot(
    snapshot_id: str,
    user: str,
    response: Response,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> ShareOut:
    """Let another user see and launch a snapshot (201 when new, 200 when it already was)."""

    def share(session: Session) -> ShareOut:
        snapshot = managed_snapshot(session, caller, snapshot_id)
        target = session.scalar(select(User).where(User.name == user))
        if target is None or target.disabled:
            raise NotFound(f"no user {user!r}", code="unknown_user")
        created = SnapshotManager.share(session, snapshot, target.id)
        session.flush()
        response.status_code = 201 if created else 200
        row = session.get(SnapshotShare, (snapshot.id, target.id))
        when = row.created_at if row is not None else snapshot.created_at
        return ShareOut(snapshot=snapshot.id, user=target.name, created_at=when)

    return await portal.run_db(share)


@router.delete("/snapshots/{snapshot_id}/shares/{user}", status_code=204)
async def revoke_share(
    snapshot_id: str,
    user: str,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Take a user's access away; instances they already launched keep running."""

    def revoke(session: Session) -> None:
        snapshot = managed_snapshot(session, caller, snapshot_id)
        target = session.scalar(select(User).where(User.name == user))
        if target is None or not SnapshotManager.revoke(session, snapshot, target.id):
            raise NotFound(f"snapshot {snapshot_id} is not shared with {user!r}")

    await portal.run_db(revoke)
    return Response(status_code=204)
