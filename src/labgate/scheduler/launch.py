"""The launch pipeline: one user launch, its steps in order, in one place.

::

    tool and resources   the catalog entry (a snapshot names it) and resolve_resources
    ── in one admission transaction (capacity is counted and taken at once) ──
    1. admit             quotas.admit: the user's and the group's limits      (admit)
    2. resolve data      resolver.locality.DataLocator.need                   (resolve_data)
    3. claim warm        pools.PoolManager.take: a running pool instance      (WarmPools.take)
       or choose site    placement.choose_site over site views, a snapshot's  (choose)
       and record        the pending instance, its usage record and event     (record)
                         (``queued`` when the site's start queue has others
                         waiting or no room: labgate.scheduler.startqueue)
    ── after it commits ──
    4. bind or start     a claim binds the user's workspace at the site; a
                         failed claim admits again, cold; a cold launch starts
                         through the instance manager (the site link), or
                         waits in its site's start queue

Each step is a function of its own module that takes what it needs and returns
a value; none calls back into the pipeline. :func:`launch` is driven by
:class:`~labgate.scheduler.instances.InstanceManager`, which hands itself in as
:class:`~labgate.scheduler.control.InstanceControl`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink, live_sites
from labgate.db.models import Group, Instance, InstanceEvent, InstanceState, Site, User
from labgate.errors import BadRequest, NotFound, Unprocessable
from labgate.scheduler import accounting, images, quotas, startqueue
from labgate.scheduler.group_volumes import group_mounts
from labgate.scheduler.placement import Placement, choose_site
from labgate.scheduler.sites import site_views
from labgate.scheduler.snapshots import sites_for_snapshot, snapshot_to_launch
from labgate.security import SecretBox, new_id
from labgate.tools.params import ParamError, resolve_params
from labgate.units import format_size, parse_size
from labgate.wire.launch import Resources

if TYPE_CHECKING:
    from labgate.resolver.locality import DataLocator, DataNeed
    from labgate.scheduler.control import InstanceControl
    from labgate.tools.catalog import Catalog, Tool


@dataclass(frozen=True)
class LaunchRequest:
    """A validated launch."""

    tool: str
    resources: dict[str, Any] | None = None
    site: str | None = None
    #: A dataset identifier: the launch runs where a live replica is, with it mounted.
    dataset: str | None = None
    #: Labels the site must carry.
    labels: dict[str, str] | None = None
    #: A snapshot id: start from it (its tool, its image or workspace archive).
    snapshot: str | None = None
    #: The group to charge (quotas, accounting); None: the first of the user's that admits it.
    group: str | None = None
    #: Choices among the site's allowed values (Slurm: partition, time...); the site checks them.
    options: dict[str, str] | None = None
    #: A container image from the tool's allowlist (labgate.scheduler.images).
    image: str | None = None
    #: Values of the tool's launch parameters, by name; checked against the tool's declarations.
    params: dict[str, Any] | None = None


class WarmPools(Protocol):
    """The warm pools as the pipeline uses them (:class:`labgate.scheduler.pools.PoolManager`)."""

    def matches(self, tool: Tool, request: LaunchRequest, resources: Resources) -> bool:
        """Whether a launch could be served from a pool."""
        ...

    def take(
        self, session: Session, user: User, tool: Tool, group: Group | None
    ) -> Instance | None:
        """Give a ready pool instance to ``user`` (in the admission transaction)."""
        ...

    async def bind(self, instance: Instance) -> Instance | None:
        """Finish a claim at the site; None when it could not."""
        ...


@dataclass(frozen=True)
class Admission:
    """What the in-transaction steps need, fixed for one launch."""

    user_id: int
    tool: Tool
    request: LaunchRequest
    resources: Resources
    #: The user's limits where they have none of their own.
    defaults: quotas.Limits
    #: The sites with a link (live for placement and data).
    sites: Collection[str]
    box: SecretBox
    data: DataLocator | None = None
    #: Set when the launch may be served from a warm pool.
    pools: WarmPools | None = None
    #: The tools (their start costs, for the site's start queue); None: no start queue.
    catalog: Catalog | None = None
    #: The tool's launch parameters, checked (every one has its value).
    params: dict[str, str] = field(default_factory=dict)
    #: The sites' links: each says which tools it can run (placement).
    links: Mapping[str, SiteLink] = field(default_factory=dict)


# --- the pipeline ------------------------------------------------------------------
async def launch(
    control: InstanceControl,
    user_id: int,
    request: LaunchRequest,
    *,
    defaults: quotas.Limits,
    data: DataLocator | None,
    pools: WarmPools | None,
) -> Instance:
    """Admit, record and start a launch; returns the ``pending`` (or claimed) instance."""
    if (snapshot_id := request.snapshot) is not None:
        # The snapshot names the tool; it must be the user's (or shared) and ready.
        name = await control.run_db(
            lambda s: snapshot_to_launch(s, snapshot_id, user_id, request.tool).tool
        )
        request = replace(request, tool=name)
    tool = control.catalog.get(request.tool)
    if tool is None:
        raise NotFound(f"no tool called {request.tool!r}", code="unknown_tool")
    resources = resolve_resources(tool, request.resources)
    params = check_params(tool, request.params)
    warm = None
    if pools is not None and not request.params and pools.matches(tool, request, resources):
        warm = pools  # a pool instance started with the defaults: asked for more, start cold
    admission = Admission(
        user_id,
        tool,
        request,
        resources,
        defaults,
        live_sites(control.links),
        control.box,
        data,
        warm,
        control.catalog,
        params,
        control.links,
    )
    instance = await control.run_admission(lambda s: admit_launch(s, admission))
    if warm is not None and instance.state == InstanceState.running:
        # Claimed from a warm pool: hand it the user's workspace, else start cold.
        claimed = await warm.bind(instance)
        if claimed is not None:
            return claimed
        cold = replace(admission, pools=None)
        instance = await control.run_admission(lambda s: admit_launch(s, cold))
    if instance.state == InstanceState.queued:
        control.enqueued(instance)
    else:
        control.start_admitted(instance.id)
    return instance


def admit_launch(session: Session, admission: Admission) -> Instance:
    """Steps 1-3 in the admission transaction: the claimed or newly recorded instance."""
    user, group = admit(session, admission)
    images.check_choice(session, admission.tool, user, admission.request.image)
    need = resolve_data(session, admission.data, admission.request.dataset, admission.sites)
    if admission.pools is not None:
        # A pool instance already has its site and its place in that site's capacity.
        claimed = admission.pools.take(session, user, admission.tool, group)
        if claimed is not None:
            return claimed
    site = choose(session, admission, need)
    return record(session, admission, user, group, site, need)


# --- the steps ---------------------------------------------------------------------
def admit(session: Session, admission: Admission) -> tuple[User, Group | None]:
    """Step 1: the user (row-locked) and the group charged, or QuotaExceeded."""
    # The row lock orders one user's launches on PostgreSQL; the admission lock
    # orders everyone's, so the count and the insert commit before the next count.
    user = session.execute(
        select(User).where(User.id == admission.user_id).with_for_update()
    ).scalar_one()
    group = quotas.admit(
        session, admission.defaults, user, admission.resources, admission.request.group
    )
    return user, group


def resolve_data(
    session: Session, data: DataLocator | None, dataset: str | None, sites: Collection[str]
) -> DataNeed | None:
    """Step 2: what the launch's dataset needs (holders, mount, fetch), or None."""
    if dataset is None:
        return None
    if data is None:
        raise BadRequest("datasets are not enabled on this portal")
    return data.need(session, dataset, live=sites)


