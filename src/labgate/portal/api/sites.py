"""The sites: everyone reads them; admins add, change and remove network sites.

A site of the settings is ``local``: its agent runs in the portal's process
and only the settings change it. A ``network`` site is added here (or with
``labgate site add``): its agent runs on the site's own machine and dials out
to the portal with the enrolment token returned once by the add (or by a
rotation). Only the token's SHA-256 is stored; rotating or revoking it cuts
the agent's connection at once (:class:`~labgate.agent.hub.SiteHub`).

A network site's row keeps, in ``options``, what placement reads of every
site (``capacity``, ``data_root``) and the options of its backend
(``backend_options``), which its agent receives.

Removing a network site is refused while it has active instances (pending,
starting, running or stopping), ``force`` or not: stop them first (or, for
an agent gone for good, wait until they are ``lost``). It is refused too
while snapshots are stored at the site, unless ``force=true``: those
snapshots are then marked failed, since their data stays behind on the site.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import Field, ValidationInfo, field_validator
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labgate.agent.hub import SiteInfo
from labgate.backends.base import BackendNotFound
from labgate.backends.registry import backend_class
from labgate.db.models import (
    ACTIVE_STATES,
    Instance,
    InstanceState,
    Site,
    SiteKind,
    SiteReport,
    Snapshot,
    SnapshotState,
    utcnow,
)
from labgate.errors import BadRequest, Conflict, NotFound, Unprocessable
from labgate.portal.auth import Caller, Principal, require
from labgate.portal.openapi import errors
from labgate.portal.schemas import SiteOut, SiteStatus, SiteWithToken
from labgate.portal.state import Portal, get_portal
from labgate.resolver.inventory import report_view
from labgate.scheduler.placement import Usage
from labgate.scheduler.sites import capacity_of, data_root_of, usage_by_site
from labgate.scheduler.startqueue import start_capacity
from labgate.security import hash_token, new_site_token
from labgate.startup import options_problem
from labgate.types import Strict
from labgate.units import MAX_SIZE, parse_size

router = APIRouter(tags=["sites"])

SITE_NAME = r"^[a-z][a-z0-9-]{0,62}$"
#: Where a network site's backend options are kept in its row's ``options``.
BACKEND_OPTIONS = "backend_options"
#: Instances still holding something on their site: a site with any cannot go.
HOLDING_STATES = frozenset({*ACTIVE_STATES, InstanceState.stopping})


class CapacityIn(Strict):
    """What a site may run at once; 0 (or left out) means unlimited."""

    cpu: float = Field(0, ge=0, le=10**6, description="CPU cores in all.")
    memory: int = Field(0, ge=0, le=MAX_SIZE, description="Memory in all: bytes or 64G.")
    max_instances: int = Field(0, ge=0, le=10**6, description="Instances at once.")
    starts: float | None = Field(
        None,
        ge=0,
        le=10**6,
        description="Cores for starting tools at once (unset: the site's cores; 0: no queue).",
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() != "0":
            return parse_size(value)
        return 0 if isinstance(value, str) else value


class SiteIn(Strict):
    """A new network site."""

    name: str = Field(pattern=SITE_NAME, description="Lower case, starts with a letter.")
    backend: str = Field(
        min_length=1, max_length=64, description="process, containers or another installed one."
    )
    reach: Literal["direct", "tunnel"] = Field(
        "tunnel", description="tunnel (through the agent's connection) or direct."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The backend's site options, checked by it."
    )
    capacity: CapacityIn = Field(default_factory=CapacityIn)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    data_root: str | None = Field(
        None, min_length=1, max_length=4096, description="Absolute path on the site's machine."
    )
    group_root: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Where its shared group volumes are (<group_root>/<group>): an absolute "
        "path on the site's machine.",
    )

    @field_validator("data_root", "group_root")
    @classmethod
    def _absolute(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"{info.field_name} must be an absolute path on the site's machine")
        return value


class SitePatch(Strict):
    """Changes to a network site; fields left out are kept."""

    reach: Literal["direct", "tunnel"] | None = None
    options: dict[str, Any] | None = Field(None, description="Replaces the backend's options.")
    capacity: CapacityIn | None = Field(
        None, description="Changes the capacity's figures given; the others are kept."
    )
    labels: dict[str, str] | None = Field(None, max_length=64, description="Replaces the labels.")
    group_root: str | None = Field(
        None,
        max_length=4096,
        description="Replaces where its shared group volumes are (an absolute path on the "
        "site's machine; empty: none). A connected agent lists the new one from its next "
        "heartbeat.",
    )

    @field_validator("group_root")
    @classmethod
    def _absolute_or_none(cls, value: str | None) -> str | None:
        if value and not value.startswith("/"):
            raise ValueError("group_root must be an absolute path on the site's machine")
        return value


def site_info(site: Site) -> SiteInfo:
    """What the portal tells ``site``'s agent about it in a welcome."""
    options = dict(site.options or {})
    return SiteInfo(
        name=site.name,
        backend=site.backend,
        options=dict(options.get(BACKEND_OPTIONS) or {}),
        data_root=options.get("data_root"),
        group_root=options.get("group_root"),
        reach=site.reach,
    )


