"""The routers' side door: the route stream and activity reports.

Router processes (``labgate router``, extra ``router_workers``) follow the
route stream and post what they saw. Both take the router token only (see
``labgate.portal.auth.router_caller``): the stream carries every instance's
upstream secret, so no user's token or session, an admin's included, may read it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from labgate.errors import BadRequest
from labgate.portal.auth import Principal, router_caller
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.portal.tunnel_routers import TunnelRouters
from labgate.scheduler.activity import record_last_use
from labgate.types import Strict
from labgate.wire.activity import Activity
from labgate.wire.stats import RouterStats
from labgate.wire.stream import STREAM_MEDIA_TYPE, TUNNEL_HEADER, tunnel_address

router = APIRouter(prefix="/router", tags=["router"])


#: The latest Unix time a report may name (the end of year 9999): later ones overflow dates.
LAST_TIME = 253402300799.0


class RouteActivityIn(Strict):
    """What a router saw of one instance (:class:`labgate.wire.activity.Activity`)."""

    last_request: float = Field(0.0, ge=0, le=LAST_TIME, description="Unix time.")
    bytes_in: int = Field(0, ge=0)
    bytes_out: int = Field(0, ge=0)
    open_websockets: int = Field(0, ge=0)
    users: dict[
        Annotated[str, Field(pattern=r"^[0-9]{1,12}$")],
        Annotated[float, Field(ge=0, le=LAST_TIME)],
    ] = Field(default_factory=dict, description="User id -> Unix time of their last request.")


class RouterStatsIn(Strict):
    """Request count and latency histogram (:class:`labgate.wire.stats.RouterStats`)."""

    requests: int = Field(0, ge=0)
    buckets: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Counts per latency bucket; another layout is ignored."
    )
    latency_sum: float = Field(0.0, ge=0, le=1e18, description="Seconds.")


class ActivityReport(Strict):
    """What one router process saw since it started."""

    worker: str = Field(min_length=1, max_length=200)
    activity: dict[str, RouteActivityIn] = Field(default_factory=dict)
    #: Request count and latency histogram, for /metrics.
    stats: RouterStatsIn | None = None


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {STREAM_MEDIA_TYPE: {}}}, **errors(400, 403)},
)
async def route_stream(
    caller: Principal = Depends(router_caller),
    portal: Portal = Depends(get_portal),
    tunnel: str | None = Header(
        None,
        alias=TUNNEL_HEADER,
        description=(
            "The address tunneled sites' agents dial this router at (http(s)://HOST:PORT); "
            "listed to them while the stream is open."
        ),
    ),
) -> Response:
    """Newline-delimited JSON: a snapshot of the route table, then every change."""
    if portal.routes is None:
        raise RuntimeError("the portal is not started: it has no route table")
    lines = portal.routes.table.subscribe()
    if tunnel and portal.tunnel_routers is not None:
        try:
            url = tunnel_address(tunnel)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        lines = _registered(lines, portal.tunnel_routers, url)
    return StreamingResponse(lines, media_type=STREAM_MEDIA_TYPE)


async def _registered(
    lines: AsyncIterator[bytes], routers: TunnelRouters, url: str
) -> AsyncIterator[bytes]:
    """The stream's lines, with the router listed for the agents while it lasts."""
    await routers.opened(url)
    try:
        async for line in lines:
            yield line
    finally:
        routers.closed(url)


@router.post("/activity", status_code=204, responses=errors(403))
async def report_activity(
    body: ActivityReport,
    caller: Principal = Depends(router_caller),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Record one router process's activity per instance (it drives idle culling)."""
    parsed = {key: Activity.from_dict(value.model_dump()) for key, value in body.activity.items()}
    portal.activity.report(body.worker, parsed, time.time())
    if portal.replicated:
        # The leader, which culls, may be another replica: it reads the database.
        await portal.run_db(partial(record_last_use, activity=parsed))
    if body.stats is not None:
        portal.activity.report_stats(body.worker, RouterStats.from_dict(body.stats.model_dump()))
    return Response(status_code=204)
