"""The tool catalog, as the API shows it (the sites are in :mod:`labgate.portal.api.sites`).

A tool's launch parameters come with it (``params``), and so do the values the
caller gave its newest instance of the tool (``last_params``): the launch form
offers them again.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.db.models import Instance, User
from labgate.errors import NotFound
from labgate.portal.auth import Caller
from labgate.portal.schemas import ToolOut
from labgate.portal.state import Portal, get_portal
from labgate.scheduler import images
from labgate.tools.catalog import Tool

router = APIRouter(tags=["catalog"])


def tool_out(
    tool: Tool, links: Collection[SiteLink], last: dict[str, str] | None = None
) -> ToolOut:
    """The public view of a tool, with whether any site can run it, and why not.

    Each site answers for itself (:meth:`SiteLink.placement_reason`): a
    program its machine lacks, an image its engine does not hold and cannot
    pull; with several sites, each reason names its site.
    """
    reasons = {link.site: link.placement_reason(tool) for link in links}
    available = any(reason is None for reason in reasons.values())
    said = [(site, reason) for site, reason in sorted(reasons.items()) if reason]
    why = (
        "; ".join(f"site {site}: {reason}" for site, reason in said)
        if len(said) > 1
        else "".join(reason for _, reason in said)
    )
    return ToolOut(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        icon=tool.icon,
        supports_prefix=tool.supports_prefix,
        resources=tool.resources.model_dump(),
        available=available,
        unavailable_reason=None if available else why or "no site runs tools here",
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
    links = list(portal.links.values())
    return [tool_out(tool, links, last.get(tool.name)) for tool in portal.catalog]


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
    found = tool_out(tool, list(portal.links.values()), last.get(name))

    def allowed(session: Session) -> list[str]:
        user = session.get(User, caller.user_id)
        return images.choices(session, tool, user) if user is not None else []

    found.images = await portal.run_db(allowed)
    return found