def choose(session: Session, admission: Admission, need: DataNeed | None) -> str:
    """Step 3: the site, by placement over the sites' views (a snapshot's sites only)."""
    request = admission.request
    placement = Placement(
        tool=admission.tool,
        resources=admission.resources,
        wanted=request.site,
        labels=request.labels or {},
        holders=need.holders if need is not None and need.holders else None,
    )
    views = images.sites_for_image(
        site_views(session, admission.sites, admission.links), request.image
    )
    if request.snapshot is not None:
        snapshot = snapshot_to_launch(
            session, request.snapshot, admission.user_id, admission.tool.name
        )
        views = sites_for_snapshot(snapshot, views, request.site)
    return choose_site(views, placement)


def record(
    session: Session,
    admission: Admission,
    user: User,
    group: Group | None,
    site: str,
    need: DataNeed | None,
) -> Instance:
    """Step 3 (cold): the ``pending`` instance on ``site``, its usage record and event."""
    request = admission.request
    instance_id = new_id()
    site_row = session.scalar(select(Site).where(Site.name == site))
    catalog = admission.catalog
    queued = (
        site_row is not None
        and catalog is not None
        and startqueue.must_queue(session, site_row, admission.tool, catalog)
    )
    state = InstanceState.queued if queued else InstanceState.pending
    instance = Instance(
        id=instance_id,
        owner_id=user.id,
        tool=admission.tool.name,
        site=site_row,
        state=state,
        resources=admission.resources.as_json(),
        secret=admission.box.new_secret(instance_id),
        dataset_id=need.dataset_id if need is not None else None,
        mounts=([need.mount_on(site)] if need is not None else [])
        + group_mounts(session, user, site_row),
        snapshot_id=request.snapshot,
        options=dict(request.options or {}),
        image=request.image or "",
        params=dict(admission.params),
    )
    session.add(instance)
    accounting.open_record(session, instance, user, group.name if group else "")
    near = f", next to {need.identifier}" if need is not None and need.holders else ""
    wait = ": waiting in its start queue" if queued else ""
    session.add(
        InstanceEvent(
            instance=instance,
            state=state,
            message=f"scheduled on site {site}{near}{wait}",
            data={"site": site},
        )
    )
    session.flush()
    session.refresh(instance, ["owner", "site"])
    return instance


