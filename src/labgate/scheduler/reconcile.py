"""Reconcile: sites drop what labgate does not know about.

At start-up (after the portal re-attached to its instances) and every
``reconcile_interval`` seconds, each site is told which of its instances the
database knows as unfinished (pending, starting, running, stopping). The
site's agent adds the ones it is starting or watching itself and asks its
backend to remove everything else it runs for this labgate: containers left
by a crash, by a stop that never finished, or of instances that ended while
labgate was down. Instances whose container vanished are found by the
agent's polling and become ``lost``. Each round also settles snapshots
(:meth:`SnapshotManager.settle`): saves cut short by a restart are finished or
failed, and ready snapshots whose image is gone are shown ``missing``.

Among several portal replicas only the leader reconciles
(:mod:`labgate.scheduler.leader`), asking before each site; a replica that
begins leading reconciles at once. A network site whose agent is not
connected here is skipped: its agent's hello is reconciled by the replica it
connects to (:mod:`labgate.scheduler.liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.aio import cancel_and_wait, wait_for
from labgate.db.models import ACTIVE_STATES, Instance, InstanceState, Site
from labgate.db.session import Database
from labgate.scheduler.leader import Leadership, SoleLeader
from labgate.scheduler.snapshots import SnapshotManager

log = logging.getLogger(__name__)


def unfinished_by_site(session: Session) -> dict[str, set[str]]:
    """Ids of the instances each site should be running (stopping ones included)."""
    rows = session.execute(
        select(Site.name, Instance.id)
        .join(Site, Instance.site_id == Site.id)
        .where(Instance.state.in_([*ACTIVE_STATES, InstanceState.stopping]))
    )
    known: dict[str, set[str]] = {}
    for site, instance_id in rows:
        known.setdefault(site, set()).add(instance_id)
    return known


class Reconciler:
    """Runs :meth:`run_once` now and then, for every site."""

    def __init__(
        self,
        db: Database,
        links: dict[str, SiteLink],
        interval: float,
        snapshots: SnapshotManager | None = None,
        leader: Leadership | None = None,
    ) -> None:
        self.db = db
        self.links = links
        self.interval = interval
        #: Unfinished and vanished snapshots are settled on every round too.
        self.snapshots = snapshots
        #: Only the leader reconciles; ``labgate serve`` always leads.
        self.leader: Leadership = leader or SoleLeader()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> dict[str, list[str]]:
        """One round; the instance ids each site removed (none unless leading)."""
        if not self.leader.leading:
            return {}

        def query() -> dict[str, set[str]]:
            with self.db.session() as session:
                return unfinished_by_site(session)

        known = await asyncio.to_thread(query)
        removed: dict[str, list[str]] = {}
        for name, link in list(self.links.items()):
            if not self.leader.leading:
                return removed  # the lease ran out mid-round
            if not link.live:
                continue  # an away agent is reconciled on its hello, wherever it connects
            try:
                removed[name] = await link.reconcile(known.get(name, set()))
            except Exception:
                log.exception("reconciling site %s failed", name)
        if self.snapshots is not None and self.leader.leading:
            try:
                await self.snapshots.settle()
            except Exception:
                log.exception("settling snapshots failed")
        return removed

    def start(self) -> None:
        """Reconcile every ``interval`` seconds in the background (never when it is 0)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="reconcile")

    def poke(self) -> None:
        """Reconcile now rather than at the next interval (a replica began leading)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.run_once()

    async def close(self) -> None:
        """Stop the background loop."""
        await cancel_and_wait(self._task)
        self._task = None
