"""Instance lifecycle endpoints: keep-alive, the tools' "busy" reports, and warm pools.

- ``GET/PUT/DELETE /instances/{id}/keep-alive``: when idle culling would stop
  the instance (``cull_at``, ``cull_reason``, ``cull_in`` seconds: the
  countdown the UI and CLI show) and the owner's keep-alive, set with
  ``{"until": time}`` or ``{"for": seconds}`` and capped at ``keep_alive_max``.
- ``POST /instances/{id}/activity`` with ``Authorization: token <instance
  token>``: the tool says it is busy (a kernel still computing), which counts
  as use. The instance token grants this and nothing else; it is compared in
  constant time with the token of the instance named in the path, so it can
  only mark its own instance.
- ``GET /pools``: the warm pools, their size and fill (admins).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from labgate.db.models import Instance, InstanceState, utcnow
from labgate.errors import BadRequest, Conflict, Unauthorized
from labgate.portal.api.instances import visible_instance
from labgate.portal.auth import Principal, require, token_from_header
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.culling import Culler, cull_status
from labgate.security import same
from labgate.types import Strict, Timestamp

router = APIRouter(tags=["instances"])


class KeepAliveIn(Strict):
    """Keep an instance alive until a time, or for a number of seconds."""

    model_config = ConfigDict(populate_by_name=True)

    until: Timestamp | None = Field(None, description="Keep it until then.")
    seconds: float | None = Field(None, alias="for", gt=0, description="Keep it this long.")


class KeepAliveOut(BaseModel):
    """An instance's keep-alive and the countdown to its next stop."""

    instance: str
    state: str
    keep_alive_until: datetime | None
    keep_alive_max: float = Field(description="The longest keep-alive allowed, in seconds.")
    cull_at: datetime | None = Field(None, description="When it will be stopped, if unused.")
    cull_reason: str | None = Field(None, description="idle or lifetime")
    cull_in: float | None = Field(None, description="Seconds until cull_at.")
    cull_warning: float = Field(
        description="Seconds before cull_at that a warning goes into the events."
    )
    capped: bool = Field(False, description="The asked-for time was cut to keep_alive_max.")


def _culler(request: Request) -> Culler | None:
    return getattr(request.app.state, "culler", None)


def keep_alive_out(
    session: Session, portal: Portal, culler: Culler | None, instance: Instance, capped: bool
) -> KeepAliveOut:
    """The keep-alive view of an instance."""
    status: dict[str, Any] = cull_status(culler, session, instance)
    return KeepAliveOut(
        instance=instance.id,
        state=instance.state.value,
        keep_alive_until=instance.keep_alive_until,
        keep_alive_max=portal.settings.keep_alive_max,
        cull_warning=portal.settings.cull_warning,
        capped=capped,
        **status,
    )


@router.get("/instances/{instance_id}/keep-alive", response_model=KeepAliveOut)
async def show_keep_alive(
    instance_id: str,
    request: Request,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> KeepAliveOut:
    """The keep-alive and when the instance will be stopped if nobody uses it."""
    culler = _culler(request)

    def show(session: Session) -> KeepAliveOut:
        instance = visible_instance(session, caller, instance_id, shared=True)
        return keep_alive_out(session, portal, culler, instance, False)

    return await portal.run_db(show)


@router.put(
    "/instances/{instance_id}/keep-alive", response_model=KeepAliveOut, responses=errors(409)
)
async def set_keep_alive(
    instance_id: str,
    body: KeepAliveIn,
    request: Request,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> KeepAliveOut:
    """Spare the instance from idle culling until a time (capped at ``keep_alive_max``)."""
    if (body.until is None) == (body.seconds is None):
        raise BadRequest("give either until (a time) or for (seconds)")
    longest = portal.settings.keep_alive_max
    if longest <= 0:
        raise Conflict("keep-alive is turned off on this portal", code="keep_alive_off")
    now = utcnow()
    ceiling = now + timedelta(seconds=longest)
    if body.until is not None:
        if body.until.tzinfo is None:
            raise BadRequest("until needs a time zone (e.g. 2026-11-22T18:00:00Z)")
        wanted = body.until
    else:
        # Capped before the arithmetic: a huge number of seconds overflows a datetime.
        wanted = now + timedelta(seconds=min(body.seconds or 0.0, longest + 1))
    if wanted <= now:
        raise BadRequest("until must be in the future")
    capped = wanted > ceiling
    culler = _culler(request)

    def change(session: Session) -> KeepAliveOut:
        instance = visible_instance(session, caller, instance_id)
        if instance.state.terminal or instance.state == InstanceState.stopping:
            raise Conflict(
                f"instance {instance_id} is {instance.state.value}", code="invalid_state"
            )
        instance.keep_alive_until = min(wanted, ceiling)
        session.flush()
        return keep_alive_out(session, portal, culler, instance, capped)

    return await portal.run_db(change)


@router.delete("/instances/{instance_id}/keep-alive", response_model=KeepAliveOut)
async def clear_keep_alive(
    instance_id: str,
    request: Request,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> KeepAliveOut:
    """End the keep-alive: idle culling applies again from now on."""
    culler = _culler(request)

    def clear(session: Session) -> KeepAliveOut:
        instance = visible_instance(session, caller, instance_id)
        instance.keep_alive_until = None
        session.flush()
        return keep_alive_out(session, portal, culler, instance, False)

    return await portal.run_db(clear)


@router.post("/instances/{instance_id}/activity", status_code=204, responses=errors(401))
async def report_busy(
    instance_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """The tool reports it is busy (counts as use); authenticated by its instance token."""
    token = token_from_header(request.headers.get("authorization")) or ""

    def touch(session: Session) -> None:
        instance = session.get(Instance, instance_id)
        # One answer for a wrong token and an unknown instance: ids are not probed here.
        secret = portal.box.open(instance.id, instance.secret) if instance is not None else None
        if instance is None or not token or not secret or not same(token, secret):
            raise Unauthorized("send the instance token of this instance", code="invalid_token")
        if instance.state == InstanceState.running:
            instance.last_activity_at = utcnow()

    await portal.run_db(touch)
    return Response(status_code=204)


@router.get("/pools")
async def list_pools(
    request: Request, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> list[dict[str, Any]]:
    """Warm pools: tool, site, size, ready and starting instances, and why one is off."""
    pools = getattr(request.app.state, "pools", None)
    if pools is None:
        return []
    return await portal.run_db(pools.status)