# --- reading -------------------------------------------------------------------------------


def site_status(site: Site) -> SiteStatus:
    """``local``, or a network site's ``connected``/``disconnected``/``waiting``/``revoked``."""
    if site.kind != SiteKind.network:
        return "local"
    if site.token_hash is None:
        return "revoked"
    if site.connected_at is not None:
        return "connected"
    if site.disconnected_at is not None:
        return "disconnected"
    return "waiting"


def site_out(
    portal: Portal,
    site: Site,
    used: Usage,
    report: SiteReport | None,
    now: datetime,
    *,
    admin: bool,
) -> SiteOut:
    """The API's view of a site; what its agent said and its options only for admins."""
    cap = capacity_of(site)
    link = portal.links.get(site.name)
    network = site.kind == SiteKind.network
    backend_options = (site.options or {}).get(BACKEND_OPTIONS) or {}
    return SiteOut(
        name=site.name,
        backend=site.backend,
        instances=used.instances,
        labels=site.labels,
        live=link.live if link is not None else False,
        capacity={"cpu": cap.cpu, "memory": cap.memory, "max_instances": cap.instances},
        start_capacity=start_capacity(site) or 0,
        use={"cpu": used.cpu, "memory": used.memory, "instances": used.instances},
        data_root=data_root_of(site),
        group_root=(site.options or {}).get("group_root"),
        inventory=report_view(report, now),
        kind=SiteKind.network.value if network else SiteKind.local.value,
        reach="tunnel" if site.reach == "tunnel" else "direct",
        status=site_status(site),
        connected_since=site.connected_at,
        disconnected_since=site.disconnected_at,
        last_heartbeat=site.last_seen_at,
        agent_version=site.agent_version,
        agent=dict(site.agent_info or {}) if admin else None,
        token_issued_at=site.token_issued_at if admin else None,
        options=dict(backend_options) if admin and network else None,
        choices=launch_choices(portal, site.name, site.backend, backend_options, network),
    )


def launch_choices(
    portal: Portal, name: str, backend: str, options: dict[str, Any], network: bool
) -> dict[str, Any]:
    """What users may choose at launch on a site, in its backend's words (none if unknown)."""
    if not network:  # a site of the settings: its options are there
        config = next((s for s in portal.local_sites if s.name == name), None)
        options = config.options if config is not None else {}
    try:
        return backend_class(backend).launch_choices(options)
    except (BackendNotFound, ImportError):
        return {}


def one_site_out(portal: Portal, session: Session, site: Site, *, admin: bool) -> SiteOut:
    """:func:`site_out` of one site, its use and inventory read here."""
    used = usage_by_site(session).get(site.id, Usage())
    return site_out(portal, site, used, session.get(SiteReport, site.id), utcnow(), admin=admin)


def get_site(session: Session, name: str) -> Site:
    """The site called ``name``; 404 otherwise."""
    site = session.scalar(select(Site).where(Site.name == name))
    if site is None:
        raise NotFound(f"no site called {name!r}", code="unknown_site")
    return site


def network_site(session: Session, name: str, doing: str) -> Site:
    """The network site called ``name``; 409 for a site of the settings."""
    site = get_site(session, name)
    if site.kind != SiteKind.network:
        raise Conflict(
            f"cannot {doing} site {name!r}: it comes from the settings (its agent runs in the "
            "portal); change it there",
            code="local_site",
        )
    return site


