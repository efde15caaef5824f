"""Network sites coming and going: what the portal does when an agent connects or goes away.

:class:`SiteLiveness` is the :class:`~labgate.agent.hub.SiteEvents` of the
portal. On every connect it reconciles what the agent holds (its hello)
with what the database says runs on the site, so that nothing is lost and
nothing runs twice:

========================  ====================  ==================================
the portal says           the agent holds it    the agent does not
========================  ====================  ==================================
pending                   (it is starting)      launch sent again
starting / running /      back to what the      adopted from the saved state (the
unreachable               agent says            agent finds it running or says lost);
                                                no saved state: failed, with why
                                                (unless it went starting over this
                                                connection, after its hello)
stopping                  stop sent again       stop sent again (idempotent)
finished or unknown       stopped               --
========================  ====================  ==================================

When the connection goes, the site's starting and running instances become
``unreachable`` (their routes answer 503 with a page saying so) and a timer
of ``site_grace_period`` seconds starts; when it ends with the agent still
away, what is still unreachable (or stopping) is ``lost``, with the reason,
and what is still pending (a launch that found the agent gone:
:class:`~labgate.agent.network.SiteAway`) fails as never started.
Heartbeats are kept in memory and written to the ``sites`` rows in one
transaction per heartbeat interval.

Several portals may share the database, and an agent is connected to one
of them. A portal leaves a site alone while its row says another portal
holds it: connected since another time than the one this portal recorded,
and seen within :data:`FRESH_BEATS` heartbeat intervals (the holder writes
each heartbeat). It still admits launches on such a site (noted every
heartbeat interval); their commands go through the relay to the holder.
So a portal that starts, or whose agent moved to another portal, marks
nothing unreachable or lost; one that starts while the row only looks fresh
(a portal that held the site just died) checks again once that time has
passed.

Among ``labgate portal`` replicas (``shared``) each also makes, every
heartbeat interval, links for the network sites another replica added (and
drops the removed ones), and sends the stop of every ``stopping`` instance of
the sites connected to it that it has not sent itself in the last four
``site_command_timeout`` (a stop recorded where the agent is not connected:
the leader's culler, say).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.network import NetworkSiteLink
from labgate.aio import cancel_and_wait
from labgate.backends.groups import plain_name
from labgate.db.models import Instance, InstanceState, Site, utcnow, with_owner_and_site
from labgate.wire.site import NEVER_STARTED, Report, start_failed

if TYPE_CHECKING:
    from labgate.agent.hub import SiteHub
    from labgate.agent.link import SiteLink
    from labgate.scheduler.instances import InstanceManager
    from labgate.wire.agent import Heartbeat, Held, Hello

log = logging.getLogger(__name__)

#: The states whose instances become unreachable when their site's agent goes away.
REACHABLE = (InstanceState.starting, InstanceState.running)
#: A site row seen within this many heartbeat intervals is held by the portal that wrote it.
FRESH_BEATS = 3
#: What the portal reconciles with an agent's hello.
UNFINISHED = (
    InstanceState.pending,
    InstanceState.starting,
    InstanceState.running,
    InstanceState.unreachable,
    InstanceState.stopping,
)


class SiteLiveness:
    """Reconciles network sites on connect, and loses their instances after a grace period."""

    def __init__(
        self,
        manager: InstanceManager,
        hub: SiteHub,
        *,
        grace: float,
        reconnect_window: float = 0.0,
        shared: bool = False,
    ) -> None:
        self.manager = manager
        self.hub = hub
        self.grace = grace
        self.reconnect_window = reconnect_window
        #: Other portal replicas share the sites' agents (``labgate portal``).
        self.shared = shared
        self._relays: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.Task[None]] = {}
        #: One change of a site's connection at a time: a quick reconnect's reconcile
        #: must not run before (or under) the previous connection's departure.
        self._locks: dict[str, asyncio.Lock] = {}
        self._beats: dict[str, float] = {}
        self._flusher: asyncio.Task[None] | None = None
        #: Set when the portal stops: the agents' connections close with it, and
        #: that is no departure of theirs (they reconnect to the next portal).
        self._closed = False
        #: When this portal recorded each site's current connection (the rows say so too).
        self._mine: dict[str, datetime] = {}

    # --- start and stop ----------------------------------------------------------
    async def start(self) -> None:
        """After the portal starts: each network site has the reconnect window to come back.

        Its agents reconnect by themselves; meanwhile the instances keep their
        state and routes (a directly reached instance keeps answering), and a
        site not back when the window ends is away like one that disconnected.
        """
        for name, link in list(self.manager.links.items()):
            if isinstance(link, NetworkSiteLink) and not link.live:
                link.held_elsewhere = await self._held_elsewhere(name)
                if link.held_elsewhere:
                    # Checked again once the row would be stale, were its holder gone.
                    self._timers[name] = asyncio.create_task(
                        self._check_later(name), name=f"held-{name}"
                    )
                    continue
                self._timers[name] = asyncio.create_task(
                    self._away_unless_back(name), name=f"reconnect-{name}"
                )
        self._flusher = asyncio.create_task(self._flush_beats(), name="site-heartbeats")

    @property
    def fresh(self) -> float:
        """Seconds within which a site row's last sighting means its portal holds it."""
        return FRESH_BEATS * self.hub.heartbeat

    async def _held_elsewhere(self, site: str) -> bool:
        mine = self._mine.get(site)
        return await self.manager.run_db(lambda s: _held_elsewhere(s, site, mine, self.fresh))

    async def _check_later(self, site: str) -> None:
        while True:
            await asyncio.sleep(self.fresh)
            link = self.manager.links.get(site)
            if link is not None and link.live:
                break
            if not await self._held_elsewhere(site):
                self._timers.pop(site, None)
                async with self._lock(site):
                    await self._away(site, "no portal holds its agent")
                return
        self._timers.pop(site, None)

    async def close(self) -> None:
        """Stop the timers and stop taking disconnects (instances stay as they are)."""
        self._closed = True
        await cancel_and_wait(*self._timers.values(), *self._relays, self._flusher)
        self._timers.clear()

    # --- SiteEvents --------------------------------------------------------------
    async def site_connected(self, site: str, hello: Hello) -> None:
        """Record the agent and reconcile what it holds with the database."""
        async with self._lock(site):
            await self._connected(site, hello)

    async def _connected(self, site: str, hello: Hello) -> None:
        timer = self._timers.pop(site, None)
        if timer is not None:
            timer.cancel()
        self._mine[site] = await self.manager.run_db(lambda s: _record_connected(s, site, hello))
        rows = await self.manager.run_db(lambda s: _unfinished_on(s, site))
        held = {h.instance_id: h for h in hello.instances}
        for instance in rows:
            await self._reconcile(site, instance, held.pop(instance.id, None))
        link = self.manager.links.get(site)
        for leftover in held.values():
            # Finished here (the user stopped it while the site was away) or never known.
            log.info(
                "site %s holds %s, which should not run: stopping it", site, leftover.instance_id
            )
            if link is not None:
                await self.manager.stop_at_site(link, leftover.instance_id, leftover.backend_state)

    async def site_heartbeat(self, site: str, beat: Heartbeat) -> None:
        """Remember the beat; it reaches the database with the next flush.

        A beat that says anew what the site can run, or which group volumes it
        holds, is recorded at once.
        """
        self._beats[site] = time.time()
        said: dict[str, Any] = {}
        if beat.tools is not None:
            said["tools"] = dict(sorted(beat.tools.items()))
        if beat.groups is not None:
            said["groups"] = _plain_groups(beat.groups)
        if said:
            await self.manager.run_db(lambda s: _record_info(s, site, said))

    async def site_report(self, site: str, report: Report) -> None:
        """Apply a report of the site's agent, on the site's own instances only."""
        await self.manager.apply(report, site=site)

    async def site_disconnected(self, site: str, reason: str) -> None:
        """The agent went away: its instances are unreachable, the grace period starts."""
        if self._closed:
            return  # the portal is stopping: the connection closed with it
        async with self._lock(site):
            link = self.manager.links.get(site)
            if link is not None and link.live:
                return  # already back: the new connection's reconcile has it
            await self._away(site, reason)

    def _lock(self, site: str) -> asyncio.Lock:
        return self._locks.setdefault(site, asyncio.Lock())

    # --- reconciling one instance --------------------------------------------------
    async def _reconcile(self, site: str, instance: Instance, held: Held | None) -> bool:
        """Bring one instance in line with the agent; True when it runs there now."""
        manager, link = self.manager, self.manager.links.get(site)
        if link is None:
            return False
        state = instance.state
        if state == InstanceState.stopping:
            backend_state = held.backend_state if held and held.backend_state else None
            await manager.stop_at_site(link, instance.id, backend_state or instance.backend_state)
            return False
        if state == InstanceState.pending:
            if held is None:
                manager.start_admitted(instance.id)
            return False
        if held is not None:
            target = held.state if held.state in ("starting", "running") else "running"
            if state.value != target:
                await manager.apply(
                    Report(
                        instance.id,
                        target,
                        message=f"site {site} is connected again",
                        backend_state=held.backend_state or None,
                        endpoint=held.endpoint or None,
                    ),
                    site=site,
                )
            return True
        if not instance.backend_state:
            if _started_since_hello(link, instance):
                # Launched over this very connection, after its hello and before this
                # reconcile read the rows: its own reports carry it on.
                return False
            await manager.apply(
                Report(
                    instance.id,
                    "failed",
                    message=f"the agent of site {site} restarted before the instance had started",
                ),
                site=site,
            )
            # The killed agent's start may have got as far as a process: a stop
            # without a state removes it by the instance id (in the background:
            # the reconcile of the site's other instances does not wait for it).
            task = asyncio.create_task(manager.stop_at_site(link, instance.id, {}))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
            return False
        return await self._adopt(site, instance)

    async def _adopt(self, site: str, instance: Instance) -> bool:
        manager, link = self.manager, self.manager.links[site]
        was_running = instance.ready_at is not None and bool(instance.endpoint)
        try:
            spec = manager.spec_for(instance)
        except Exception as exc:  # the tool left the catalog
            await manager.apply(Report(instance.id, "lost", message=str(exc)), site=site)
            return False
        from labgate.agent.site import Adoption

        started = instance.started_at or instance.created_at
        elapsed = (utcnow() - started).total_seconds()
        adoption = Adoption(
            spec=spec,
            state="running" if was_running else "starting",
            backend_state=instance.backend_state,
            endpoint=instance.endpoint,
            remaining_start_time=spec.tool.start_timeout - elapsed,
        )
        try:
            await link.adopt(adoption)
        except Exception as exc:
            log.warning("site %s: adopting %s failed: %s", site, instance.id, exc)
            return False
        # The agent reported it lost already if it was gone; otherwise it runs again.
        if was_running:
            await manager.apply(
                Report(instance.id, "running", message=f"site {site} is connected again"),
                site=site,
            )
        return True

    # --- away ----------------------------------------------------------------------
    async def _away_unless_back(self, site: str) -> None:
        """The reconnect window after a portal start; its agent's connect cancels this."""
        await asyncio.sleep(self.reconnect_window)
        async with self._lock(site):
            self._timers.pop(site, None)
            link = self.manager.links.get(site)
            if link is None or link.live:
                return
            if await self._held_elsewhere(site):  # its agent went to another portal
                self._timers[site] = asyncio.create_task(
                    self._check_later(site), name=f"held-{site}"
                )
                return
            await self._away(site, "its agent did not reconnect after the portal started")

    async def _away(self, site: str, reason: str) -> None:
        message = (
            f"site {site} is not connected ({reason}); waiting up to {self.grace:g} s for it "
            "to come back"
        )
        mine, fresh, manager = self._mine.get(site), self.fresh, self.manager

        def record(session: Session) -> list[Instance] | None:
            ids = _record_away(session, site, mine, fresh)
            if ids is None:
                return None
            # In the same transaction as the row saying the site is away: a portal its
            # agent connects to meanwhile waits for the row (locked), then finds them
            # unreachable and brings them back; never reconciles before they are marked.
            reports = [Report(i, "unreachable", message=message) for i in ids]
            marked = [manager.apply_in(session, report, site) for report in reports]
            return [instance for instance in marked if instance is not None]

        changed = await manager.run_db(record)
        # Forgotten only once the row says the site is away: until then the row still
        # holds this portal's connection, which note_held_elsewhere, meanwhile, must
        # not take for another portal's (launches would be relayed to nobody).
        self._mine.pop(site, None)
        link = self.manager.links.get(site)
        if isinstance(link, NetworkSiteLink) and not link.live:
            # What the row says now, not what the last heartbeat's look found (the
            # agent may have come and gone since): held elsewhere only if it is.
            link.held_elsewhere = changed is None
        if changed is None:
            log.info("site %s: its agent is connected to another portal", site)
            return
        for instance in changed:
            manager.changed(instance)
        if site not in self._timers:
            self._timers[site] = asyncio.create_task(self._expire(site), name=f"grace-{site}")

    async def _expire(self, site: str) -> None:
        await asyncio.sleep(self.grace)
        # Under the site's lock: an agent that connects now has its reconcile wait until
        # this is done (or, still waiting for the lock, this timer is cancelled by it).
        async with self._lock(site):
            if self._timers.get(site) is asyncio.current_task():
                del self._timers[site]
            await self._lose(site)

    async def _lose(self, site: str) -> None:
        """The grace period ended with the agent away: its instances are lost."""
        link = self.manager.links.get(site)
        if (link is not None and link.live) or await self._held_elsewhere(site):
            return
        gone = f"site {site} did not come back within {self.grace:g} s"
        message = f"{gone}; it may still run there"
        rows = await self.manager.run_db(lambda s: _unfinished_on(s, site))
        for instance in rows:
            if link is not None and link.live:
                return  # back meanwhile: its reconcile, waiting for the lock, has the rest
            if instance.state in (InstanceState.unreachable, InstanceState.stopping):
                await self.manager.apply(Report(instance.id, "lost", message=message), site=site)
            elif instance.state == InstanceState.pending:  # its launch waited for the agent
                await self.manager.apply(start_failed(instance.id, NEVER_STARTED, gone), site=site)

    async def _flush_beats(self) -> None:
        interval = self.hub.heartbeat
        while True:
            await asyncio.sleep(interval)
            beats, self._beats = self._beats, {}
            if beats:
                try:
                    await self.manager.run_db(partial(_record_beats, beats=beats))
                except Exception:
                    log.exception("recording site heartbeats failed")
            try:
                await self.note_held_elsewhere()
            except Exception:
                log.exception("reading which portals hold the sites failed")
            if self.shared:
                try:
                    await self.sync_sites()
                    await self.relay_stops()
                except Exception:
                    log.exception("following the other replicas' sites and stops failed")

    async def sync_sites(self) -> None:
        """Make links for network sites another replica added; drop those it removed."""
        await self.hub.follow(lambda: self.manager.run_db(_network_sites))

    async def note_held_elsewhere(self) -> None:
        """Note which sites' agents another portal holds (their rows say so).

        Launches on them are admitted here too; their commands go through the
        relay to that portal (a link without a relay never counts them).
        """
        away = [
            name
            for name, link in self.manager.links.items()
            if isinstance(link, NetworkSiteLink) and not link.live and link.relay is not None
        ]
        mine, fresh = dict(self._mine), self.fresh
        held: dict[str, bool] = {}
        if away:
            held = await self.manager.run_db(
                lambda s: {name: _held_elsewhere(s, name, mine.get(name), fresh) for name in away}
            )
        for name, link in self.manager.links.items():
            if isinstance(link, NetworkSiteLink):
                link.held_elsewhere = held.get(name, False)

    async def relay_stops(self) -> list[str]:
        """Send the stops of ``stopping`` instances on sites connected here; the ids sent."""
        live = {
            name: link
            for name, link in self.manager.links.items()
            if isinstance(link, NetworkSiteLink) and link.live
        }
        if not live:
            return []
        rows = await self.manager.run_db(partial(_stopping_on, sites=list(live)))
        sent, now = [], time.monotonic()
        again = 4 * self.hub.command_timeout
        stops = self.manager.stops_sent
        stopping = {row[0] for row in rows}
        for instance_id in [i for i in stops if i not in stopping]:
            del stops[instance_id]
        for instance_id, site, backend_state in rows:
            if now - stops.get(instance_id, -again) < again:
                continue
            stops[instance_id] = now
            task = asyncio.create_task(
                self.manager.stop_at_site(live[site], instance_id, backend_state)
            )
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)
            sent.append(instance_id)
        return sent


