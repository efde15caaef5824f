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
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from sqlalchemy import ColumnElement, DateTime, Row, or_, select, type_coerce
from sqlalchemy.orm import Session

from labgate.db.models import (
    ACTIVE_STATES,
    ApiToken,
    Instance,
    InstanceState,
    RevokedSession,
    Site,
    User,
    utcnow,
)
from labgate.portal.sharing import (
    access_list,
    access_lists,
    groups_of,
    instances_shared_with_groups,
)
from labgate.security import SecretBox
from labgate.tools.catalog import Catalog
from labgate.wire.routes import (
    NO_ACCESS,
    NO_ENDPOINT,
    Route,
    RouteState,
    TableState,
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
        self.upstream_of: Callable[[Routable], str | None] | None = None
        #: The tunnel epochs of the agents connected to this portal (the site hub's), set
        #: by the app; the rest come from the sites' rows.
        self.own_epochs: Callable[[], dict[str, str]] | None = None

    # --- instances ---------------------------------------------------------
    def route_for(self, instance: Routable) -> Route | None:
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
        try:
            return Route(
                instance_id=instance.id,
                upstream=upstream,
                owner_id=instance.owner_id,
                access=self.access.get(instance.id, NO_ACCESS),
                state=route_state,
                keep_prefix=tool.supports_prefix if tool is not None else True,
                upstream_token=self.box.open(instance.id, instance.secret) or "",
            )
        except ValueError as exc:
            # An endpoint stored before reports were checked: that instance is not routed,
            # and the rest of the table (and the portal's start) goes on.
            log.warning("instance %s is not routed: %s", instance.id, exc)
            return None

    def instance_changed(self, instance: Routable) -> None:
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
        self._set_access(instance_id, access_list(session, instance_id))

    def _set_access(self, instance_id: str, access: frozenset[int]) -> None:
        """Keep ``access`` as the instance's access list and re-send its route if it changed."""
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

    def user_removed(self, user_id: int, session: Session | None = None) -> None:
        """A user was deleted: every trace of them leaves the routers at once.

        Their tokens go, and every access list that named them is recomputed from
        ``session`` (their shares and memberships are gone from the database by
        then), or, without one, has them taken out: an id the router still knew
        would let whoever gets it next (or a token of theirs) in.
        """
        for token_hash, info in list(self.table.tokens.items()):
            if info.user_id == user_id:
                self.table.remove_token(token_hash)
        named = [i for i, users in list(self.access.items()) if user_id in users]
        for instance_id in named:
            if session is not None:
                self.access_changed(session, instance_id)
            else:
                self._set_access(instance_id, self.access[instance_id] - {user_id})
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
    def state_from(self, session: Session) -> TableState:
        """The whole route table as the database says it should be.

        Built from columns, never ORM objects, and straight into the table's
        objects (no JSON form in between): 50,000 users and 10,000 routes load
        in a fraction of a second.
        """
        # Core rows (the session's connection), not the ORM's: the ORM's row
        # processing costs as much again as reading the rows. The time is read
        # as it is stored (naive from SQLite) and made Unix seconds in one step.
        connection = session.connection()
        valid_after = type_coerce(User.sessions_valid_after, DateTime())
        columns = (User.id, User.name, User.is_admin, User.disabled, valid_after)
        users = {
            user_id: UserInfo(user_id, name, is_admin, disabled, unix_time(after))
            for user_id, name, is_admin, disabled, after in connection.execute(
                select(*columns)
            ).all()
        }
        now = utcnow()
        token_columns = (
            ApiToken.token_hash,
            ApiToken.user_id,
            ApiToken.scopes,
            ApiToken.expires_at,
        )
        live = or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now)
        tokens = {
            token_hash: TokenInfo(
                user_id, frozenset(scopes or ()), None if expires is None else expires.timestamp()
            )
            for token_hash, user_id, scopes, expires in session.execute(
                select(*token_columns).where(live)
            )
        }
        revoked = {
            session_id: expires_at.timestamp()
            for session_id, expires_at in session.execute(
                select(RevokedSession.session_id, RevokedSession.expires_at).where(
                    RevokedSession.expires_at > now
                )
            )
        }
        self.access = access_lists(session)
        routes = {}
        for source in route_sources(session):
            route = self.route_for(source)
            if route is not None:
                routes[route.instance_id] = route
        # The agents' tunnel epochs as the sites' rows say (any portal's agents), and those
        # of this portal's own agents, which may be newer than their rows for a moment.
        epochs = tunnel_epochs(session)
        if self.own_epochs is not None:
            epochs.update(self.own_epochs())
        return TableState(routes, users, tokens, revoked, epochs)

    def load(self, session: Session) -> None:
        """Resync the table from the database (on start; on reconnecting to the other replicas)."""
        state = self.state_from(session)
        self.table.replace(state)
        log.info(
            "route table: %d routes, %d users, %d tokens",
            len(state.routes),
            len(state.users),
            len(state.tokens),
        )


def tunnel_epochs(session: Session) -> dict[str, str]:
    """Each tunneled network site's current epoch, as the sites' rows say."""
    rows = session.execute(
        select(Site.name, Site.tunnel_epoch).where(
            Site.kind == "network", Site.reach == "tunnel", Site.tunnel_epoch.is_not(None)
        )
    )
    return {name: epoch for name, epoch in rows if epoch}


_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)


def unix_time(value: datetime) -> float:
    """A stored time as Unix seconds; a naive one (SQLite's) is UTC."""
    return (value - (_EPOCH if value.tzinfo is None else _EPOCH_UTC)).total_seconds()


class Routable(Protocol):
    """What a route is made of: an :class:`~labgate.db.models.Instance` or a row of its columns."""

    @property
    def id(self) -> str:
        """The instance id."""

    @property
    def owner_id(self) -> int:
        """Its owner."""

    @property
    def tool(self) -> str:
        """Its tool's name."""

    @property
    def state(self) -> InstanceState:
        """Its state."""

    @property
    def endpoint(self) -> str:
        """Where its tool listens ("" until known)."""

    @property
    def secret(self) -> str:
        """Its sealed upstream token ("" for none)."""

    @property
    def ready_at(self) -> datetime | None:
        """When it first became ready."""

    @property
    def site_name(self) -> str | None:
        """Its site's name."""


class RouteSource(NamedTuple):
    """An instance's columns that make its route, read without an ORM object (a fast load)."""

    id: str
    owner_id: int
    tool: str
    state: InstanceState
    endpoint: str
    secret: str
    ready_at: datetime | None
    site_name: str | None


def route_sources(session: Session, *criteria: ColumnElement[bool]) -> list[RouteSource]:
    """What the routes of the active instances (matching ``criteria``) are made of."""
    query = (
        select(
            Instance.id,
            Instance.owner_id,
            Instance.tool,
            Instance.state,
            Instance.endpoint,
            Instance.secret,
            Instance.ready_at,
            Site.name,
        )
        .outerjoin(Site, Instance.site_id == Site.id)
        .where(Instance.state.in_(ACTIVE_STATES), *criteria)
    )
    return [RouteSource(*row) for row in session.connection().execute(query).all()]
