"""What a user may choose at launch on a site (a launch's ``options``), checked at once.

A site's backend says what may be chosen (:meth:`~labgate.backends.base.Backend.launch_choices`:
per name its ``default`` and ``allowed`` values; Slurm's partition, gres, time...).
A launch that names its site has its options checked here against those, so a
refused value is a 422 ``invalid_option`` naming it while the user is still at
the form, not a failed start later; the site checks them again when it starts
the instance (a wall time within ``max`` with no list, which only it can judge).
The web launch form offers the same choices, per site that can run the tool.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Site, SiteKind
from labgate.errors import Unprocessable
from labgate.portal.api.sites import BACKEND_OPTIONS, launch_choices
from labgate.portal.state import Portal
from labgate.tools.catalog import Tool


def choices_of(portal: Portal, site: Site) -> dict[str, Any]:
    """What users may choose at launch on ``site``, in its backend's words."""
    network = site.kind == SiteKind.network
    options = (site.options or {}).get(BACKEND_OPTIONS) or {}
    return launch_choices(portal, site.name, site.backend, options, network)


def check_options(portal: Portal, session: Session, site: str, chosen: dict[str, str]) -> None:
    """Refuse (422 ``invalid_option``) a choice ``site`` does not offer; an unknown site passes
    (placement says it is unknown)."""
    row = session.scalar(select(Site).where(Site.name == site))
    if row is None or not chosen:
        return
    offered = choices_of(portal, row)
    for name, value in chosen.items():
        choice = offered.get(name)
        if choice is None:
            names = ", ".join(n for n, c in offered.items() if c.get("allowed")) or "nothing"
            raise Unprocessable(
                f"{name} cannot be chosen on site {site} (choose: {names})",
                code="invalid_option",
                option=name,
            )
        allowed = [str(v) for v in choice.get("allowed") or []]
        if allowed and value not in allowed and value != str(choice.get("default", "")):
            raise Unprocessable(
                f"{name} {value!r} is not allowed on site {site} (allowed: {', '.join(allowed)})",
                code="invalid_option",
                option=name,
            )


def tool_sites(portal: Portal, session: Session, tool: Tool) -> list[dict[str, Any]]:
    """The sites that can run ``tool`` now, each with its choices that list values."""
    found = []
    for row in session.scalars(select(Site).order_by(Site.name)):
        link = portal.links.get(row.name)
        if link is None or link.unavailable_reason(tool) is not None:
            continue
        listed = {
            name: choice
            for name, choice in choices_of(portal, row).items()
            if choice.get("allowed")
        }
        found.append({"name": row.name, "choices": listed})
    return found
