"""The start queue: a site starts at most as many tools at once as it can afford.

A tool's start is the costly part of its life: JupyterLab keeps a core busy
for seconds while it imports and builds its extension list. Fifty of them
started together on a 2-core site thrash until every start budget runs out.
So each site has a *start capacity*, in cores (``capacity.starts`` of the
site; unset, the site's cores), and each tool declares what its start costs
(``start_cost``, in cores, 1 by default). A site starts a launch while the
costs of its ``pending`` and ``starting`` instances leave room for at least
half of it (one always may, however costly); the others wait ``queued``.
Half, not all: a start's cost is an average, and flooring would leave up to
a start's worth of cores idle through a whole storm (three JupyterLab starts
at 0.8 of a core each keep a 2-core site busy where two leave 0.4 idle).

Where the queue lives
    In the portal's scheduler, per site, and in the database: a queued launch
    is an instance in state ``queued`` with its site already chosen. The
    portal knows every site's capacity and what each of its instances is
    doing, for in-process and network sites alike, so the queue works the
    same for both and a site's agent never holds a launch the portal does not
    know about. Nothing lives only in memory: after a portal restart the
    ``queued`` instances are still there, in order, and the next dispatch
    starts them (no launch is ever lost). A site whose backend queues by
    itself (Slurm, :attr:`~labgate.backends.base.Backend.queues_starts`) has no
    start queue unless its ``capacity.starts`` asks for one; ``0`` turns the
    queue off on any site.

Admission
    :func:`must_queue` (in the admission transaction of
    :mod:`labgate.scheduler.launch`) records a launch ``queued`` when someone
    already waits on its site or its start does not fit. Quotas count queued
    launches (``queued`` is an active state). A warm-pool refill
    (:func:`pool_may_start`) only starts into room that no queued user launch
    is waiting for, so the pool refills behind a burst, never ahead of it.

Dispatch
    :class:`StartQueue` moves queued instances to ``pending`` (and has them
    started) whenever room frees: an instance of the site became ready,
    failed or stopped, a queued one left, or every ``tick`` seconds (which
    also catches a network site's agent coming back, and work done by another
    portal process). Dispatch runs under the admission lock, so it counts and
    takes room in one transaction like any admission.

Fairness
    The queue is served round robin per user (or per group charged, setting
    ``start_queue_fairness``): every user's first waiting launch goes before
    anyone's second, so one user launching ten cannot push a class behind
    them. Within that, first come first served.

Each queued instance has a *place*: its position (1: next) and an estimate of
the seconds until its start begins (from how long the tool's recent starts on
that site took). The API, the UI and the CLI show it; the instance's event
stream gets a note when it is queued and as it moves up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.backends.base import BackendNotFound, load_backend
from labgate.db.models import (
    Instance,
    InstanceEvent,
    InstanceState,
    Site,
    SiteKind,
    UsageRecord,
    utcnow,
)

if TYPE_CHECKING:
    from labgate.scheduler.control import InstanceControl
    from labgate.tools.catalog import Catalog, Tool

log = logging.getLogger(__name__)

#: The states that hold room in their site's start capacity.
STARTING = (InstanceState.pending, InstanceState.starting)
#: What a start is assumed to take before the site has started the tool once.
DEFAULT_START_SECONDS = 10.0
#: Seconds a site's measured start times are used for estimates before they are measured again.
TYPICAL_TTL = 30.0
#: A queued instance's event stream gets a note when it moves up at most this often...
NOTE_INTERVAL = 10.0
#: ... except near the front, where every move is noted.
NOTE_FRONT = 3

Fairness = Literal["user", "group"]


@dataclass(frozen=True)
class Place:
    """Where a queued instance stands in its site's start queue."""

    site: str
    #: 1: the next to start.
    position: int
    #: Seconds until its start is expected to begin.
    estimate: float

    def as_json(self) -> dict[str, object]:
        """The place as the API and events show it."""
        return {"site": self.site, "position": self.position, "estimate": round(self.estimate)}

    def describe(self) -> str:
        """One line for events and the CLI."""
        return (
            f"number {self.position} in site {self.site}'s start queue, "
            f"starting in about {_duration(self.estimate)}"
        )


