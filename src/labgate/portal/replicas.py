"""Several portals on one PostgreSQL database: what one replica writes, the others follow.

Every portal keeps two things in memory that follow the database: the route
table routers stream from it (labgate.portal.routefeed) and the wake-ups of
its event stream readers (labgate.scheduler.events). A change made through
one replica must reach routers and readers that follow another, so on
PostgreSQL :class:`Replicas`

- has every transaction announce the rows it changed (labgate.db.changes:
  NOTIFY, delivered when the transaction commits);
- listens for those announcements (labgate.db.listen) and, for each, wakes
  the event stream readers of the instances named (other replicas' writes
  only: this replica woke its own already), and re-reads the named rows from
  the database and publishes to its routers whatever differs from its table
  (its own writes too: a re-read after the commit sees what was committed,
  so racing writes through two replicas end in what the database holds);
- on every (re)connect of its listening connection, reloads the whole route
  table (the routers get a fresh snapshot) and wakes every reader, since
  announcements sent while it was not listening are lost;
- relays commands for network sites whose agents are connected to another
  portal, and serves the others' (labgate.portal.site_relay), on the same
  connection.

On SQLite (one portal process) it only loads the route table on start.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.aio import cancel_and_wait
from labgate.db.changes import Change, announce_changes
from labgate.db.listen import ChangeListener
from labgate.db.models import ApiToken, Instance, RevokedSession, User
from labgate.portal.routefeed import RouteFeedHub, tunnel_epochs
from labgate.portal.site_relay import SiteRelay
from labgate.portal.state import Portal

log = logging.getLogger(__name__)


class Replicas:
    """Keeps this portal's route table and event readers in step with the other replicas."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        #: Names this portal's announcements (labgate.db.changes), set on PostgreSQL.
        self.origin = ""
        #: The listening connection (None on SQLite).
        self.listener: ChangeListener | None = None
        #: Commands for network sites connected to other portals (None on SQLite).
        self.relay: SiteRelay | None = None
        self._pending: set[Change] = set()
        self._wake = asyncio.Event()
        #: One reload or batch of changes at a time: each reads and publishes a whole state.
        self._applying = asyncio.Lock()
        self._worker: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        """Whether other portal processes may share the database (PostgreSQL)."""
        return self.portal.db.engine.dialect.name == "postgresql"

    async def start(self) -> None:
        """Load the route table; on PostgreSQL announce changes and follow the others'."""
        if not self.shared:
            await self._reload(wake=False)
            return
        self.origin = announce_changes(self.portal.db.sessionmaker)
        self._worker = asyncio.create_task(self._apply_pending(), name="labgate-replicas")
        self.relay = SiteRelay(self.portal)
        self.listener = ChangeListener(
            self.portal.db.url, self._heard, self._reload, channels=self.relay.channels
        )
        await self.listener.start()
        if not self.listener.listening.is_set():
            # Serve what the database holds now; the listener reloads when it connects.
            await self._reload(wake=False)

    async def close(self) -> None:
        """Stop following."""
        if self.listener is not None:
            await self.listener.close()
        if self.relay is not None:
            await self.relay.close()
        await cancel_and_wait(self._worker)
        self._worker = None

    async def _reload(self, *, wake: bool = True) -> None:
        routes = self.portal.routes
        if routes is not None:
            async with self._applying:
                await self.portal.run_db(routes.load)
        if wake:
            self.portal.events.notify_all()

    async def _heard(self, origin: str, changes: list[Change]) -> None:
        if origin != self.origin:
            for kind, key in changes:
                if kind == "instance":
                    self.portal.events.notify(key)
        if self.portal.routes is not None:
            self._pending.update(changes)
            self._wake.set()

    async def _apply_pending(self) -> None:
        routes = self.portal.routes
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, set()
            if routes is None or not batch:
                continue
            try:
                async with self._applying:
                    await self.portal.run_db(partial(apply_changes, hub=routes, changes=batch))
            except Exception:  # the next reload (or change) repairs the table
                log.exception("could not follow %d changes of other portals", len(batch))


#: Instances re-read per query.
READ_BATCH = 500


def apply_changes(session: Session, hub: RouteFeedHub, changes: Iterable[Change]) -> None:
    """Re-read the rows ``changes`` name and publish what differs from the route table.

    Access lists first: an instance's route carries its access list.
    """
    keys: dict[str, list[str]] = defaultdict(list)
    for kind, key in changes:
        keys[kind].append(key)
    for instance_id in sorted(keys["access"]):
        hub.access_changed(session, instance_id)
    instance_ids = sorted(keys["instance"])
    for start in range(0, len(instance_ids), READ_BATCH):
        chunk = instance_ids[start : start + READ_BATCH]
        rows = session.scalars(select(Instance).where(Instance.id.in_(chunk)))
        found = {row.id: row for row in rows}
        for instance_id in chunk:
            _instance(hub, instance_id, found.get(instance_id))
    for kind in ("member", "user", "token", "session"):
        for key in sorted(keys[kind]):
            try:
                _identity(session, hub, kind, key)
            except ValueError:
                log.warning("ignored a change with a malformed key: %s %r", kind, key)
    if keys["site"]:
        _tunnel_epochs(session, hub, keys["site"])


def _tunnel_epochs(session: Session, hub: RouteFeedHub, sites: list[str]) -> None:
    """Take the tunnel epochs of the sites named as their rows say (this portal's agents' first)."""
    epochs = tunnel_epochs(session)
    if hub.own_epochs is not None:
        epochs.update(hub.own_epochs())
    table = hub.table
    for site in sites:
        epoch = epochs.get(site)
        if epoch is None:
            if site in table.tunnel_sites:
                table.remove_tunnel_site(site)
        elif table.tunnel_sites.get(site) != epoch:
            table.set_tunnel_site(site, epoch)


def _instance(hub: RouteFeedHub, instance_id: str, instance: Instance | None) -> None:
    if instance is None:
        if instance_id in hub.table.routes:
            hub.table.remove_route(instance_id)
        hub.access.pop(instance_id, None)
        return
    if hub.route_for(instance) != hub.table.routes.get(instance_id):
        hub.instance_changed(instance)
    elif instance.state.terminal:
        hub.access.pop(instance_id, None)


def _identity(session: Session, hub: RouteFeedHub, kind: str, key: str) -> None:
    table = hub.table
    if kind == "member":
        hub.memberships_changed(session, int(key))
    elif kind == "user":
        user = session.get(User, int(key))
        if user is None:
            if int(key) in table.users:
                hub.user_removed(int(key), session)
        elif table.users.get(user.id) != hub.user_info(user):
            hub.user_changed(user)
    elif kind == "token":
        token = session.scalar(select(ApiToken).where(ApiToken.token_hash == key))
        if token is None:
            if key in table.tokens:
                hub.token_removed(key)
        elif table.tokens.get(key) != hub.token_info(token):
            hub.token_changed(token)
    elif kind == "session":
        revoked = session.get(RevokedSession, key)
        if revoked is not None:
            expires = revoked.expires_at.timestamp()
            if table.revoked.get(key, 0.0) < expires:
                hub.session_revoked(key, expires)
