"""``/readyz`` and ``/metrics``: what load balancers and Prometheus ask.

``/healthz`` (in :mod:`labgate.portal.ui.pages`) says the process answers.
``/readyz`` says it can serve: the database answers, start-up is done (the
instance manager restored what was running), and every configured site has a
link. It is 200 with ``{"ready": true, "checks": {...}, "sites": {...}}`` or
503 with the checks that failed. It also names this portal process
(``replica``), whether it leads (``leading``: it runs the loops that run once,
:mod:`labgate.scheduler.leader`) and which replica does (``leader``); a
replica that does not lead is as ready as one that does. ``sites`` has each
site's health (``ok``, or what keeps it from working: its engine does not
answer, its agent is away). A site that is down fails readiness only when
it is ``required``; otherwise ``checks.sites`` says ``degraded: ...`` and the
portal stays in service for the other sites.

``/metrics`` is the Prometheus text format (:mod:`labgate.portal.metrics`).
It needs ``Authorization: Bearer <metrics_token>`` (the setting) or an admin
API token: instance counts and traffic are not for everyone.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.orm import Session

from labgate.aio import wait_for
from labgate.errors import Forbidden, Unauthorized
from labgate.portal.auth import optional_principal, token_from_header
from labgate.portal.metrics import CONTENT_TYPE, Metrics
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.leader import Leadership
from labgate.security import same

router = APIRouter(tags=["meta"])

READY_DB_TIMEOUT = 5.0


def _ping(session: Session, leader: Leadership) -> str:
    """Ask the database something; the replica that leads, as it says."""
    session.execute(text("SELECT 1"))
    return leader.holder(session)


class ReadyOut(BaseModel):
    """Whether the portal can serve, and each check's answer (``ok`` or what is wrong)."""

    ready: bool
    sites: dict[str, str] = Field(
        default_factory=dict, description="Each site's health: ok, or what is wrong."
    )
    checks: dict[str, str] = Field(description="database, started, sites: ok or the problem.")
    replica: str = Field(description="This portal process (setting replica_id).")
    leading: bool = Field(description="Whether this process runs the loops that run once.")
    leader: str = Field(
        description="The replica that leads, as the database says (empty: none right now)."
    )


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Not ready: the checks say why."}},
)
async def readyz(portal: Portal = Depends(get_portal)) -> JSONResponse:
    """200 when the portal can serve: database, start-up, sites; 503 with what is wrong."""
    checks: dict[str, Any] = {}
    leader = ""
    try:
        leader = await wait_for(
            portal.run_db(partial(_ping, leader=portal.leader)), READY_DB_TIMEOUT
        )
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["database"] = f"failed: {exc.__class__.__name__}"
    checks["started"] = "ok" if portal.manager is not None else "starting"
    configured = portal.local_sites
    missing = [s.name for s in configured if s.name not in portal.links]
    sites = await site_health(portal)
    down = [name for name, health in sites.items() if health != "ok"]
    required = {s.name for s in configured if s.required}
    if missing:
        checks["sites"] = f"not connected: {', '.join(missing)}"
    elif required & set(down):
        checks["sites"] = f"required site down: {', '.join(sorted(required & set(down)))}"
    else:
        checks["sites"] = "ok"
    ready = all(value == "ok" for value in checks.values())
    if ready and down:
        checks["sites"] = f"degraded: {', '.join(down)} down (not required)"
    status = portal.leader.status()
    body = {
        "ready": ready,
        "checks": checks,
        "sites": sites,
        "replica": status.replica,
        "leading": status.leading,
        "leader": leader,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def site_health(portal: Portal) -> dict[str, str]:
    """Each site's health: ``ok`` or what keeps it from working (asked at once, cached)."""
    names = list(portal.links)
    answers = await asyncio.gather(
        *(portal.links[name].health() for name in names), return_exceptions=True
    )
    health = {}
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, BaseException):
            health[name] = f"cannot tell: {answer}"
        else:
            health[name] = answer or "ok"
    return health


async def _may_read_metrics(request: Request, portal: Portal) -> None:
    token = token_from_header(request.headers.get("authorization"))
    expected = portal.settings.metrics_token.get_secret_value()
    if token is not None and expected and same(token, expected):
        return
    caller = await optional_principal(request)
    if caller is None:
        raise Unauthorized("send the metrics token or an admin API token")
    if not caller.has("admin"):
        raise Forbidden("metrics need the metrics token or an admin token")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}},
        **errors(401, 403),
        503: {"description": "Not started yet (empty body).", "content": {CONTENT_TYPE: {}}},
    },
)
async def metrics(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Prometheus text exposition of this portal's metrics."""
    await _may_read_metrics(request, portal)
    registry: Metrics | None = getattr(request.app.state, "metrics", None)
    if registry is None:
        return Response("", media_type=CONTENT_TYPE, status_code=503)
    registry.site_health = await site_health(portal)
    body = await asyncio.to_thread(registry.render)
    return Response(body, media_type=CONTENT_TYPE)