# --- capacity ----------------------------------------------------------------------
def start_capacity(site: Site) -> float | None:
    """Cores ``site`` gives to starting tools at once; None: no limit (no start queue).

    ``capacity.starts`` of the site when set (0: no limit); else no limit for a
    backend that queues starts itself (Slurm), and otherwise the site's cores:
    those its agent reported (a network site), or this machine's (a local one).
    """
    raw = ((site.options or {}).get("capacity") or {}).get("starts")
    if raw is not None:
        value = float(raw)
        return value if value > 0 else None
    if queues_starts(site.backend):
        return None
    cores = (site.agent_info or {}).get("cores") if site.kind == SiteKind.network else None
    return float(cores or os.cpu_count() or 1)


@functools.cache
def queues_starts(backend: str) -> bool:
    """Whether the backend called ``backend`` queues starts itself (Slurm); unknown: no."""
    try:
        return load_backend(backend).queues_starts
    except (ImportError, BackendNotFound):
        return False


def start_cost(catalog: Catalog, tool_name: str) -> float:
    """What starting ``tool_name`` costs, in cores (a tool gone from the catalog: 1)."""
    tool = catalog.get(tool_name)
    return tool.start_cost if tool is not None else 1.0


def slots(capacity: float | None, cost: float) -> int:
    """How many starts of ``cost`` run at once within ``capacity``: the nearest whole number.

    At least one. The same count :func:`fits` admits one after another.
    """
    if capacity is None:
        return 1_000_000
    return max(1, math.floor(capacity / cost + 0.5 + 1e-9))


def fits(capacity: float | None, used: float, busy: int, cost: float) -> bool:
    """Whether a start of ``cost`` may begin beside ``busy`` starts holding ``used`` cores.

    It may when at least half of it fits in what ``capacity`` leaves (any
    start may when none runs; no capacity: always).
    """
    return capacity is None or busy == 0 or used + cost / 2 <= capacity + 1e-9


def _load(session: Session, site_id: int, catalog: Catalog) -> tuple[float, int]:
    """Cores the site's starts under way hold, and how many there are."""
    tools = session.scalars(
        select(Instance.tool).where(Instance.site_id == site_id, Instance.state.in_(STARTING))
    ).all()
    return sum(start_cost(catalog, name) for name in tools), len(tools)


def _waiting(session: Session, site_id: int, users_only: bool = False) -> bool:
    stmt = select(Instance.id).where(
        Instance.site_id == site_id, Instance.state == InstanceState.queued
    )
    if users_only:
        stmt = stmt.where(Instance.pool.is_(None))
    return session.scalar(stmt.limit(1)) is not None


def must_queue(session: Session, site: Site, tool: Tool, catalog: Catalog) -> bool:
    """Whether a launch of ``tool`` admitted on ``site`` now waits in its start queue."""
    capacity = start_capacity(site)
    if capacity is None:
        return False
    if _waiting(session, site.id):
        return True  # first come, first served: nobody passes the queue
    used, busy = _load(session, site.id, catalog)
    return not fits(capacity, used, busy, tool.start_cost)


def pool_may_start(session: Session, site: Site, tool: Tool, catalog: Catalog) -> bool:
    """Whether a warm-pool refill may start on ``site`` now: only into room nobody waits for."""
    return not must_queue(session, site, tool, catalog)


# --- order -------------------------------------------------------------------------
def fair_order(
    session: Session,
    site_id: int,
    fairness: Fairness = "user",
    served: dict[str, int] | None = None,
) -> list[tuple[Instance, str]]:
    """The queued instances of a site in the order they will start, each with its user
    (or group) key: round robin over the keys, then first come first served.

    An instance's turn is how many launches of its key this queue has started
    lately (``served``) plus how many of its key wait ahead of it; ties go to
    the older launch.
    """
    rows = list(
        session.scalars(
            select(Instance)
            .where(Instance.site_id == site_id, Instance.state == InstanceState.queued)
            .order_by(Instance.created_at, Instance.id)
        )
    )
    keys: dict[str, str] = {row.id: f"user:{row.owner_id}" for row in rows}
    if fairness == "group" and rows:
        groups = session.execute(
            select(UsageRecord.instance_id, UsageRecord.group_name).where(
                UsageRecord.instance_id.in_(list(keys)), UsageRecord.stopped_at.is_(None)
            )
        ).all()
        for instance_id, group in groups:
            if group:
                keys[instance_id] = f"group:{group}"
    turns = dict(served or {})
    ranked = []
    for index, row in enumerate(rows):
        key = keys[row.id]
        ranked.append((turns.get(key, 0), index, row, key))
        turns[key] = turns.get(key, 0) + 1
    ranked.sort(key=lambda item: item[:2])
    return [(row, key) for _, _, row, key in ranked]


