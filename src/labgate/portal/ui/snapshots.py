"""The snapshots page, ``/snapshots``: your snapshots and those shared with you.

Rendered with the same query as ``GET /api/v1/snapshots``; ``snapshots.js``
shares, unshares, deletes and launches through the API, and keeps the state
of snapshots still saving up to date. The instance page has the button that
takes a snapshot and lists that instance's snapshots.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from labgate.portal.api.snapshots import snapshots_of
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import render
from labgate.portal.ui.views import is_admin, page_context, signed_in

router = APIRouter(include_in_schema=False)


@router.get("/snapshots")
async def snapshots_page(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Snapshots with their state, sharing, Launch and Delete (admins: ``?all=true``)."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    everyone = request.query_params.get("all") == "true" and is_admin(caller)
    rows = await portal.run_db(lambda s: snapshots_of(s, caller, everyone=everyone))
    titles = {tool.name: tool.title for tool in portal.catalog}
    context = page_context(
        portal,
        caller,
        "snapshots",
        snapshots=rows,
        everyone=everyone,
        admin=is_admin(caller),
        titles=titles,
    )
    return render(request, "snapshots.html", context)