def _started_since_hello(link: SiteLink, instance: Instance) -> bool:
    """Whether ``instance`` went starting over the link's current connection."""
    session = link.session if isinstance(link, NetworkSiteLink) else None
    started = instance.started_at
    return session is not None and started is not None and started >= session.opened_at


# --- database work (worker threads) -----------------------------------------------
def _site(session: Session, name: str, *, lock: bool = False) -> Site | None:
    """The site's row; with ``lock``, locked until the transaction ends (PostgreSQL).

    A connect and a departure recorded by two portals at once then go one
    after the other, each seeing what the other wrote.
    """
    query = select(Site).where(Site.name == name)
    return session.scalar(query.with_for_update() if lock else query)


def _held_elsewhere(session: Session, name: str, mine: datetime | None, fresh: float) -> bool:
    """Whether another portal holds the site's agent (see the module docstring)."""
    site = _site(session, name)
    if site is None or site.connected_at is None:
        return False
    if mine is not None and abs((site.connected_at - mine).total_seconds()) < 0.001:
        return False
    seen = max(site.connected_at, site.last_seen_at or site.connected_at)
    return (utcnow() - seen).total_seconds() < fresh


def _record_connected(session: Session, name: str, hello: Hello) -> datetime:
    site = _site(session, name, lock=True)
    now = utcnow()  # once the row is this transaction's: after any departure recorded
    if site is None:
        return now
    site.connected_at = now
    site.disconnected_at = None
    site.last_seen_at = now
    site.agent_version = hello.agent_version[:64]
    site.agent_info = _agent_info(hello)
    return now


