"""Instances: launch, list, show, stop, logs and the live event stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from labgate.db.models import (
    Instance,
    InstanceEvent,
    InstanceShare,
    InstanceState,
    User,
    with_owner_and_site,
)
from labgate.errors import BadRequest, NotFound
from labgate.portal.api.choices import check_options
from labgate.portal.auth import Principal, require
from labgate.portal.openapi import errors
from labgate.portal.schemas import (
    ActivityOut,
    EventOut,
    InstanceOut,
    LaunchIn,
    LogsOut,
    QueueOut,
)
from labgate.portal.sharing import shares_for
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.launch import LaunchRequest
from labgate.types import MAX_ID

router = APIRouter(prefix="/instances", tags=["instances"])

SSE_WAKE_TIMEOUT = 1.0
SSE_KEEPALIVE = 15.0


def instance_out(
    portal: Portal, instance: Instance, caller: Principal, session: Session | None = None
) -> InstanceOut:
    """The public view of an instance (with a session: whether and how it is shared)."""
    access, shared = "owner", False
    if session is not None:
        shared = (
            session.scalar(
                select(InstanceShare.id).where(InstanceShare.instance_id == instance.id).limit(1)
            )
            is not None
        )
        if instance.owner_id != caller.user_id:
            access = shares_for(session, caller.user_id).get(instance.id) or "admin"
    return InstanceOut(
        id=instance.id,
        tool=instance.tool,
        owner=instance.owner.name,
        site=instance.site.name if instance.site else None,
        state=instance.state.value,
        reason=instance.reason,
        url=portal.settings.instance_url(instance.id),
        resources=instance.resources,
        created_at=instance.created_at,
        started_at=instance.started_at,
        ready_at=instance.ready_at,
        stopped_at=instance.stopped_at,
        endpoint=instance.endpoint if caller.is_admin else None,
        dataset=next((m.get("dataset") for m in instance.mounts or []), None),
        mounts=[
            {k: m[k] for k in ("dataset", "group", "target", "read_only") if k in m}
            for m in instance.mounts or []
        ],
        snapshot=instance.snapshot_id,
        activity=activity_out(portal, instance.id),
        keep_alive_until=instance.keep_alive_until,
        pool=instance.pool,
        options=dict(instance.options or {}),
        shared=shared,
        access=access,
        queue=queue_out(portal, instance),
        params=instance.params or {},
    )


def queue_out(portal: Portal, instance: Instance) -> QueueOut | None:
    """A queued instance's place in its site's start queue (as of the last dispatch)."""
    if instance.state != InstanceState.queued or portal.manager is None:
        return None
    place = portal.manager.queue.place_of(instance.id)
    if place is None:
        return None
    return QueueOut(site=place.site, position=place.position, estimate=round(place.estimate))


def activity_out(portal: Portal, instance_id: str) -> ActivityOut | None:
    """What the routers saw of an instance, or None before its first request."""
    seen = portal.activity.get(instance_id)
    if seen is None:
        return None
    last = datetime.fromtimestamp(seen.last_request, UTC) if seen.last_request else None
    return ActivityOut(
        last_request=last,
        bytes_in=seen.bytes_in,
        bytes_out=seen.bytes_out,
        open_websockets=seen.open_websockets,
    )


def event_out(event: InstanceEvent) -> EventOut:
    """The public view of an event."""
    return EventOut(
        id=event.id,
        instance=event.instance_id,
        kind=event.kind,
        state=event.state.value,
        message=event.message,
        data=event.data,
        created_at=event.created_at,
    )


def visible_instance(
    session: Session, caller: Principal, instance_id: str, *, shared: bool = False
) -> Instance:
    """The instance if the caller may manage it (or, with ``shared``, see it); 404 otherwise.

    404 rather than 403 gives no hint that an instance exists. Those it is
    shared with (``view`` or ``use``) may see it, its events and logs, never
    stop it.
    """
    instance = session.get(Instance, instance_id)
    allowed = instance is not None and (
        caller.can_manage(instance.owner_id)
        or (shared and instance_id in shares_for(session, caller.user_id))
    )
    if instance is None or not allowed:
        raise NotFound(f"no instance {instance_id!r}", code="unknown_instance")
    session.refresh(instance, ["owner", "site"])
    return instance


@router.post("", response_model=InstanceOut, status_code=202, responses=errors(404, 409, 429))
async def launch(
    body: LaunchIn,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> InstanceOut:
    """Launch a tool; the instance comes back ``pending`` (or ``queued``, waiting for its
    site's start room) and its events tell the rest."""
    if body.site is not None and body.options:
        site, chosen = body.site, body.options
        await portal.run_db(lambda s: check_options(portal, s, site, chosen))
    request = LaunchRequest(
        tool=body.tool or "",
        resources=body.resources,
        site=body.site,
        dataset=body.dataset,
        labels=body.labels,
        snapshot=body.snapshot,
        group=body.group,
        options=body.options,
        image=body.image,
        params=body.params,
    )
    instance = await portal.instances.launch(caller.user_id, request)
    return instance_out(portal, instance, caller)


@router.get("", response_model=list[InstanceOut])
async def list_instances(
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    state: Annotated[list[InstanceState] | None, Query()] = None,
    tool: str | None = None,
    user: str | None = None,
    active: bool = Query(
        False, description="Only queued, pending, starting, running, unreachable, stopping."
    ),
    limit: int = Query(200, ge=1, le=1000),
    include_shared: bool = Query(True, alias="shared", description="And those shared with you."),
) -> list[InstanceOut]:
    """Your instances and those shared with you (admins: everyone's), newest first."""
    if user is not None and user != caller.name:
        caller.require("admin")

    def query(session: Session) -> list[InstanceOut]:
        stmt = select(Instance).join(User, Instance.owner_id == User.id)
        if not (caller.is_admin and "admin" in caller.scopes):
            shared_ids = list(shares_for(session, caller.user_id)) if include_shared else []
            stmt = stmt.where(or_(Instance.owner_id == caller.user_id, Instance.id.in_(shared_ids)))
        if user is not None:
            stmt = stmt.where(User.name == user)
        if state:
            stmt = stmt.where(Instance.state.in_(state))
        if active:
            stmt = stmt.where(
                Instance.state.in_(
                    [
                        InstanceState.queued,
                        InstanceState.pending,
                        InstanceState.starting,
                        InstanceState.running,
                        InstanceState.unreachable,
                        InstanceState.stopping,
                    ]
                )
            )
        if tool is not None:
            stmt = stmt.where(Instance.tool == tool)
        stmt = stmt.order_by(Instance.created_at.desc()).limit(limit)
        rows = session.scalars(stmt.options(*with_owner_and_site())).all()
        return [instance_out(portal, row, caller, session) for row in rows]

    return await portal.run_db(query)


@router.get("/{instance_id}", response_model=InstanceOut)
async def show_instance(
    instance_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> InstanceOut:
    """One instance."""
    return await portal.run_db(
        lambda s: instance_out(
            portal, visible_instance(s, caller, instance_id, shared=True), caller, s
        )
    )


@router.delete("/{instance_id}", response_model=InstanceOut, status_code=202, responses=errors(409))
async def stop_instance(
    instance_id: str,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> InstanceOut:
    """Stop an instance; it comes back ``stopping`` and turns ``stopped`` shortly."""
    await portal.run_db(lambda s: visible_instance(s, caller, instance_id))
    instance = await portal.instances.stop(instance_id)
    return instance_out(portal, instance, caller)


@router.get("/{instance_id}/logs", response_model=LogsOut)
async def instance_logs(
    instance_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    lines: int = Query(200, ge=1, le=10000),
) -> LogsOut:
    """The tool's recent output."""
    instance = await portal.run_db(lambda s: visible_instance(s, caller, instance_id, shared=True))
    text = await portal.instances.logs(instance, lines)
    return LogsOut(instance=instance.id, lines=lines, text=text)


@router.get(
    "/{instance_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **errors(400)},
)
async def instance_events(
    instance_id: str,
    request: Request,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    last_event_id: Annotated[str | None, Header()] = None,
    after: int = Query(0, ge=0, le=MAX_ID, description="Only events after this id."),
) -> Response:
    """Server-Sent Events: every stored event, then live ones until the instance ends.

    Each message has ``id`` (for ``Last-Event-ID``), ``event`` (``state`` or
    ``progress``) and a JSON ``data`` like the items of ``EventOut``.
    """
    await portal.run_db(lambda s: visible_instance(s, caller, instance_id, shared=True))
    if last_event_id is not None:
        try:
            seen = int(last_event_id)
        except ValueError:
            seen = -1
        if not 0 <= seen <= MAX_ID:
            raise BadRequest("Last-Event-ID must be an event id")
        after = max(after, seen)
    return StreamingResponse(
        _event_stream(portal, request, instance_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _events_after(session: Session, *, instance_id: str, after: int) -> tuple[list[EventOut], bool]:
    rows = session.scalars(
        select(InstanceEvent)
        .where(InstanceEvent.instance_id == instance_id, InstanceEvent.id > after)
        .order_by(InstanceEvent.id)
    ).all()
    instance = session.get(Instance, instance_id)
    finished = instance is None or instance.state.terminal
    return [event_out(row) for row in rows], finished


async def _event_stream(
    portal: Portal, request: Request, instance_id: str, after: int
) -> AsyncIterator[bytes]:
    last_sent = time.monotonic()
    yield b"retry: 1000\n\n"
    while True:
        seen = portal.events.version(instance_id)
        events, finished = await portal.run_db(
            partial(_events_after, instance_id=instance_id, after=after)
        )
        for event in events:
            after = event.id
            payload = json.dumps(event.model_dump(mode="json"))
            yield f"id: {event.id}\nevent: {event.kind}\ndata: {payload}\n\n".encode()
            last_sent = time.monotonic()
        if finished or portal.stopping:
            return  # stopping: the reader reconnects with Last-Event-ID
        if await request.is_disconnected():
            return
        await portal.events.wait(instance_id, seen, SSE_WAKE_TIMEOUT)
        if time.monotonic() - last_sent > SSE_KEEPALIVE:
            yield b": keep-alive\n\n"
            last_sent = time.monotonic()
