"""The portal's side of the route table: what routers must know, fed on every change.

Routers check every request in memory, so the portal tells them about
instances (routes), users (admin flag, disabled, session cut-off), API tokens
(by hash) and revoked sessions whenever these change, and resyncs the whole
table from the database on start. The table is a
:class:`~labgate.router.RoutePublisher`: the in-process router reads it
directly and router processes follow its stream.

The methods may be called from any thread (API handlers run the database
work on worker threads); the publisher hands changes to its subscribers
thread-safely.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, load_only

from labgate.db.models import (
    ACTIVE_STATES,
    ApiToken,
    Instance,
    InstanceShare,
    InstanceState,
    RevokedSession,
    User,
    utcnow,
)
from labgate.portal.sharing import access_list, groups_of, instances_shared_with_groups
from labgate.security import SecretBox
from labgate.tools.catalog import Catalog
from labgate.wire.routes import (
    NO_ACCESS,
    NO_ENDPOINT,
    SNAPSHOT_VERSION,
    Route,
    RouteState,
    TokenInfo,
    UserInfo,
)
from labgate.wire.stream import RoutePublisher

log = logging.getLogger(__name__)

#: Routes exist while an instance can be reached or is about to be.
ROUTED_STATES = frozenset(
    {InstanceState.starting, InstanceState.running, InstanceState.unreachable}
)


class RouteFeedHub:
    """Turns portal changes into route-table updates for the routers."""

    def __init__(
        self, catalog: Catalog, box: SecretBox, table: RoutePublisher | None = None
    ) -> None:
        self.catalog = catalog
        #: Opens the sealed instance secrets the routes carry to the routers.
        self.box = box
        self.table = table or RoutePublisher()
        #: Each shared instance's access list (users with ``use``, groups expanded), kept
        #: in step by the sharing API and group changes; the routes carry it to routers.
        self.access: dict[str, frozenset[int]] = {}
        #: Where the router reaches an instance when not at its endpoint (``tunnel:SITE/ID``
        #: for a tunneled site; labgate.portal.sites), set by the app; None: the endpoint.
        self.upstream_of: Callable[[Instance], str | None] | None = None

    # --- instances ---------------------------------------------------------
    def route_for(self, instance: Instance) -> Route | None:
        """The route of an instance, or None when it must not be routed."""
        state = instance.state
        if state not in ROUTED_STATES and state not in (
            InstanceState.queued,
            InstanceState.pending,
        ):
            return None
        tool = self.catalog.get(instance.tool)
        running = state == InstanceState.running and bool(instance.endpoint)
        route_state: RouteState = "running" if running else "starting"
        # Its site's agent is away, but a tool that was ready may still answer at its
        # endpoint: the router tries it (a restarting agent interrupts no one) and says
        # "not connected" only when nothing answers there.
        away = (
            state == InstanceState.unreachable
            and bool(instance.endpoint)
            and instance.ready_at is not None
        )
        if state == InstanceState.unreachable:
            route_state = "unreachable"
        upstream = instance.endpoint if running or away else NO_ENDPOINT
        if (running or away) and self.upstream_of is not None:
            tunneled = self.upstream_of(instance)
            if tunneled:  # a tunnel goes with its agent: nothing to try while it is away
                upstream = tunneled if running else NO_ENDPOINT
        return Route(
            instance_id=instance.id,
            upstream=upstream,
            owner_id=instance.owner_id,
            access=self.access.get(instance.id, NO_ACCESS),
            state=route_state,
            keep_prefix=tool.supports_prefix if tool is not None else True,
            upstream_token=self.box.open(instance.id, instance.secret) or "",
        )

    def instance_changed(self, instance: Instance) -> None:
        """An instance changed state, endpoint or access."""
        route = self.route_for(instance)
        if route is None:
            if instance.state.terminal:
                self.access.pop(instance.id, None)
            self.table.remove_route(instance.id)
        else:
            self.table.add_route(route)

    # --- sharing -----------------------------------------------------------
    def access_changed(self, session: Session, instance_id: str) -> None:
        """An instance's shares changed: recompute its access list and re-send its route."""
        access = access_list(session, instance_id)
        if access:
            self.access[instance_id] = access
        else:
            self.access.pop(instance_id, None)
        route = self.table.routes.get(instance_id)
        if route is not None and route.access != access:
            self.table.add_route(replace(route, access=access))

    def memberships_changed(self, session: Session, user_id: int) -> None:
        """A user joined or left groups: instances shared with groups follow."""
        groups = groups_of(session, user_id)
        known = {i for i, users in self.access.items() if user_id in users}
        for instance_id in known | set(instances_shared_with_groups(session, groups)):
            self.access_changed(session, instance_id)

    def group_changed(self, session: Session, group_id: int) -> None:
        """A group's members changed: instances shared with it follow."""
        for instance_id in instances_shared_with_groups(session, [group_id]):
            self.access_changed(session, instance_id)

    # --- identities --------------------------------------------------------
    @staticmethod
    def user_info(user: User | Row[int, str, bool, bool, datetime]) -> UserInfo:
        """What the router knows of a user (a User, or a row of those columns)."""
        return UserInfo(
            id=user.id,
            name=user.name,
            is_admin=user.is_admin,
            disabled=user.disabled,
            sessions_valid_after=user.sessions_valid_after.timestamp(),
        )

    def user_changed(self, user: User) -> None:
        """A user was created or changed."""
        self.table.set_user(self.user_info(user))

    def user_removed(self, user_id: int) -> None:
        """A user was deleted."""
        self.table.remove_user(user_id)

    @staticmethod
    def token_info(token: ApiToken) -> TokenInfo:
        """What the router knows of a token."""
        expires = token.expires_at.timestamp() if token.expires_at is not None else None
        return TokenInfo(user_id=token.user_id, scopes=frozenset(token.scopes), expires_at=expires)

    def token_changed(self, token: ApiToken) -> None:
        """A token was created."""
        self.table.set_token(token.token_hash, self.token_info(token))

    def token_removed(self, token_hash: str) -> None:
        """A token was revoked."""
        self.table.remove_token(token_hash)

    def session_revoked(self, session_id: str, expires_at: float) -> None:
        """A browser session ended before its cookie expired."""
        self.table.revoke_session(session_id, expires_at)

    # --- full resync -------------------------------------------------------
    def snapshot_from(self, session: Session) -> dict[str, Any]:
        """The whole route table as the database says it should be."""
        # Columns, not User objects: a table of 50,000 users loads several times faster.
        columns = (User.id, User.name, User.is_admin, User.disabled, User.sessions_valid_after)
        users = [self.user_info(row).to_dict() for row in session.execute(select(*columns))]
        now = utcnow()
        tokens = [
            self.token_info(t).to_dict(t.token_hash)
            for t in session.scalars(select(ApiToken))
            if t.expires_at is None or t.expires_at > now
        ]
        revoked = [
            {"session_id": r.session_id, "expires_at": r.expires_at.timestamp()}
            for r in session.scalars(select(RevokedSession).where(RevokedSession.expires_at > now))
        ]
        routes = []
        self.access = {}
        for instance_id in session.scalars(select(InstanceShare.instance_id).distinct()):
            access = access_list(session, instance_id)
            if access:
                self.access[instance_id] = access
        # Only what a route is made of (no JSON columns to decode), for every active instance.
        routed = load_only(
            Instance.id,
            Instance.state,
            Instance.tool,
            Instance.endpoint,
            Instance.owner_id,
            Instance.secret,
            Instance.site_id,
        )
        active = select(Instance).where(Instance.state.in_(ACTIVE_STATES)).options(routed)
        for instance in session.scalars(active):
            route = self.route_for(instance)
            if route is not None:
                routes.append(route.to_dict())
        return {
            "version": SNAPSHOT_VERSION,
            "routes": routes,
            "users": users,
            "tokens": tokens,
            "revoked_sessions": revoked,
            # Which agents' tunnels are open is not in the database: keep it.
            "tunnel_sites": dict(self.table.tunnel_sites),
        }

    def load(self, session: Session) -> None:
        """Resync the table from the database (on start)."""
        snapshot = self.snapshot_from(session)
        self.table.resync(snapshot)
        log.info(
            "route table: %d routes, %d users, %d tokens",
            len(snapshot["routes"]),
            len(snapshot["users"]),
            len(snapshot["tokens"]),
        )