def check_params(tool: Tool, given: dict[str, Any] | None) -> dict[str, str]:
    """The tool's launch parameters checked (defaults filled in); 422 naming a bad one."""
    try:
        return resolve_params(tool.params, given)
    except ParamError as exc:
        raise Unprocessable(str(exc), code="invalid_param", param=exc.name) from None


#: The least CPU an instance may ask for: below it a container engine reads the limit
#: (nanocpus, rounded down to 0) as none at all.
MIN_CPU = 0.01
#: The least memory an instance may ask for (no tool starts in less).
MIN_MEMORY = 16 * 1024 * 1024


def resolve_resources(tool: Tool, requested: dict[str, Any] | None) -> Resources:
    """The tool's defaults overridden by ``requested``, within the tool's maxima."""
    limits = tool.resources
    cpu, memory = limits.cpu, limits.memory
    if requested:
        unknown = set(requested) - {"cpu", "memory"}
        if unknown:
            raise BadRequest(
                f"unknown resources: {', '.join(sorted(unknown))} (known: cpu, memory)"
            )
        if requested.get("cpu") is not None:
            value = requested["cpu"]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < MIN_CPU
            ):
                raise BadRequest(
                    f"resources.cpu must be a positive number of cores, at least {MIN_CPU:g}"
                )
            cpu = float(value)
        if requested.get("memory") is not None:
            try:
                memory = parse_size(requested["memory"])
            except ValueError as exc:
                raise BadRequest(f"resources.memory: {exc}") from None
            if memory < MIN_MEMORY:
                raise BadRequest(f"resources.memory must be at least {format_size(MIN_MEMORY)}")
    if cpu > limits.max_cpu:
        raise BadRequest(f"{tool.name} allows at most {limits.max_cpu:g} CPUs, asked for {cpu:g}")
    if memory > limits.max_memory:
        raise BadRequest(
            f"{tool.name} allows at most {format_size(limits.max_memory)} of memory, "
            f"asked for {format_size(memory)}"
        )
    return Resources(cpu=cpu, memory=memory)


__all__ = [
    "Admission",
    "LaunchRequest",
    "WarmPools",
    "admit",
    "admit_launch",
    "check_params",
    "choose",
    "launch",
    "record",
    "resolve_data",
    "resolve_resources",
]
