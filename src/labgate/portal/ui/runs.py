"""The runs pages: ``/runs`` (your runs) and ``/runs/<id>`` (the graph of stages and tasks).

The graph is rendered with the run's state; ``runs.js`` keeps it live by
polling ``GET /api/v1/runs/<id>`` and does Cancel, Re-run and per-task logs
through the API, like every other page.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.runs import Run
from labgate.errors import NotFound
from labgate.portal.api.runs import viewer
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import error_page, render
from labgate.portal.ui.views import page_context, signed_in
from labgate.scheduler import runrows

router = APIRouter(include_in_schema=False)


@router.get("/runs")
async def runs_page(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Your batch runs, newest first (admins: everyone's)."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    who = viewer(caller)

    def query(session: Session) -> list[dict[str, Any]]:
        stmt = select(Run).order_by(Run.created_at.desc()).limit(200)
        if not who.admin:
            stmt = stmt.where(Run.owner_id == who.user_id)
        return [
            {
                "id": r.id,
                "name": r.name,
                "owner": r.owner.name,
                "state": r.state.value,
                "created_at": r.created_at,
                "reason": r.reason,
            }
            for r in session.scalars(stmt)
        ]

    rows = await portal.run_db(query)
    return render(request, "runs.html", page_context(portal, caller, "runs", runs=rows))


@router.get("/runs/{run_id}")
async def run_page(run_id: str, request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """One run: its stages in order, each with its tasks, their state, results and logs."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    who = viewer(caller)
    try:
        run = await portal.run_db(
            lambda s: runrows.run_json(s, runrows.visible_run(s, run_id, who, attempts=False))
        )
    except NotFound:
        return error_page(request, 404, "not_found", f"There is no run {run_id}.")
    return render(request, "run.html", page_context(portal, caller, "runs", run=run))
