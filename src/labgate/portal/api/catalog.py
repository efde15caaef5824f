"""The tool catalog, as the API shows it (the sites are in :mod:`labgate.portal.api.sites`).

A tool's launch parameters come with it (``params``), and so do the values the
caller gave its newest instance of the tool (``last_params``): the launch form
offers them again.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.backends.registry import tool_unavailable_reason
from labgate.db.models import Instance, User
from labgate.errors import NotFound
from labgate.portal.auth import Caller
from labgate.portal.schemas import ToolOut
from labgate.portal.state import Portal, get_portal
from labgate.scheduler import images
from labgate.tools.catalog import Tool

router = APIRouter(tags=["catalog"])


def tool_out(tool: Tool, backends: set[str], last: dict[str, str] | None = None) -> ToolOut:
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
        params={name: param.model_dump() for name, param in tool.params.items()},
        last_params={k: v for k, v in (last or {}).items() if k in tool.params},
    )


def last_params(session: Session, user_id: int) -> dict[str, dict[str, str]]:
    """The launch parameters of the user's newest instance of each tool, by tool."""
    rows = session.execute(
        select(Instance.tool, Instance.params)
        .where(Instance.owner_id == user_id)
        .order_by(Instance.created_at.desc())
        .limit(500)
    )
    newest: dict[str, dict[str, str]] = {}
    for tool, params in rows:
        newest.setdefault(tool, dict(params or {}))
    return newest


def catalog_out(portal: Portal, last: dict[str, dict[str, str]]) -> list[ToolOut]:
    """Every tool, with the caller's last parameter values."""
    backends = {link.backend for link in portal.links.values()}
    return [tool_out(tool, backends, last.get(tool.name)) for tool in portal.catalog]


@router.get("/tools", response_model=list[ToolOut])
async def list_tools(caller: Caller, portal: Portal = Depends(get_portal)) -> list[ToolOut]:
    """Every tool in the catalog."""
    last = await portal.run_db(lambda s: last_params(s, caller.user_id))
    return catalog_out(portal, last)


@router.get("/tools/{name}", response_model=ToolOut)
async def show_tool(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> ToolOut:
    """One tool."""
    tool = portal.catalog.get(name)
    if tool is None:
        raise NotFound(f"no tool called {name!r}", code="unknown_tool")
    last = await portal.run_db(lambda s: last_params(s, caller.user_id))
    found = tool_out(tool, {link.backend for link in portal.links.values()}, last.get(name))

    def allowed(session: Session) -> list[str]:
        user = session.get(User, caller.user_id)
        return images.choices(session, tool, user) if user is not None else []

    found.images = await portal.run_db(allowed)
    return found