def typical_start(session: Session, site_id: int, tool: str) -> float:
    """Seconds the tool's recent starts on the site took (median), for estimates."""
    rows = session.execute(
        select(Instance.started_at, Instance.ready_at)
        .where(
            Instance.site_id == site_id,
            Instance.tool == tool,
            Instance.ready_at.is_not(None),
            Instance.started_at.is_not(None),
        )
        .order_by(Instance.ready_at.desc())
        .limit(20)
    ).all()
    took = [(ready - started).total_seconds() for started, ready in rows if ready and started]
    return statistics.median(took) if took else DEFAULT_START_SECONDS


def places(
    session: Session,
    site: Site,
    catalog: Catalog,
    fairness: Fairness = "user",
    served: dict[str, int] | None = None,
    typical: dict[str, float] | None = None,
) -> dict[str, Place]:
    """The place of every queued instance of ``site``.

    ``typical`` caches :func:`typical_start` per tool (filled here when missing).
    """
    queue = [instance for instance, _ in fair_order(session, site.id, fairness, served)]
    if not queue:
        return {}
    capacity = start_capacity(site)
    typical = {} if typical is None else typical
    found = {}
    # Starts run ``slots`` at a time: the n-th in line begins after about n/slots starts.
    for position, instance in enumerate(queue, start=1):
        if instance.tool not in typical:
            typical[instance.tool] = typical_start(session, site.id, instance.tool)
        width = slots(capacity, start_cost(catalog, instance.tool))
        estimate = math.ceil(position / width) * typical[instance.tool]
        found[instance.id] = Place(site.name, position, estimate)
    return found


def _sites_with_queued(session: Session) -> set[str]:
    """Names of the sites with at least one queued launch (one query for all sites)."""
    return set(
        session.scalars(
            select(Site.name)
            .join(Instance, Instance.site_id == Site.id)
            .where(Instance.state == InstanceState.queued)
            .distinct()
        )
    )


# --- dispatch ----------------------------------------------------------------------
@dataclass
class Dispatched:
    """What one dispatch of a site did: instances to start and the places of the rest."""

    started: list[Instance]
    places: dict[str, Place]
    noted: list[str]


