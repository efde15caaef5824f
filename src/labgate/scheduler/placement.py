"""Placement: which site an instance runs on.

Today a launch may name a site; otherwise the first site whose backend can
run the tool is chosen. Data locality, capacity and labels come with the
dataset resolver and multi-site work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from labgate.errors import BadRequest, Conflict

if TYPE_CHECKING:
    from labgate.agent.link import SiteLink
    from labgate.tools.catalog import Tool


def choose_site(links: Mapping[str, SiteLink], tool: Tool, wanted: str | None) -> str:
    """The name of the site that will run ``tool``."""
    if wanted is not None:
        if wanted not in links:
            raise BadRequest(f"no site called {wanted!r}", code="unknown_site")
        candidates = [wanted]
    else:
        candidates = sorted(links)
    reasons = []
    for name in candidates:
        reason = tool.unavailable_reason(links[name].backend)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise Conflict(
        f"tool {tool.name!r} cannot run on any site ({'; '.join(reasons) or 'no sites'})",
        code="tool_unavailable",
    )
