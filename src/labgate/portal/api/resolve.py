"""``GET /resolve``: the dataset an identifier names, its live replicas, launch links.

The "data DNS" answer: any spelling of a DOI, Handle, ARK, URN or URL in,
the dataset's canonical record out, with the replicas placement may use now,
the ones it may not (and why), whether the dataset could be fetched into a
cache instead, and for each tool that can open it a ``/launch`` link.

It is two indexed queries (the dataset by its unique canonical identifier,
its replicas by dataset id); ``benchmarks/resolver.py`` measures it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from labgate.agent.link import live_sites
from labgate.portal.api.datasets import locator
from labgate.portal.auth import Caller
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.resolver.schemas import ResolveOut

router = APIRouter(tags=["datasets"])


def resolve_dataset(portal: Portal, session: Session, identifier: str) -> ResolveOut:
    """The resolve answer for ``identifier`` (the API and the benchmark call this)."""
    data = locator(portal)
    resolution = data.resolve(session, identifier, live_sites(portal.links))
    sites = {name: link.placement_reason for name, link in portal.links.items()}
    public_url = portal.settings.effective_public_url
    return ResolveOut(
        dataset=data.dataset_out(resolution),
        replicas=[r.out() for r in resolution.live],
        unavailable=[r.out() for r in resolution.replicas if not r.live],
        fetchable=not resolution.live and resolution.fetch_refusal is None,
        launch=data.launch_links(resolution, portal.catalog, sites, public_url),
    )


@router.get("/resolve", response_model=ResolveOut, responses=errors(400, 404))
async def resolve(
    caller: Caller,
    portal: Portal = Depends(get_portal),
    id: str = Query(
        ..., min_length=1, max_length=2048, description="DOI, Handle, ARK, URN or URL."
    ),
) -> ResolveOut:
    """Resolve an identifier: dataset, live replicas, and a launch link per tool."""
    return await portal.run_db(lambda s: resolve_dataset(portal, s, id))
