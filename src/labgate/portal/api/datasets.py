"""Datasets: register, list and search, show, update, delete; replicas; inventory pushes.

Identifiers in paths may be given in any spelling the normalizer accepts
(``/datasets/doi:10.5281/zenodo.1``, ``/datasets/https://doi.org/10.5281/…``);
they are matched by their canonical form.

Who may do what: everyone signed in reads; registering a dataset needs
``datasets:write`` and the data-provider role (``users.data_provider``,
granted by an admin) or being an admin, because a dataset's title and landing
page are shown to everyone and its identifier can be taken only once;
``datasets:write`` also updates or deletes what its holder registered
(admins: anything); ``sites:report`` (admins' scope) says what sites hold:
replicas and inventory pushes, because a replica decides what gets mounted
into other users' tools. Sites have no owners in labgate (they are settings),
so no other role may say what a site holds.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import live_sites
from labgate.db.models import Dataset, User
from labgate.errors import Forbidden
from labgate.portal.auth import Caller, Principal, require
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.resolver import inventory, registry
from labgate.resolver.locality import DataLocator, dataset_out
from labgate.resolver.schemas import (
    DatasetIn,
    DatasetOut,
    DatasetPatch,
    InventoryIn,
    InventoryOut,
    Rejected,
    ReplicaIn,
    ReplicaOut,
)
from labgate.types import MAX_INT

router = APIRouter(tags=["datasets"])


def locator(portal: Portal) -> DataLocator:
    """The portal's dataset locator."""
    data = portal.instances.data
    if data is None:
        raise RuntimeError("the portal runs without a data locator")
    return data


def _show(portal: Portal, session: Session, dataset: Dataset) -> DatasetOut:
    owner = session.scalar(select(User.name).where(User.id == dataset.owner_id))
    replicas = locator(portal).replicas_of(session, [dataset.id], live_sites(portal.links))
    return dataset_out(dataset, owner, replicas[dataset.id])


def _may_register(session: Session, caller: Principal) -> None:
    """Refuse (403 ``not_data_provider``) a caller who is neither a data provider nor an admin."""
    if caller.is_admin and "admin" in caller.scopes:
        return
    user = session.get(User, caller.user_id)
    if user is None or not user.data_provider:
        raise Forbidden(
            "registering datasets needs the data-provider role; ask an admin to grant it "
            "(labgate user data-provider NAME)",
            code="not_data_provider",
        )


def _may_change(caller: Principal, dataset: Dataset) -> None:
    if dataset.owner_id is None or not caller.can_manage(dataset.owner_id):
        raise Forbidden(
            f"only the user who registered {dataset.identifier!r} or an admin may change it"
        )


@router.get("/datasets", response_model=list[DatasetOut])
async def list_datasets(
    response: Response,
    caller: Caller,
    portal: Portal = Depends(get_portal),
    q: str | None = Query(None, max_length=2048, description="Part of an id, title or name."),
    site: str | None = Query(None, max_length=64, description="Only datasets held there."),
    scheme: str | None = Query(None, pattern="^(doi|hdl|ark|urn|url)$"),
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT),
) -> list[DatasetOut]:
    """Datasets by identifier, filtered; the total is in ``X-Total-Count``."""

    def query(session: Session) -> tuple[list[DatasetOut], int]:
        rows, total = registry.search(
            session, query=q, site=site, scheme=scheme, limit=limit, offset=offset
        )
        owners = dict(
            session.execute(
                select(User.id, User.name).where(User.id.in_({r.owner_id for r in rows}))
            ).all()
        )
        replicas = locator(portal).replicas_of(
            session, [r.id for r in rows], live_sites(portal.links)
        )
        out = [dataset_out(r, owners.get(r.owner_id or 0), replicas[r.id]) for r in rows]
        return out, total

    rows, total = await portal.run_db(query)
    response.headers["X-Total-Count"] = str(total)
    return rows


