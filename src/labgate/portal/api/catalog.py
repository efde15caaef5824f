"""The tool catalog and the sites, as the API shows them."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import live_sites
from labgate.backends.registry import tool_unavailable_reason
from labgate.db.models import Site, SiteReport, utcnow
from labgate.errors import NotFound
from labgate.portal.auth import Caller
from labgate.portal.schemas import SiteOut, ToolOut
from labgate.portal.state import Portal, get_portal
from labgate.resolver.inventory import report_view
from labgate.scheduler.placement import Usage
from labgate.scheduler.sites import capacity_of, data_root_of, usage_by_site
from labgate.tools.catalog import Tool

router = APIRouter(tags=["catalog"])


def tool_out(tool: Tool, backends: set[str]) -> ToolOut:
    """The public view of a tool, with whether any site can run it."""
    reasons = [tool_unavailable_reason(tool, backend) for backend in sorted(backends)]
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
    """The sites: capacity, use, labels, liveness and their last inventory push."""

    def query(session: Session) -> list[SiteOut]:
        use = usage_by_site(session)
        reports = {r.site_id: r for r in session.scalars(select(SiteReport))}
        now = utcnow()
        out = []
        for site in session.scalars(select(Site).order_by(Site.name)):
            used, cap = use.get(site.id, Usage()), capacity_of(site)
            out.append(
                SiteOut(
                    name=site.name,
                    backend=site.backend,
                    instances=used.instances,
                    labels=site.labels,
                    live=site.name in live_sites(portal.links),
                    capacity={"cpu": cap.cpu, "memory": cap.memory, "max_instances": cap.instances},
                    use={"cpu": used.cpu, "memory": used.memory, "instances": used.instances},
                    data_root=data_root_of(site),
                    inventory=report_view(reports.get(site.id), now),
                )
            )
        return out

    return await portal.run_db(query)
