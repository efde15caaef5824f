"""The routers' side door: the route stream and activity reports.

Router processes (``labgate router``, extra ``router_workers``) follow the
route stream and post what they saw. Both take the router token only (see
``labgate.portal.auth.router_caller``): the stream carries every instance's
upstream secret, so no user's token or session, an admin's included, may read it.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from labgate.portal.auth import Principal, router_caller
from labgate.portal.state import Portal, get_portal
from labgate.router import STREAM_MEDIA_TYPE, Activity
from labgate.router.stats import RouterStats

router = APIRouter(prefix="/router", tags=["router"])


class ActivityReport(BaseModel):
    """What one router process saw since it started."""

    worker: str = Field(min_length=1, max_length=200)
    activity: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Request count and latency histogram (labgate.router.stats), for /metrics.
    stats: dict[str, Any] | None = None


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {STREAM_MEDIA_TYPE: {}}}},
)
async def route_stream(
    caller: Principal = Depends(router_caller), portal: Portal = Depends(get_portal)
) -> Response:
    """Newline-delimited JSON: a snapshot of the route table, then every change."""
    assert portal.routes is not None
    return StreamingResponse(portal.routes.table.subscribe(), media_type=STREAM_MEDIA_TYPE)


@router.post("/activity", status_code=204)
async def report_activity(
    body: ActivityReport,
    caller: Principal = Depends(router_caller),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Record one router process's activity per instance (it drives idle culling)."""
    parsed = {key: Activity.from_dict(value) for key, value in body.activity.items()}
    portal.activity.report(body.worker, parsed, time.time())
    if body.stats is not None:
        portal.activity.report_stats(body.worker, RouterStats.from_dict(body.stats))
    return Response(status_code=204)
