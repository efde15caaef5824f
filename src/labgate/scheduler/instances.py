"""The instance manager: launch, stop, reports from sites, restore after restart.

A launch runs the pipeline of :mod:`labgate.scheduler.launch`. The manager
owns every instance state transition. It writes each one, with its event, in
one transaction; refuses transitions the state machine does not allow (a late
``running`` report for an instance the user already stopped is dropped, not
applied); tells the route feed what changed; and wakes event stream readers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import select, text
from sqlalchemy.orm import Session, object_session

from labgate.agent.link import Adoption, SiteLink
from labgate.agent.network import SiteAway
from labgate.backends.base import LaunchSpec, Mount, Resources, mount_variables
from labgate.backends.identity import pool_identity_number
from labgate.db.models import (
    ACTIVE_STATES,
    TRANSITIONS,
    Instance,
    InstanceEvent,
    InstanceState,
    Site,
    SiteKind,
    utcnow,
    with_owner_and_site,
)
from labgate.db.session import Database
from labgate.errors import Conflict, LabgateError, NotFound
from labgate.scheduler import accounting, quotas
from labgate.scheduler.events import EventBus
from labgate.scheduler.images import groups_of
from labgate.scheduler.launch import LaunchRequest, WarmPools
from labgate.scheduler.launch import launch as launch_pipeline
from labgate.scheduler.snapshots import snapshot_ref
from labgate.scheduler.startqueue import Fairness, StartQueue
from labgate.security import SecretBox
from labgate.tools.catalog import Catalog
from labgate.tools.params import default_values, param_env
from labgate.wire.routes import parse_upstream
from labgate.wire.site import NEVER_STARTED, Report, start_failed

if TYPE_CHECKING:
    from labgate.resolver.locality import DataLocator

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The PostgreSQL advisory lock that orders admissions across portal processes ("lgad").
ADMISSION_LOCK_KEY = 0x6C676164


class RouteFeed(Protocol):
    """Who hears about instance changes (the router's route table)."""

    def instance_changed(self, instance: Instance) -> None:
        """An instance changed state, endpoint or access."""


class InstanceManager:
    """Launches, stops and tracks instances across the portal's sites."""

    def __init__(
        self,
        db: Database,
        catalog: Catalog,
        links: dict[str, SiteLink],
        *,
        max_instances_per_user: int,
        events: EventBus,
        box: SecretBox,
        routes: RouteFeed | None = None,
        data: DataLocator | None = None,
        fairness: Fairness = "user",
        own_hosts: bool = False,
    ) -> None:
        self.db = db
        #: Instances are served on their own host names (``instance_host``): tools at ``/``.
        self.own_hosts = own_hosts
        #: Seals instance secrets for the database and opens them for launch specs.
        self.box = box
        self.catalog = catalog
        self.links = links
        self.max_instances_per_user = max_instances_per_user
        self.events = events
        self.routes = routes
        #: Resolves a launch's dataset to replicas and mounts (labgate.resolver).
        self.data = data
        #: Per-user limits where a user has none of their own (labgate.scheduler.quotas);
        #: the instance limit is always ``max_instances_per_user``.
        self.default_limits = quotas.Limits()
        #: Warm pools a launch may claim from (labgate.scheduler.pools), set by the app.
        self.pools: WarmPools | None = None
        #: Environment every instance gets (e.g. LABGATE_API_URL), set by the app.
        self.extra_env: dict[str, str] = {}
        self._admission = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Where sites' reports on batch task attempts go (labgate.scheduler.runs), set by the app.
        self.task_reports: Callable[[Report, str | None], Awaitable[None]] | None = None
        #: When this process last sent each instance's stop to a connected site (monotonic).
        self.stops_sent: dict[str, float] = {}
        #: Each site's start queue (labgate.scheduler.startqueue).
        self.queue = StartQueue(self, fairness=fairness, notify=events.notify)

    async def run_db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction in a worker thread (:meth:`Database.transact`)."""
        return await self.db.run(fn)

    async def run_admission(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction that holds the admission lock until it commits.

        Admissions (quota checks, placement, warm-pool claims, pool refills)
        count what is held and then add to it; the next one may count only
        after that is committed, or two launches could both fit in the last
        slot, or claim the same warm instance. In one portal a thread lock
        orders them; on PostgreSQL a transaction-scoped advisory lock also
        orders them across portal processes sharing the database.
        """

        def locked(session: Session) -> T:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK_KEY}
                )
            return fn(session)

        def run() -> T:
            with self._admission:
                return self.db.transact(locked)

        return await asyncio.to_thread(run)

    # --- launch ------------------------------------------------------------
    async def launch(self, user_id: int, request: LaunchRequest) -> Instance:
        """Admit, record and start a launch (:mod:`labgate.scheduler.launch`)."""
        return await launch_pipeline(
            self, user_id, request, defaults=self.user_defaults(), data=self.data, pools=self.pools
        )

    def user_defaults(self) -> quotas.Limits:
        """The limits of a user without limits of their own."""
        return replace(self.default_limits, instances=self.max_instances_per_user)

    def enqueued(self, instance: Instance) -> None:
        """A launch was admitted ``queued``: its site's start queue starts it in turn."""
        self.changed(instance)  # routed already: its URL answers "starting", not 404

    def start_admitted(self, instance_id: str) -> None:
        """Start an admitted (``pending``) instance in the background."""
        self.events.notify(instance_id)
        self._spawn(self._start(instance_id))

    async def _start(self, instance_id: str) -> None:
        # A dataset no site holds is fetched into the chosen site's cache first.
        prepared = self.data is None or await self.data.prepare(
            self.db, instance_id, self.apply, self.links
        )
        if not prepared:
            return
        spec, site = await self.run_db(lambda s: self._launch_spec(s, instance_id))
        if spec is None or site is None:
            return
        link = self.links.get(site)
        if link is None:
            await self.apply(start_failed(instance_id, NEVER_STARTED, f"site {site} is gone"))
            return
        try:
            await link.launch(spec)
        except SiteAway as exc:
            # Its agent went away as the launch left: when it connects again the launch
            # is sent again, unless it holds it (liveness); the site's grace ends it.
            message = f"waiting for the agent of site {site} to connect again ({exc.detail})"
            await self.apply(Report(instance_id, "pending", kind="progress", message=message))
        except LabgateError as exc:
            # The site's agent refused, or did not answer: the launch ends here, with why.
            detail = f"site {site} did not start it: {exc.detail}"
            await self.apply(start_failed(instance_id, NEVER_STARTED, detail))

    def _launch_spec(
        self, session: Session, instance_id: str
    ) -> tuple[LaunchSpec | None, str | None]:
        instance = session.get(Instance, instance_id)
        if instance is None or instance.state != InstanceState.pending or instance.site is None:
            return None, None
        return self.spec_for(instance), instance.site.name

    def spec_for(self, instance: Instance) -> LaunchSpec:
        """The launch spec of a stored instance."""
        tool = self.catalog.get(instance.tool)
        if tool is None:
            raise NotFound(f"tool {instance.tool!r} is no longer in the catalog")
        # Relative: the site keeps workspaces where it chooses (SiteAgent.placed).
        workspace = Path(instance.owner.name)
        owner_id = instance.owner.id
        if instance.pool is not None:
            # Unclaimed: an empty workspace of its own; a claim brings the user's.
            workspace = Path("_pool", instance.id)
            if instance.pool_uid is not None:
                # Run as a uid of its own, not the _pool account's that every pool instance
                # (and so every claimer) would share (labgate.backends.identity).
                owner_id = pool_identity_number(instance.pool_uid)
        snapshot = snapshot_ref(instance.snapshot) if instance.snapshot is not None else None
        if snapshot is not None and snapshot.kind == "archive":
            # A workspace archive is restored into a new workspace of the instance's own.
            workspace = Path("_restored", instance.id)
        mounts = mounts_of(instance, current_groups(instance))
        # A warm-pool instance (or one from before the tool had parameters) has the defaults.
        params = {**default_values(tool.params), **(instance.params or {})}
        return LaunchSpec(
            instance_id=instance.id,
            owner=instance.owner.name,
            owner_id=owner_id,
            tool=tool,
            base_url="/" if self.own_hosts else f"/i/{instance.id}/",
            workspace=workspace,
            resources=Resources(**instance.resources),
            secret=self.box.open(instance.id, instance.secret) or "",
            mounts=mounts,
            snapshot=snapshot,
            options={str(k): str(v) for k, v in (instance.options or {}).items()},
            image=instance.image,
            params=params,
            # Where each mount is, for the tool; a backend that cannot mount at the
            # target (process without bwrap) points these at the host path instead.
            env={
                **self.extra_env,
                **mount_variables(mounts, lambda mount: mount.target),
                **param_env(params),
            },
        )

    # --- stop --------------------------------------------------------------
    async def stop(
        self,
        instance_id: str,
        *,
        reason: str = "stopped",
        message: str = "stop requested",
        fence: Callable[[Session], None] | None = None,
    ) -> Instance:
        """Ask the instance's site to stop it; returns it in ``stopping``.

        ``reason`` is the short word usage records keep (``stopped``, ``idle``,
        ``lifetime``...); ``message`` goes into the event stream. ``fence``
        runs first in the transaction that records the stop and may refuse it
        (the leader's lease, :mod:`labgate.scheduler.leader`).
        """

        def begin(session: Session) -> Instance:
            if fence is not None:
                fence(session)
            return self._begin_stop(session, instance_id, reason, message)

        instance = await self.run_db(begin)
        self.changed(instance)
        if instance.state.terminal:
            return instance  # it left the start queue: nothing ever reached its site
        link = self.links.get(instance.site.name) if instance.site else None
        if link is not None:
            # Even a pending instance may be inside backend.start right now:
            # the agent waits for that and stops whatever it started.
            self._spawn(self.stop_at_site(link, instance.id, instance.backend_state))
        elif instance.site is not None and instance.site.kind == SiteKind.network:
            # A network site another portal replica learnt of first: the replica its
            # agent is connected to sends the stop (labgate.scheduler.liveness).
            log.info("instance %s stays stopping until its site's agent gets the stop", instance.id)
        else:
            await self.apply(Report(instance.id, "stopped", message="stopped before it started"))
        return instance

    async def stop_at_site(
        self, link: SiteLink, instance_id: str, backend_state: dict[str, Any]
    ) -> None:
        """Send a stop; a site that is away gets it again when its agent returns."""
        if link.live:
            self.stops_sent[instance_id] = time.monotonic()
        try:
            await link.stop(instance_id, backend_state)
        except LabgateError as exc:
            log.warning(
                "instance %s stays stopping: %s (sent again when the site returns)",
                instance_id,
                exc.detail,
            )

    async def stop_all_of(self, user_id: int) -> None:
        """Stop every unfinished instance of a user (before the account goes)."""

        def ids(session: Session) -> list[str]:
            return list(
                session.scalars(
                    select(Instance.id).where(
                        Instance.owner_id == user_id, Instance.state.in_(ACTIVE_STATES)
                    )
                )
            )

        for instance_id in await self.run_db(ids):
            try:
                await self.stop(instance_id)
            except Conflict:
                continue

    def _begin_stop(
        self, session: Session, instance_id: str, reason: str, message: str
    ) -> Instance:
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise NotFound(f"no instance {instance_id!r}")
        prior = instance.state
        if prior == InstanceState.stopping:
            raise Conflict(f"instance {instance_id} is already stopping", code="invalid_state")
        if prior.terminal:
            raise Conflict(f"instance {instance_id} is already {prior.value}", code="invalid_state")
        _transition(session, instance, InstanceState.stopping, message, {"reason": reason})
        if prior == InstanceState.queued:
            _transition(session, instance, InstanceState.stopped, "left the start queue")
        session.flush()
        session.refresh(instance, ["owner", "site"])
        return instance

    # --- reports from sites ------------------------------------------------
    async def apply(self, report: Report, *, site: str | None = None) -> None:
        """Record what a site reported; the reporter callback of every link.

        With ``site`` (a network site's agent), a report on an instance of
        another site is refused and logged: an agent speaks only for its own.
        Reports on batch task attempts (``kind == "task"``) go to the run processor.
        """
        if report.kind == "task":
            if self.task_reports is not None:
                await self.task_reports(report, site)
            return
        instance = await self.run_db(lambda s: self.apply_in(s, report, site))
        if instance is not None:
            self.changed(instance)

    def apply_in(
        self, session: Session, report: Report, site: str | None = None
    ) -> Instance | None:
        """:meth:`apply` inside a transaction: the instance it changed, or None.

        Call :meth:`changed` with that instance once the transaction is committed.
        """
        instance = session.get(Instance, report.instance_id)
        if instance is None:
            log.warning("report for unknown instance %s ignored", report.instance_id)
            return None
        if site is not None and (instance.site is None or instance.site.name != site):
            log.warning(
                "site %s reported on instance %s of another site; refused",
                site,
                report.instance_id,
            )
            return None
        if site is not None and report.endpoint is not None:
            reach = instance.site.reach if instance.site is not None else ""
            refused = endpoint_refused(report.endpoint, reach)
            if refused:
                log.warning(
                    "site %s reported endpoint %r for instance %s: %s; report refused",
                    site,
                    report.endpoint,
                    report.instance_id,
                    refused,
                )
                return None
        try:
            target = InstanceState(report.state)
        except ValueError:
            log.warning("report of unknown state %r for %s refused", report.state, instance.id)
            return None
        data = dict(report.data)
        if report.log_tail:
            data["log_tail"] = report.log_tail
        if report.kind == "progress" or target == instance.state:
            if instance.state.terminal:
                return None
            _take_endpoint(instance, report)
            if instance.state == InstanceState.stopping and "stop_retry" in data:
                instance.reason = report.message  # why it is still stopping
            session.add(
                InstanceEvent(
                    instance=instance,
                    kind="progress",
                    state=instance.state,
                    message=report.message,
                    data=data,
                )
            )
        else:
            if target not in TRANSITIONS[instance.state]:
                log.info(
                    "instance %s: %s -> %s not allowed; report dropped",
                    instance.id,
                    instance.state.value,
                    target.value,
                )
                return None
            if target == InstanceState.stopped and "stop_retry" in data:
                instance.reason = ""  # the failed attempts are over
            _take_endpoint(instance, report)
            _transition(session, instance, target, report.message, data)
        session.flush()
        session.refresh(instance, ["owner", "site"])
        return instance

    def changed(self, instance: Instance) -> None:
        """Tell the routers and the event streams that an instance changed."""
        if self.routes is not None:
            self.routes.instance_changed(instance)
        self.events.notify(instance.id)
        self.queue.changed(instance)

    # --- restart -----------------------------------------------------------
    async def restore(self) -> None:
        """After a portal start: hand every unfinished instance back to its site.

        Queued launches stay queued, in order: the start queue starts them in turn.
        The list is read as a few columns; only the instances that go back to a
        connected site are read whole, :data:`RESTORE_BATCH` per query (the
        instances of a network site whose agent is away wait for it: thousands
        of them cost one light query, not thousands of ORM loads).
        """
        rows = await self.run_db(_unfinished)
        self.queue.start()
        for first in range(0, len(rows), RESTORE_BATCH):
            batch = rows[first : first + RESTORE_BATCH]
            links = [self._handed_back_to(row) for row in batch]
            ids = [row.id for row, link in zip(batch, links, strict=True) if link is not None]
            whole = await self.run_db(partial(_instances_by_id, ids=ids)) if ids else {}
            for row, link in zip(batch, links, strict=True):
                if link is None:
                    await self._restore_listed(row)
                elif (instance := whole.get(row.id)) is not None:
                    await self._hand_back(instance, link)

    def _handed_back_to(self, row: Unfinished) -> SiteLink | None:
        """The connected site an unfinished instance goes back to whole, if it does."""
        link = self.links.get(row.site_name or "")
        if link is None or not link.live:
            return None
        if row.state in (InstanceState.queued, InstanceState.pending):
            return None
        return link

    async def _restore_listed(self, row: Unfinished) -> None:
        """Restore what needs no more than the list: queued, pending, or no connected site."""
        link = self.links.get(row.site_name or "")
        if row.state == InstanceState.queued:
            if link is None:
                detail = f"site {row.site_name} is not configured"
                await self.apply(start_failed(row.id, NEVER_STARTED, detail))
            return
        if link is None:
            message = f"site {row.site_name} is not configured"
            await self.apply(Report(row.id, "lost", message=message))
            return
        if not link.live:
            return  # a network site: reconciled when its agent connects
        if row.state == InstanceState.pending:
            self._spawn(self._start(row.id))

    async def _hand_back(self, instance: Instance, link: SiteLink) -> None:
        """Hand a started or stopping instance back to its connected site."""
        if instance.state == InstanceState.stopping:
            self._spawn(self.stop_at_site(link, instance.id, instance.backend_state))
        elif instance.state not in HANDED_BACK:
            return  # it moved on since it was listed
        elif not instance.backend_state:
            # The portal went down mid-start, before the site said what it started:
            # a stop without a state removes what the start made, by the instance id.
            message = "the portal restarted before the instance had started; launch it again"
            await self.apply(Report(instance.id, "failed", message=message))
            self._spawn(self.stop_at_site(link, instance.id, {}))
        else:
            if self.routes is not None:
                self.routes.instance_changed(instance)
            try:
                spec = self.spec_for(instance)
            except NotFound as exc:
                await self.apply(Report(instance.id, "lost", message=exc.detail))
                return
            started = instance.started_at or instance.created_at
            elapsed = (utcnow() - started).total_seconds()
            await link.adopt(
                Adoption(
                    spec=spec,
                    state=instance.state.value,
                    backend_state=instance.backend_state,
                    endpoint=instance.endpoint,
                    remaining_start_time=spec.tool.start_timeout - elapsed,
                )
            )

    async def logs(self, instance: Instance, lines: int) -> str:
        """The tail of an instance's output, from its site."""
        if instance.site is None or not instance.backend_state:
            return ""
        link = self.links.get(instance.site.name)
        if link is None:
            return ""
        return await link.logs(instance.id, instance.backend_state, lines)

    # --- background tasks --------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("instance task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Wait briefly for in-flight work, then cancel it."""
        await self.queue.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()


