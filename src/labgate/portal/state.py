"""The portal's long-lived services, built once per app and shared by requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from sqlalchemy.orm import Session

from labgate.config import Settings, SiteConfig
from labgate.db.session import Database
from labgate.identity.base import IdentityProvider, load_providers
from labgate.passwords import PasswordWorkers
from labgate.portal.login_limits import LoginLimiter
from labgate.scheduler.activity import ActivityBoard
from labgate.scheduler.events import EventBus
from labgate.scheduler.leader import Leadership, SoleLeader
from labgate.security import InstanceGrants, SecretBox, SessionSigner
from labgate.tools.catalog import Catalog

if TYPE_CHECKING:
    from labgate.agent.hub import SiteHub
    from labgate.agent.link import SiteLink
    from labgate.portal.routefeed import RouteFeedHub
    from labgate.portal.tunnel_routers import TunnelRouters
    from labgate.scheduler.instances import InstanceManager
    from labgate.scheduler.runs import RunProcessor
    from labgate.scheduler.snapshots import SnapshotManager

T = TypeVar("T")


@dataclass
class Portal:
    """Settings, database, catalog, credentials, password workers and the instance manager."""

    settings: Settings
    db: Database
    catalog: Catalog
    signer: SessionSigner
    #: Seals instance secrets at rest (a key derived from the signing key).
    box: SecretBox
    events: EventBus = field(default_factory=EventBus)
    links: dict[str, SiteLink] = field(default_factory=dict)
    manager: InstanceManager | None = None
    routes: RouteFeedHub | None = None
    activity: ActivityBoard = field(default_factory=ActivityBoard)
    snapshots: SnapshotManager | None = None
    #: The network sites' agent connections (labgate.agent.hub), set by the app.
    site_hub: SiteHub | None = None
    #: The routers tunneled sites' agents dial (labgate.portal.tunnel_routers), set by the app.
    tunnel_routers: TunnelRouters | None = None
    #: Batch runs (labgate.scheduler.runs), set by the app.
    run_processor: RunProcessor | None = None
    #: Whether this process runs the loops that run once (labgate.scheduler.leader).
    leader: Leadership = field(default_factory=SoleLeader)
    #: One of several portal processes on one database (``labgate portal``): no sites
    #: of its own, every site a network site whose agent may dial any replica.
    replicated: bool = False
    #: Set once the server stopped listening: long-lived streams end (their clients reconnect).
    stopping: bool = False
    passwords: PasswordWorkers = field(init=False)
    login_limits: LoginLimiter = field(init=False)
    #: The identity providers, by name, in the order of the settings.
    providers: dict[str, IdentityProvider] = field(init=False)
    #: Signs hand-off codes for instances on their own hosts (``instance_host``).
    instance_grants: InstanceGrants = field(init=False)

    def __post_init__(self) -> None:
        self.providers = load_providers(self.settings.identity_providers)
        self.passwords = PasswordWorkers(
            self.settings.password_hash_workers, self.settings.password_min_length
        )
        self.login_limits = LoginLimiter(self.settings)
        self.instance_grants = InstanceGrants(self.signer.key, self.signer.max_age)

    async def run_db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a committed session on a worker thread (:meth:`Database.transact`)."""
        return await self.db.run(fn)

    def begin_shutdown(self) -> None:
        """The portal is about to stop: agent connections that end now are no departures.

        Called by the server before it stops listening (the agents' connections
        end with it); their sites keep their instances' states for the next
        portal, which gives them ``site_reconnect_window`` to come back.
        """
        if self.site_hub is not None:
            self.site_hub.draining()

    def end_streams(self) -> None:
        """The server stopped listening: end the streams that never end by themselves.

        Routers on the route stream and readers of event streams would hold the
        server's graceful stop open for ever; ended, they reconnect (to another
        replica, or to this one when it is back), as after any broken stream.
        """
        self.stopping = True
        if self.routes is not None:
            self.routes.table.disconnect_all()
        self.events.notify_all()

    @property
    def local_sites(self) -> list[SiteConfig]:
        """The sites this process runs in process: the settings' (none for a replica)."""
        return [] if self.replicated else self.settings.effective_sites

    @property
    def instances(self) -> InstanceManager:
        """The instance manager (present once the app has started)."""
        if self.manager is None:
            raise RuntimeError("the portal is not started: it has no instance manager")
        return self.manager


def runs_of(portal: Portal) -> RunProcessor:
    """The run processor (present once the app has started)."""
    if portal.run_processor is None:
        raise RuntimeError("the portal is not started: it has no run processor")
    return portal.run_processor


def get_portal(request: Request) -> Portal:
    """The portal services of the app serving ``request``."""
    portal: Portal = request.app.state.portal
    return portal
