"""The sites as placement and the API see them: capacity, use, labels, liveness.

Capacity and the data root come from the ``sites`` rows (written from the
settings on start), use from the resources of the active instances on each
site, liveness from the portal's site links: a site without a link (removed
from the settings, or an agent that is not connected) is not live.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import ACTIVE_STATES, Instance, Site
from labgate.scheduler.placement import SiteView, Usage

if TYPE_CHECKING:
    from labgate.agent.link import SiteLink


def capacity_of(site: Site) -> Usage:
    """A site's capacity as recorded in its options (0 = unlimited)."""
    raw: dict[str, Any] = (site.options or {}).get("capacity") or {}
    return Usage(
        cpu=float(raw.get("cpu") or 0),
        memory=int(raw.get("memory") or 0),
        instances=int(raw.get("max_instances") or 0),
    )


def data_root_of(site: Site) -> str | None:
    """The directory under which a site's replicas live, if it has one."""
    root = (site.options or {}).get("data_root")
    return str(root) if root else None


def usage_by_site(session: Session) -> dict[int, Usage]:
    """CPU, memory and instance count of the active instances, per site id."""
    totals: dict[int, Usage] = {}
    rows = session.execute(
        select(Instance.site_id, Instance.resources).where(
            Instance.state.in_(ACTIVE_STATES), Instance.site_id.is_not(None)
        )
    )
    for site_id, resources in rows:
        current = totals.get(site_id, Usage())
        res = resources or {}
        totals[site_id] = Usage(
            current.cpu + float(res.get("cpu") or 0),
            current.memory + int(res.get("memory") or 0),
            current.instances + 1,
        )
    return totals


def site_views(
    session: Session, live: Collection[str], links: Mapping[str, SiteLink] | None = None
) -> list[SiteView]:
    """Every recorded site, as :func:`~labgate.scheduler.placement.choose_site` sees it.

    With ``links``, a site with a link says itself which tools it can run
    (:meth:`SiteLink.placement_reason`: a missing program, an image it cannot
    get); otherwise its backend answers from the tools' definitions.
    """
    use = usage_by_site(session)
    links = links or {}
    return [
        SiteView(
            name=site.name,
            backend=site.backend,
            live=site.name in live,
            labels={str(k): str(v) for k, v in (site.labels or {}).items()},
            capacity=capacity_of(site),
            used=use.get(site.id, Usage()),
            unavailable=links[site.name].placement_reason if site.name in links else None,
        )
        for site in session.scalars(select(Site).order_by(Site.name))
    ]