#: Instances read whole per query by :meth:`InstanceManager.restore`.
RESTORE_BATCH = 500
#: The states in which a connected site is handed an instance back to adopt.
HANDED_BACK = frozenset({InstanceState.starting, InstanceState.running, InstanceState.unreachable})


class Unfinished(NamedTuple):
    """An unfinished instance as :meth:`InstanceManager.restore` lists it: a few columns."""

    id: str
    state: InstanceState
    site_name: str | None


def _unfinished(session: Session) -> list[Unfinished]:
    """Every active or stopping instance, oldest first."""
    unfinished = [*ACTIVE_STATES, InstanceState.stopping]
    rows = session.connection().execute(
        select(Instance.id, Instance.state, Site.name)
        .outerjoin(Site, Instance.site_id == Site.id)
        .where(Instance.state.in_(unfinished))
        .order_by(Instance.created_at)
    )
    return [Unfinished(*row) for row in rows.all()]


def _instances_by_id(session: Session, ids: list[str]) -> dict[str, Instance]:
    """These instances, whole, with their owners and sites, by id."""
    query = select(Instance).where(Instance.id.in_(ids)).options(*with_owner_and_site())
    return {instance.id: instance for instance in session.scalars(query)}


def endpoint_refused(endpoint: str, reach: str) -> str:
    """Why a network site's agent may not report ``endpoint`` for an instance ("" if it may).

    The router connects to a direct site's endpoints itself: only ``http://HOST:PORT``
    (never a unix socket on the router's host, nor another site's tunnel). A
    tunneled site's endpoint is its agent's to connect to: no tunnel either.
    """
    try:
        address = parse_upstream(endpoint)
    except ValueError as exc:
        return str(exc)
    if address.is_tunnel:
        return "an instance's endpoint cannot be a tunnel"
    if address.path and reach != "tunnel":
        return "the router reaches a direct site's instances over TCP, not unix sockets"
    return ""