def check_backend(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """The backend exists here and takes ``options``; 400 or 422 naming the problem."""
    try:
        cls = backend_class(backend)
    except ImportError as exc:
        raise BadRequest(
            f"backend {backend!r} cannot be loaded here: {exc}", code="unknown_backend"
        ) from None
    # BackendNotFound is itself a 400 unknown_backend, naming the installed ones.
    try:
        cls.parse_options(options)
    except ValueError as exc:
        raise Unprocessable(
            f"{backend} backend: {options_problem(exc)}", code="invalid_options"
        ) from None
    return dict(options)


@router.get("/sites", response_model=list[SiteOut])
async def list_sites(caller: Caller, portal: Portal = Depends(get_portal)) -> list[SiteOut]:
    """The sites: kind, status, capacity, use, labels, liveness and their last inventory push."""
    admin = caller.has("admin")

    def query(session: Session) -> list[SiteOut]:
        use = usage_by_site(session)
        reports = {r.site_id: r for r in session.scalars(select(SiteReport))}
        now = utcnow()
        return [
            site_out(portal, s, use.get(s.id, Usage()), reports.get(s.id), now, admin=admin)
            for s in session.scalars(select(Site).order_by(Site.name))
        ]

    return await portal.run_db(query)


@router.get("/sites/{name}", response_model=SiteOut)
async def show_site(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> SiteOut:
    """One site."""
    admin = caller.has("admin")
    return await portal.run_db(lambda s: one_site_out(portal, s, get_site(s, name), admin=admin))


# --- changing (admins) ---------------------------------------------------------------------


def _with_token(out: SiteOut, token: str) -> SiteWithToken:
    return SiteWithToken(**out.model_dump(), token=token)


@router.post("/sites", response_model=SiteWithToken, status_code=201, responses=errors(409))
async def add_site(
    body: SiteIn, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> SiteWithToken:
    """Add a network site (admins); its agent's enrolment token is returned only this once."""
    options = check_backend(body.backend, body.options)
    token = new_site_token()
    exists = Conflict(f"a site called {body.name!r} exists", code="site_exists")
    if any(site.name == body.name for site in portal.local_sites):
        raise exists

    def create(session: Session) -> SiteOut:
        if session.scalar(select(Site.id).where(Site.name == body.name)) is not None:
            raise exists
        site = Site(
            name=body.name,
            backend=body.backend,
            kind=SiteKind.network.value,
            reach=body.reach,
            labels=dict(body.labels),
            options={
                "capacity": body.capacity.model_dump(),
                "data_root": body.data_root,
                "group_root": body.group_root,
                BACKEND_OPTIONS: options,
            },
            token_hash=hash_token(token),
            token_issued_at=utcnow(),
        )
        session.add(site)
        try:
            session.flush()
        except IntegrityError:
            raise exists from None
        return one_site_out(portal, session, site, admin=True)

    out = await portal.run_db(create)
    if portal.site_hub is not None:
        await portal.site_hub.register(body.name, body.backend, body.reach)
    return _with_token(out, token)


@router.patch("/sites/{name}", response_model=SiteOut, responses=errors(409))
async def change_site(
    name: str,
    body: SitePatch,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> SiteOut:
    """Change a network site's reach, backend options, capacity, labels or group root (admins)."""

    def change(session: Session) -> tuple[SiteOut, SiteInfo | None, str | None]:
        site = network_site(session, name, "change")
        options = dict(site.options or {})
        told = False  # something the agent's welcome carries changed
        if body.options is not None:
            options[BACKEND_OPTIONS] = check_backend(site.backend, body.options)
            told = True
        if body.capacity is not None:
            given = body.capacity.model_dump(include=body.capacity.model_fields_set)
            options["capacity"] = {**(options.get("capacity") or {}), **given}
        if body.group_root is not None and body.group_root != options.get("group_root"):
            options["group_root"] = body.group_root or None
            # What the agent listed was under the old root: no volume is mounted at the
            # site until it lists the new one (from its next heartbeat).
            site.agent_info = {**(site.agent_info or {}), "groups": None}
            told = True
        site.options = options
        if body.labels is not None:
            site.labels = dict(body.labels)
        reach = None
        if body.reach is not None and body.reach != site.reach:
            if body.reach == "direct":
                _refuse_if_on_sockets(session, site)
            site.reach = reach = body.reach
        session.flush()
        welcome = site_info(site) if told else None
        return one_site_out(portal, session, site, admin=True), welcome, reach

    out, welcome, reach = await portal.run_db(change)
    if reach is not None and portal.site_hub is not None:
        # Its routes take the new way now, and a connected agent reconnects to be set up
        # for it (other replicas follow at their next sync of the sites).
        await portal.site_hub.register(name, out.backend, reach)
    if welcome is not None and portal.site_hub is not None:
        # A connected agent takes the new settings now (its group root; it logs what
        # needs its restart); one connected to another replica, when it next connects.
        await portal.site_hub.reconfigure(welcome)
    return out


def _refuse_if_on_sockets(session: Session, site: Site) -> None:
    """Refuse to reach ``site`` directly while instances of it listen on Unix sockets.

    Its tools at a tunneled site may listen on sockets only its agent
    reaches (docs/sites.md); the router could not reach them directly.
    """
    ids = session.scalars(
        select(Instance.id)
        .where(Instance.site_id == site.id)
        .where(Instance.state.in_(ACTIVE_STATES))
        .where(Instance.endpoint.startswith("unix:"))
        .order_by(Instance.created_at)
    ).all()
    if ids:
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        raise Conflict(
            f"{len(ids)} instance(s) of site {site.name!r} listen on Unix sockets, which the "
            f"router reaches only through the site's tunnel: {shown}; stop them first",
            code="instances_on_sockets",
        )


@router.post("/sites/{name}/token", response_model=SiteWithToken, responses=errors(409))
async def rotate_token(
    name: str, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> SiteWithToken:
    """Give a network site a new enrolment token (admins); the old one stops working now."""
    token = new_site_token()

    def rotate(session: Session) -> SiteOut:
        site = network_site(session, name, "give a token to")
        site.token_hash = hash_token(token)
        site.token_issued_at = utcnow()
        session.flush()
        return one_site_out(portal, session, site, admin=True)

    out = await portal.run_db(rotate)
    if portal.site_hub is not None:
        await portal.site_hub.cut(name, "its token was rotated")
    return _with_token(out, token)


@router.delete("/sites/{name}/token", status_code=204, responses=errors(409))
async def revoke_token(
    name: str, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> Response:
    """Revoke a network site's token (admins): its agent is cut off until a new one is made."""

    def revoke(session: Session) -> None:
        site = network_site(session, name, "revoke the token of")
        site.token_hash = None
        site.token_issued_at = None

    await portal.run_db(revoke)
    if portal.site_hub is not None:
        await portal.site_hub.cut(name, "its token was revoked")
    return Response(status_code=204)


@router.delete("/sites/{name}", status_code=204, responses=errors(409))
async def remove_site(
    name: str,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
    force: bool = Query(
        False, description="Also give up the snapshots stored at the site (marked failed)."
    ),
) -> Response:
    """Remove a network site (admins); refused while instances are active on it.

    Snapshots stored at the site refuse it too, unless ``force``: they are then
    marked failed. Ended instances keep their history, without the site.
    """

    def remove(session: Session) -> None:
        site = network_site(session, name, "remove")
        active = session.scalar(
            select(func.count(Instance.id)).where(
                Instance.site_id == site.id, Instance.state.in_(HOLDING_STATES)
            )
        )
        if active:
            raise Conflict(
                f"site {name!r} has {active} active instance(s); stop them first "
                "(force does not override this)",
                code="site_in_use",
            )
        snapshots = select(Snapshot.id).where(
            Snapshot.site_id == site.id, Snapshot.state != SnapshotState.failed
        )
        held = len(session.scalars(snapshots).all())
        if held and not force:
            raise Conflict(
                f"site {name!r} stores {held} snapshot(s); remove them first, or remove the "
                "site with force to mark them failed",
                code="site_has_snapshots",
            )
        session.execute(
            update(Snapshot)
            .where(Snapshot.site_id == site.id, Snapshot.state != SnapshotState.failed)
            .values(state=SnapshotState.failed, reason=f"its site {name!r} was removed")
        )
        session.execute(update(Snapshot).where(Snapshot.site_id == site.id).values(site_id=None))
        session.execute(update(Instance).where(Instance.site_id == site.id).values(site_id=None))
        session.delete(site)

    await portal.run_db(remove)
    if portal.site_hub is not None:
        await portal.site_hub.forget(name)
    return Response(status_code=204)