class StartQueue:
    """Starts each site's queued launches as room frees, fairly; knows every place."""

    def __init__(
        self,
        control: InstanceControl,
        *,
        fairness: Fairness = "user",
        tick: float = 2.0,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.control = control
        self.fairness: Fairness = fairness
        self.tick = tick
        #: Wakes an instance's event stream readers (the event bus), for position notes.
        self.notify = notify or (lambda _id: None)
        self._places: dict[str, Place] = {}
        #: Per site: launches of each user (or group) started from the queue since it was
        #: last empty, for the round robin (lost on restart: the order is then by age).
        self._served: dict[str, dict[str, int]] = {}
        #: Per site: how long each tool's starts take there, and when that was measured.
        self._typical: dict[str, tuple[dict[str, float], float]] = {}
        self._noted: dict[str, tuple[int, float]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._loop: asyncio.Task[None] | None = None

    def place_of(self, instance_id: str) -> Place | None:
        """Where a queued instance stands (as of the last dispatch), or None."""
        return self._places.get(instance_id)

    def start(self) -> None:
        """Dispatch every site now, and again every ``tick`` seconds."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="start-queue")

    async def _run(self) -> None:
        while True:
            try:
                waiting = await self.control.run_db(_sites_with_queued)
            except Exception:
                log.exception("start queue: cannot list the sites with queued launches")
                waiting = set(self.control.links)
            # Sites with something queued (a network site's agent back, a launch another
            # portal process queued) and sites whose places this process still shows.
            waiting |= {place.site for place in self._places.values()}
            for site in waiting & set(self.control.links):
                self.kick(site)
            await asyncio.sleep(self.tick)

    def changed(self, instance: Instance) -> None:
        """An instance changed: when it left the room of a site with a queue, dispatch it."""
        site = instance.site.name if instance.site is not None else None
        if site is None or instance.state in STARTING:
            return
        if instance.state == InstanceState.queued or any(
            place.site == site for place in self._places.values()
        ):
            self.kick(site)

    def kick(self, site: str) -> None:
        """Dispatch ``site`` soon (once, however often it is kicked meanwhile)."""
        task = self._tasks.get(site)
        if task is not None and not task.done():
            self._again.add(site)
            return
        self._tasks[site] = asyncio.create_task(self._dispatch_loop(site), name=f"queue-{site}")

    async def _dispatch_loop(self, site: str) -> None:
        while True:
            self._again.discard(site)
            try:
                await self.dispatch(site)
            except Exception:
                log.exception("start queue of site %s: dispatch failed", site)
            if site not in self._again:
                return

    async def dispatch(self, site: str) -> list[str]:
        """Start what fits on ``site`` now, in fair order; returns the started ids."""
        link = self.control.links.get(site)
        live = link is not None and link.reachable
        previous = dict(self._noted)
        done = await self.control.run_admission(
            lambda s: self._dispatch(s, site, live=live, previous=previous)
        )
        for instance_id in [i for i, p in self._places.items() if p.site == site]:
            if instance_id not in done.places:
                del self._places[instance_id]
                self._noted.pop(instance_id, None)
        self._places.update(done.places)
        now = time.monotonic()
        for instance_id in done.noted:
            self._noted[instance_id] = (done.places[instance_id].position, now)
            self.notify(instance_id)
        for instance in done.started:
            self.control.changed(instance)
            self.control.start_admitted(instance.id)
        return [instance.id for instance in done.started]

    def _dispatch(
        self,
        session: Session,
        name: str,
        *,
        live: bool,
        previous: dict[str, tuple[int, float]],
    ) -> Dispatched:
        site = session.scalar(select(Site).where(Site.name == name))
        if site is None:
            return Dispatched([], {}, [])
        catalog = self.control.catalog
        started: list[Instance] = []
        served = self._served.setdefault(name, {})
        if live:
            capacity = start_capacity(site)
            used, busy = _load(session, site.id, catalog)
            now = utcnow()
            for instance, key in fair_order(session, site.id, self.fairness, served):
                cost = start_cost(catalog, instance.tool)
                if not fits(capacity, used, busy, cost):
                    break
                used, busy = used + cost, busy + 1
                _leave_queue(session, instance, now)
                served[key] = served.get(key, 0) + 1
                started.append(instance)
            session.flush()
            for instance in started:
                session.refresh(instance, ["owner", "site"])
        typical, measured = self._typical.get(name, ({}, 0.0))
        if time.monotonic() - measured > TYPICAL_TTL:
            typical, measured = {}, time.monotonic()
            self._typical[name] = (typical, measured)
        found = places(session, site, catalog, self.fairness, served, typical)
        if not found:
            served.clear()  # the queue is empty: the next burst starts even
        noted = _note_moves(session, found, previous, time.monotonic())
        return Dispatched(started, found, noted)

    async def close(self) -> None:
        """Stop dispatching (queued instances stay queued in the database)."""
        tasks = [t for t in [self._loop, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop = None
        self._tasks.clear()


def _leave_queue(session: Session, instance: Instance, now: datetime) -> None:
    """``queued`` -> ``pending``, with its event; time in the queue is not charged."""
    waited = (now - instance.created_at).total_seconds() if instance.created_at else 0.0
    instance.state = InstanceState.pending
    session.add(
        InstanceEvent(
            instance=instance,
            state=InstanceState.pending,
            message=f"left the start queue after {_duration(waited)}: starting now",
            data={"waited": round(waited, 3)},
        )
    )
    for record in session.scalars(
        select(UsageRecord).where(
            UsageRecord.instance_id == instance.id, UsageRecord.stopped_at.is_(None)
        )
    ):
        record.started_at = now


def _note_moves(
    session: Session,
    found: dict[str, Place],
    previous: dict[str, tuple[int, float]],
    now: float,
) -> list[str]:
    """Progress notes for queued instances that moved up; returns their ids."""
    noted = []
    for instance_id, place in found.items():
        before = previous.get(instance_id)
        if before is not None and (
            place.position >= before[0]
            or (place.position > NOTE_FRONT and now - before[1] < NOTE_INTERVAL)
        ):
            continue
        instance = session.get(Instance, instance_id)
        if instance is None:
            continue
        session.add(
            InstanceEvent(
                instance=instance,
                kind="progress",
                state=InstanceState.queued,
                message=place.describe(),
                data={"queue": place.as_json()},
            )
        )
        noted.append(instance_id)
    return noted


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min"