def _take_endpoint(instance: Instance, report: Report) -> None:
    """An accepted report's endpoint and backend state (a refused one changes nothing)."""
    if report.backend_state is not None:
        instance.backend_state = report.backend_state
    if report.endpoint is not None:
        instance.endpoint = report.endpoint


def _transition(
    session: Session,
    instance: Instance,
    target: InstanceState,
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    now = utcnow()
    instance.state = target
    # Back from unreachable, an instance keeps when it started and became ready.
    if target == InstanceState.starting and instance.started_at is None:
        instance.started_at = now
    elif target == InstanceState.running and instance.ready_at is None:
        instance.ready_at = now
    elif target.terminal:
        instance.stopped_at = now
    if target in (InstanceState.failed, InstanceState.lost, InstanceState.unreachable):
        instance.reason = message
    elif instance.reason and target in (InstanceState.starting, InstanceState.running):
        instance.reason = ""  # back from unreachable
    session.add(InstanceEvent(instance=instance, state=target, message=message, data=data or {}))
    accounting.on_transition(session, instance, target, data or {})


def timestamp(value: datetime | None) -> float | None:
    """A datetime as Unix seconds."""
    return value.timestamp() if value is not None else None


def current_groups(instance: Instance) -> set[str] | None:
    """The groups the instance's owner is in now, when it has group volumes recorded.

    None when it has none (nothing to check), or when the instance is not in a
    session.
    """
    session = object_session(instance)
    if session is None or not any(r.get("group") for r in instance.mounts or []):
        return None
    return set(groups_of(session, instance.owner))


def mounts_of(instance: Instance, groups: set[str] | None = None) -> tuple[Mount, ...]:
    """The backend mounts of an instance's mount records, each with the root it must stay in.

    With ``groups`` (the owner's groups now), a group volume of a group the
    owner has left since the launch was admitted is left out: membership
    lost meanwhile (an admin, or the identity provider's groups at a sign-in)
    ends the access, even for a launch whose start was already on its way.
    """
    # Records older than the "root" key are dataset mounts of the site's data root.
    data_root = (instance.site.options or {}).get("data_root") if instance.site else None
    mounts = []
    for record in instance.mounts or []:
        if not record.get("source"):
            continue
        group = record.get("group")
        if group and groups is not None and group not in groups:
            continue
        root = record.get("root") or data_root
        mounts.append(
            Mount(
                Path(record["source"]),
                record["target"],
                bool(record.get("read_only", True)),
                root=Path(root) if root else None,
            )
        )
    return tuple(mounts)