@router.post("/datasets", response_model=DatasetOut, status_code=201, responses=errors(404, 409))
async def register_dataset(
    body: DatasetIn,
    caller: Principal = require("datasets:write"),
    portal: Portal = Depends(get_portal),
) -> DatasetOut:
    """Register a dataset (data providers and admins); replicas with it need ``sites:report``."""
    if body.replicas:
        caller.require("sites:report")

    def write(session: Session) -> DatasetOut:
        _may_register(session, caller)
        dataset = registry.register(session, caller.user_id, body)
        return _show(portal, session, dataset)

    return await portal.run_db(write)


@router.put(
    "/datasets/{identifier:path}/replicas/{site}",
    response_model=ReplicaOut,
    responses=errors(409),
)
async def put_replica(
    identifier: str,
    site: str,
    body: ReplicaIn,
    caller: Principal = require("sites:report"),
    portal: Portal = Depends(get_portal),
) -> ReplicaOut:
    """Add or replace the replica of a dataset on a site."""

    def write(session: Session) -> ReplicaOut:
        dataset = registry.require_dataset(session, identifier)
        registry.put_replica(session, dataset, site, body)
        views = locator(portal).replicas_of(session, [dataset.id], live_sites(portal.links))
        return next(v for v in views[dataset.id] if v.site == site).out()

    return await portal.run_db(write)


@router.delete(
    "/datasets/{identifier:path}/replicas/{site}", status_code=204, responses=errors(400)
)
async def delete_replica(
    identifier: str,
    site: str,
    caller: Principal = require("sites:report"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Forget the replica of a dataset on a site."""

    def write(session: Session) -> None:
        registry.remove_replica(session, registry.require_dataset(session, identifier), site)

    await portal.run_db(write)
    return Response(status_code=204)


@router.get("/datasets/{identifier:path}", response_model=DatasetOut, responses=errors(400))
async def show_dataset(
    identifier: str, caller: Caller, portal: Portal = Depends(get_portal)
) -> DatasetOut:
    """One dataset with its replicas and whether each is live."""
    return await portal.run_db(lambda s: _show(portal, s, registry.require_dataset(s, identifier)))


@router.patch("/datasets/{identifier:path}", response_model=DatasetOut)
async def update_dataset(
    identifier: str,
    body: DatasetPatch,
    caller: Principal = require("datasets:write"),
    portal: Portal = Depends(get_portal),
) -> DatasetOut:
    """Change a dataset's metadata (its registrant or an admin)."""

    def write(session: Session) -> DatasetOut:
        dataset = registry.require_dataset(session, identifier)
        _may_change(caller, dataset)
        return _show(portal, session, registry.update_dataset(session, dataset, body))

    return await portal.run_db(write)


@router.delete("/datasets/{identifier:path}", status_code=204, responses=errors(400))
async def delete_dataset(
    identifier: str,
    caller: Principal = require("datasets:write"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Delete a dataset and its replicas (its registrant or an admin)."""

    def write(session: Session) -> None:
        dataset = registry.require_dataset(session, identifier)
        _may_change(caller, dataset)
        registry.delete_dataset(session, dataset)

    await portal.run_db(write)
    return Response(status_code=204)


@router.post("/sites/{site}/inventory", response_model=InventoryOut)
async def push_inventory(
    site: str,
    body: InventoryIn,
    caller: Principal = require("sites:report"),
    portal: Portal = Depends(get_portal),
) -> InventoryOut:
    """A site reports what it holds (or one part of it); see docs/datasets.md."""
    ttl = body.ttl if body.ttl is not None else portal.settings.site_report_ttl

    def write(session: Session) -> InventoryOut:
        row = registry.require_site(session, site)
        result = inventory.push(
            session,
            row,
            body.replicas,
            mode=body.mode,
            push_id=body.push,
            final=body.final,
            ttl=ttl,
            reporter=caller.name,
            owner_id=caller.user_id,
        )
        return InventoryOut(
            site=site,
            push=body.push,
            received=result.received,
            added=result.added,
            updated=result.updated,
            datasets_created=result.datasets_created,
            removed=result.removed,
            rejected=[Rejected(id=i, reason=r) for i, r in result.rejected],
            rejected_count=result.rejected_count,
            final=body.final,
            replicas=result.replicas,
            reported_at=result.reported_at,
            ttl=result.ttl,
        )

    return await portal.run_db(write)
