"""The tool catalog and the sites, as the API shows them."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.db.models import ACTIVE_STATES, Instance, Site
from labgate.errors import NotFound
from labgate.portal.auth import Caller
from labgate.portal.schemas import SiteOut, ToolOut
from labgate.portal.state import Portal, get_portal
from labgate.tools.catalog import Tool

router = APIRouter(tags=["catalog"])


def tool_out(tool: Tool, backends: set[str]) -> ToolOut:
    """The public view of a tool, with whether any site can run it."""
    reasons = [tool.unavailable_reason(backend) for backend in sorted(backends)]
    available = any(reason is None for reason in reasons)
    return ToolOut(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        icon=tool.icon,
        supports_prefix=tool.supports_prefix,
        resources=tool.resources.model_dump(),
        available=available,
        unavailable_reason=None if available else "; ".join(r or "" for r in reasons),
    )


@router.get("/tools", response_model=list[ToolOut])
async def list_tools(caller: Caller, portal: Portal = Depends(get_portal)) -> list[ToolOut]:
    """Every tool in the catalog."""
    backends = {link.backend for link in portal.links.values()}
    return [tool_out(tool, backends) for tool in portal.catalog]


@router.get("/tools/{name}", response_model=ToolOut)
async def show_tool(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> ToolOut:
    """One tool."""
    tool = portal.catalog.get(name)
    if tool is None:
        raise NotFound(f"no tool called {name!r}", code="unknown_tool")
    return tool_out(tool, {link.backend for link in portal.links.values()})


@router.get("/sites", response_model=list[SiteOut])
async def list_sites(caller: Caller, portal: Portal = Depends(get_portal)) -> list[SiteOut]:
    """The sites and how many instances each runs."""

    def query(session: Session) -> list[SiteOut]:
        counts = dict(
            session.execute(
                select(Instance.site_id, func.count())
                .where(Instance.state.in_(ACTIVE_STATES))
                .group_by(Instance.site_id)
            ).all()
        )
        return [
            SiteOut(
                name=site.name,
                backend=site.backend,
                instances=counts.get(site.id, 0),
                labels=site.labels,
            )
            for site in session.scalars(select(Site).order_by(Site.name))
        ]

    return await portal.run_db(query)
