"""The tool catalog, as the API shows it (the sites are in :mod:`labgate.portal.api.sites`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from labgate.backends.registry import tool_unavailable_reason
from labgate.db.models import User
from labgate.errors import NotFound
from labgate.portal.auth import Caller
from labgate.portal.schemas import ToolOut
from labgate.portal.state import Portal, get_portal
from labgate.scheduler import images
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
    found = tool_out(tool, {link.backend for link in portal.links.values()})

    def allowed(session: Session) -> list[str]:
        user = session.get(User, caller.user_id)
        return images.choices(session, tool, user) if user is not None else []

    found.images = await portal.run_db(allowed)
    return found