def _agent_info(hello: Hello) -> dict[str, Any]:
    return {
        "hostname": hello.hostname,
        "backend": hello.backend,
        "snapshot_kind": hello.snapshot_kind,
        "boot": hello.boot,
        "instances": len(hello.instances),
        # The default of the site's start capacity (labgate.scheduler.startqueue).
        "cores": hello.cores,
        "tools": {name: reason for name, reason in sorted(hello.tools.items())},
        # The group volumes its group_root holds (labgate.scheduler.group_volumes).
        "groups": None if hello.groups is None else _plain_groups(hello.groups),
    }


def _plain_groups(said: list[str]) -> list[str]:
    """The group volumes an agent reported, as kept: plain names only, sorted, once each."""
    return sorted({name for name in said if plain_name(name)})


def _record_info(session: Session, name: str, said: dict[str, Any]) -> None:
    """Replace the entries ``said`` names of what the site's agent said of itself."""
    site = _site(session, name)
    if site is not None:
        site.agent_info = {**(site.agent_info or {}), **said}


def _record_away(
    session: Session, name: str, mine: datetime | None, fresh: float
) -> list[str] | None:
    """Mark the site disconnected; the ids of its instances that become unreachable.

    None, and nothing changed, when another portal holds the site's agent.
    """
    site = _site(session, name, lock=True)
    if _held_elsewhere(session, name, mine, fresh):
        return None
    if site is None:
        return []
    if site.connected_at is not None or site.disconnected_at is None:
        site.connected_at = None
        site.disconnected_at = utcnow()
    return list(
        session.scalars(
            select(Instance.id).where(Instance.site_id == site.id, Instance.state.in_(REACHABLE))
        )
    )


def _unfinished_on(session: Session, name: str) -> list[Instance]:
    site = _site(session, name)
    if site is None:
        return []
    rows = session.scalars(
        select(Instance)
        .where(Instance.site_id == site.id, Instance.state.in_(UNFINISHED))
        .order_by(Instance.created_at)
        .options(*with_owner_and_site())
    ).all()
    return list(rows)


def _record_beats(session: Session, beats: dict[str, float]) -> None:
    for site in session.scalars(select(Site).where(Site.name.in_(list(beats)))):
        site.last_seen_at = datetime.fromtimestamp(beats[site.name], UTC)


def _stopping_on(session: Session, sites: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, site, backend state) of the ``stopping`` instances of ``sites``."""
    rows = session.execute(
        select(Instance.id, Site.name, Instance.backend_state)
        .join(Site, Instance.site_id == Site.id)
        .where(Site.name.in_(sites), Instance.state == InstanceState.stopping)
    )
    return [(iid, name, dict(state or {})) for iid, name, state in rows]


def _network_sites(session: Session) -> dict[str, tuple[str, str]]:
    """(backend, reach) of every network site, by name."""
    rows = session.execute(
        select(Site.name, Site.backend, Site.reach).where(Site.kind == "network")
    )
    return {name: (backend, reach) for name, backend, reach in rows}
