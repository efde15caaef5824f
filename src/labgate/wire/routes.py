"""The router's in-memory state: routes, users, tokens and revoked sessions.

The portal owns the truth (its database); a router holds a copy that is fed
through :class:`RouterControl` (in process) or the route stream (in a separate
``labgate router`` process, see :mod:`labgate.wire.stream`). Every request is
decided from this copy alone, so nothing here may block or touch a database.

A :meth:`RouteTable.snapshot` is one JSON-able dict holding everything::

    {
      "version": 1,
      "routes": [{"instance_id", "upstream", "owner_id", "access", "state",
                  "keep_prefix", "upstream_token"}, ...],
      "users": [{"id", "name", "is_admin", "disabled", "sessions_valid_after"}, ...],
      "tokens": [{"token_hash", "user_id", "scopes", "expires_at"}, ...],
      "revoked_sessions": [{"session_id", "expires_at"}, ...],
      "tunnel_sites": {"<site>": "<epoch>", ...}
    }

``tunnel_sites`` names, per tunneled network site whose agent is connected,
that connection's epoch: the only one whose tunnel tickets the router takes
(:mod:`labgate.wire.tunnel`).

Tokens appear only as ``hash_token(token)``; the portal never knows more.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

SNAPSHOT_VERSION = 1

RouteState = Literal["starting", "running", "unreachable"]
#: The route states, each one shared copy; with NO_ACCESS below, what a table of
#: up to a million routes would otherwise hold once per route (an empty frozenset
#: is 216 bytes).
ROUTE_STATES: dict[str, RouteState] = {
    "starting": "starting",
    "running": "running",
    "unreachable": "unreachable",
}
NO_ACCESS: frozenset[int] = frozenset()
#: Where a route points when the instance has no address to try (starting, or away
#: with no way in); never connected to: the router answers 503 for such routes.
NO_ENDPOINT = "http://127.0.0.1:9"


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    """Where a route's traffic goes: a TCP host and port, a unix socket path, or a site tunnel.

    A tunnel address (``tunnel:SITE/INSTANCE``) is reached through the data
    connection that site's agent keeps with the router (:mod:`labgate.wire.tunnel`).
    """

    host: str = ""
    port: int = 0
    path: str = ""
    site: str = ""
    instance: str = ""
    #: The router's pool key: a string, which keeps its hash (the pool looks it up on
    #: every request; a tuple would be hashed each time and, in the compiled router,
    #: unpacked and packed again).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = (
            f"tunnel {self.site} {self.instance}"
            if self.site
            else f"unix {self.path}"
            if self.path
            else f"tcp {self.host} {self.port}"
        )
        object.__setattr__(self, "key", key)

    @property
    def is_unix(self) -> bool:
        """Whether this is a unix socket."""
        return bool(self.path)

    @property
    def is_tunnel(self) -> bool:
        """Whether this is reached through a site's tunnel."""
        return bool(self.site)

    def __str__(self) -> str:
        if self.site:
            return f"tunnel:{self.site}/{self.instance}"
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@functools.lru_cache(maxsize=65536)
def parse_upstream(value: str) -> UpstreamAddress:
    """Parse ``http://HOST:PORT`` (or ``HOST:PORT``), ``unix:/path`` or ``tunnel:SITE/ID``.

    Raises ``ValueError`` for anything else (https upstreams are not proxied:
    instances live on a trusted network or behind a site tunnel).
    """
    if value.startswith("tunnel:"):
        site, sep, instance = value[7:].partition("/")
        if not site or not sep or not instance or "/" in instance:
            raise ValueError(f"tunnel upstream must be tunnel:SITE/INSTANCE, not {value!r}")
        return UpstreamAddress(site=site, instance=instance)
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix upstream needs an absolute path: {value!r}")
        return UpstreamAddress(path=path)
    rest = value[7:] if value.startswith("http://") else value
    rest = rest.rstrip("/")
    if "/" in rest or ("://" in value and not value.startswith("http://")):
        raise ValueError(f"upstream must be http://HOST:PORT or unix:/PATH, not {value!r}")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
    else:
        host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"upstream must be http://HOST:PORT or unix:/PATH, not {value!r}")
    return UpstreamAddress(host=host, port=int(port_text))


@dataclass(frozen=True, slots=True)
class Route:
    """One instance reachable under ``/i/<instance_id>/``.

    ``access`` holds the ids of users other than the owner who may use the
    instance (those it is shared with as ``use``, groups expanded); admins may
    always. ``keep_prefix`` forwards the path unchanged (the tool honours its base URL); otherwise
    ``/i/<id>`` is stripped. ``upstream_token`` is sent to the tool as
    ``Authorization: token <it>`` so the tool accepts only proxied traffic.
    """

    instance_id: str
    upstream: str
    owner_id: int
    access: frozenset[int] = NO_ACCESS
    state: RouteState = "running"
    keep_prefix: bool = True
    upstream_token: str = ""
    address: UpstreamAddress = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.instance_id or "/" in self.instance_id:
            raise ValueError(f"bad instance id {self.instance_id!r}")
        state = ROUTE_STATES.get(self.state)
        if state is None:
            raise ValueError(f"bad route state {self.state!r}")
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "access", frozenset(self.access) if self.access else NO_ACCESS)
        object.__setattr__(self, "address", parse_upstream(self.upstream))

    @property
    def prefix(self) -> bytes:
        """The path prefix the instance is served under: ``/i/<id>``."""
        return f"/i/{self.instance_id}".encode()

    @property
    def head_lines(self) -> bytes:
        """The route's own request header lines: its prefix, and its upstream token.

        The prefix line comes first: an instance on its own host is sent the
        rest. Built when asked (the proxy keeps them per kept-alive
        connection), not kept per route: a table of 100,000 routes would hold
        about 20 MiB of them.
        """
        lines = b"X-Forwarded-Prefix: /i/" + self.instance_id.encode() + b"\r\n"
        if self.upstream_token:
            lines += b"Authorization: token " + self.upstream_token.encode() + b"\r\n"
        return lines

    @property
    def prefix_line_length(self) -> int:
        """Bytes of the ``X-Forwarded-Prefix`` line at the start of ``head_lines``."""
        return len(self.instance_id.encode()) + 25

    def allows(self, user_id: int) -> bool:
        """Whether a (non-admin) user may use this instance."""
        return user_id == self.owner_id or user_id in self.access

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this route."""
        return {
            "instance_id": self.instance_id,
            "upstream": self.upstream,
            "owner_id": self.owner_id,
            "access": sorted(self.access),
            "state": self.state,
            "keep_prefix": self.keep_prefix,
            "upstream_token": self.upstream_token,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Route:
        """A route from its JSON form."""
        return cls(
            instance_id=str(data["instance_id"]),
            upstream=str(data["upstream"]),
            owner_id=int(data["owner_id"]),
            access=frozenset(map(int, data.get("access") or ())),
            state=data.get("state", "running"),
            keep_prefix=bool(data.get("keep_prefix", True)),
            upstream_token=str(data.get("upstream_token", "")),
        )


@dataclass(frozen=True, slots=True)
class UserInfo:
    """What the router needs to know about a user.

    Sessions issued before ``sessions_valid_after`` (a Unix time, set on
    password change or disable) are refused.
    """

    id: int
    name: str
    is_admin: bool = False
    disabled: bool = False
    sessions_valid_after: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this user."""
        return {
            "id": self.id,
            "name": self.name,
            "is_admin": self.is_admin,
            "disabled": self.disabled,
            "sessions_valid_after": self.sessions_valid_after,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserInfo:
        """A user from its JSON form."""
        return cls(
            id=int(data["id"]),
            name=str(data["name"]),
            is_admin=bool(data.get("is_admin", False)),
            disabled=bool(data.get("disabled", False)),
            sessions_valid_after=float(data.get("sessions_valid_after", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An API token, known to the router only by its hash."""

    user_id: int
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", frozenset(self.scopes))

    def to_dict(self, token_hash: str) -> dict[str, Any]:
        """The JSON form of this token under its hash."""
        return {
            "token_hash": token_hash,
            "user_id": self.user_id,
            "scopes": sorted(self.scopes),
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenInfo:
        """A token from its JSON form (``token_hash`` is read by the caller)."""
        expires = data.get("expires_at")
        return cls(
            user_id=int(data["user_id"]),
            scopes=frozenset(str(s) for s in data.get("scopes", ())),
            expires_at=None if expires is None else float(expires),
        )


@dataclass(slots=True)
class TableState:
    """Everything a route table holds, as objects: what a snapshot decodes to.

    The portal builds one straight from its database (no JSON form in between)
    and hands it to :meth:`RouteTable.replace`.
    """

    routes: dict[str, Route] = field(default_factory=dict)
    users: dict[int, UserInfo] = field(default_factory=dict)
    #: Token hash -> token.
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    #: Revoked session id -> when its cookie expires (Unix time).
    revoked: dict[str, float] = field(default_factory=dict)
    #: Tunneled site -> its connected agent's epoch.
    tunnel_sites: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> TableState:
        """The state of a snapshot (see the module docstring); ValueError on another version."""
        version = snapshot.get("version", SNAPSHOT_VERSION)
        if version != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {version!r}")
        return cls(
            routes={r.instance_id: r for r in map(Route.from_dict, snapshot.get("routes", ()))},
            users={u.id: u for u in map(UserInfo.from_dict, snapshot.get("users", ()))},
            tokens={
                str(t["token_hash"]): TokenInfo.from_dict(t) for t in snapshot.get("tokens", ())
            },
            revoked={
                str(r["session_id"]): float(r["expires_at"])
                for r in snapshot.get("revoked_sessions", ())
            },
            tunnel_sites={str(k): str(v) for k, v in (snapshot.get("tunnel_sites") or {}).items()},
        )


@runtime_checkable
class RouterControl(Protocol):
    """What the portal calls to keep routers in step with its database.

    Every method is idempotent and cheap; the portal calls them on each
    change (launch ready, stop, login/logout, token created/deleted, password
    change) and ``resync`` with a full :meth:`RouteTable.snapshot` at start.
    """

    def add_route(self, route: Route) -> None:
        """Add or replace the route of ``route.instance_id``."""

    def remove_route(self, instance_id: str) -> None:
        """Withdraw a route; unknown ids are ignored."""

    def list_routes(self) -> list[Route]:
        """Every route."""
        ...

    def set_user(self, user: UserInfo) -> None:
        """Add or replace a user."""

    def remove_user(self, user_id: int) -> None:
        """Forget a user (their sessions and tokens stop working)."""

    def set_token(self, token_hash: str, info: TokenInfo) -> None:
        """Add or replace an API token, by ``hash_token(token)``."""

    def remove_token(self, token_hash: str) -> None:
        """Forget an API token."""

    def revoke_session(self, session_id: str, expires_at: float) -> None:
        """Refuse a session id until ``expires_at`` (when its cookie would expire anyway)."""

    def set_tunnel_site(self, site: str, epoch: str) -> None:
        """Site ``site``'s agent is connected as ``epoch``: take tunnels of that epoch only."""

    def remove_tunnel_site(self, site: str) -> None:
        """Site ``site``'s agent is gone: close its tunnel, take none."""

    def resync(self, snapshot: dict[str, Any]) -> None:
        """Replace everything with a full snapshot."""


RemovalListener = Callable[[str], None]
#: Told of a route whose access list (or owner) changed so that someone lost access.
NarrowedListener = Callable[[Route], None]
#: Told that credentials may have stopped holding: ``(user_id, None)`` those of one
#: user (changed, disabled, removed, a token of theirs removed or replaced),
#: ``(None, session_id)`` those of one portal session (revoked), ``(None, None)``
#: anyone's (the whole table replaced).
CredentialsListener = Callable[[int | None, str | None], None]


class RouteTable:
    """The router's state; implements :class:`RouterControl`.

    Lookups are plain dict probes. The attributes are public for the proxy's
    hot path and must only be changed through the methods. ``generation``
    changes whenever anything credentials depend on changes (users, tokens,
    revocations), so decisions may be cached until it moves.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.users: dict[int, UserInfo] = {}
        self.tokens: dict[str, TokenInfo] = {}
        self.revoked: dict[str, float] = {}
        self.tunnel_sites: dict[str, str] = {}
        self.generation = 0
        self._removal_listeners: list[RemovalListener] = []
        self._narrowed_listeners: list[NarrowedListener] = []
        self._tunnel_listeners: list[RemovalListener] = []
        self._credentials_listeners: list[CredentialsListener] = []

    # --- RouterControl -------------------------------------------------------
    def add_route(self, route: Route) -> None:
        """Add or replace the route of ``route.instance_id``; listeners hear of lost access."""
        old = self.routes.get(route.instance_id)
        self.routes[route.instance_id] = route
        if old is not None and (old.owner_id != route.owner_id or not old.access <= route.access):
            for listener in self._narrowed_listeners:
                listener(route)

    def remove_route(self, instance_id: str) -> None:
        """Withdraw a route and tell listeners (the proxy closes its tunnels)."""
        if self.routes.pop(instance_id, None) is not None:
            for listener in self._removal_listeners:
                listener(instance_id)

    def list_routes(self) -> list[Route]:
        """Every route."""
        return list(self.routes.values())

    def set_user(self, user: UserInfo) -> None:
        """Add or replace a user; listeners hear of a changed one."""
        old = self.users.get(user.id)
        self.users[user.id] = user
        self.generation += 1
        if old is not None and old != user:
            self._credentials_changed(user.id, None)

    def remove_user(self, user_id: int) -> None:
        """Forget a user; listeners hear of it."""
        old = self.users.pop(user_id, None)
        self.generation += 1
        if old is not None:
            self._credentials_changed(user_id, None)

    def set_token(self, token_hash: str, info: TokenInfo) -> None:
        """Add or replace an API token by its hash; listeners hear of a changed one."""
        old = self.tokens.get(token_hash)
        self.tokens[token_hash] = info
        self.generation += 1
        if old is not None and old != info:
            self._credentials_changed(old.user_id, None)

    def remove_token(self, token_hash: str) -> None:
        """Forget an API token; listeners hear whose it was."""
        old = self.tokens.pop(token_hash, None)
        self.generation += 1
        if old is not None:
            self._credentials_changed(old.user_id, None)

    def revoke_session(self, session_id: str, expires_at: float) -> None:
        """Refuse a session id until ``expires_at``; listeners hear of it."""
        self.revoked[session_id] = max(expires_at, self.revoked.get(session_id, 0.0))
        self.generation += 1
        self._credentials_changed(None, session_id)

    def set_tunnel_site(self, site: str, epoch: str) -> None:
        """Take tunnels of ``site`` under ``epoch`` only; listeners close any other."""
        if self.tunnel_sites.get(site) != epoch:
            self.tunnel_sites[site] = epoch
            self._tunnel_changed(site)

    def remove_tunnel_site(self, site: str) -> None:
        """Take no tunnel of ``site``; listeners close the one it has."""
        if self.tunnel_sites.pop(site, None) is not None:
            self._tunnel_changed(site)

    def _tunnel_changed(self, site: str) -> None:
        for listener in self._tunnel_listeners:
            listener(site)

    def _credentials_changed(self, user_id: int | None, session_id: str | None) -> None:
        for listener in self._credentials_listeners:
            listener(user_id, session_id)

    def resync(self, snapshot: dict[str, Any]) -> None:
        """Replace everything with ``snapshot``; listeners hear of routes that went away."""
        self.replace(TableState.from_snapshot(snapshot))

    def replace(self, state: TableState) -> None:
        """Replace everything with ``state``; listeners hear of routes that went away."""
        routes, tunnel_sites = state.routes, state.tunnel_sites
        gone = [instance_id for instance_id in self.routes if instance_id not in routes]
        narrowed = [
            new
            for instance_id, new in routes.items()
            if (old := self.routes.get(instance_id)) is not None
            and (old.owner_id != new.owner_id or not old.access <= new.access)
        ]
        doors = [
            site
            for site in {*self.tunnel_sites, *tunnel_sites}
            if self.tunnel_sites.get(site) != tunnel_sites.get(site)
        ]
        self.routes, self.users, self.tokens = routes, state.users, state.tokens
        self.revoked, self.tunnel_sites = state.revoked, tunnel_sites
        self.generation += 1
        for instance_id in gone:
            for listener in self._removal_listeners:
                listener(instance_id)
        for changed in narrowed:
            for narrowed_listener in self._narrowed_listeners:
                narrowed_listener(changed)
        for site in doors:
            self._tunnel_changed(site)
        self._credentials_changed(None, None)

    # --- the rest -----------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything, as one JSON-able dict (see the module docstring)."""
        return {
            "version": SNAPSHOT_VERSION,
            "routes": [r.to_dict() for r in self.routes.values()],
            "users": [u.to_dict() for u in self.users.values()],
            "tokens": [info.to_dict(h) for h, info in self.tokens.items()],
            "revoked_sessions": [
                {"session_id": s, "expires_at": e} for s, e in self.revoked.items()
            ],
            "tunnel_sites": dict(self.tunnel_sites),
        }

    def on_access_narrowed(self, listener: NarrowedListener) -> None:
        """Call ``listener(route)`` when a replaced route lets fewer users in than before."""
        self._narrowed_listeners.append(listener)

    def on_route_removed(self, listener: RemovalListener) -> None:
        """Call ``listener(instance_id)`` whenever a route is withdrawn."""
        self._removal_listeners.append(listener)

    def on_credentials_changed(self, listener: CredentialsListener) -> None:
        """Call ``listener(user_id, session_id)`` when credentials may have stopped holding.

        See :data:`CredentialsListener`; called after the change, as the
        other listeners are (from whatever thread made it).
        """
        self._credentials_listeners.append(listener)

    def on_tunnel_site_changed(self, listener: RemovalListener) -> None:
        """Call ``listener(site)`` whenever a site's tunnel epoch changes or goes."""
        self._tunnel_listeners.append(listener)

    def purge_revoked(self, now: float | None = None) -> int:
        """Drop revocations whose cookies have expired anyway; returns how many."""
        now = time.time() if now is None else now
        stale = [s for s, expires in self.revoked.items() if expires <= now]
        for session_id in stale:
            del self.revoked[session_id]
        return len(stale)

    def load(
        self,
        routes: Iterable[Route] = (),
        users: Iterable[UserInfo] = (),
        tokens: Iterable[tuple[str, TokenInfo]] = (),
    ) -> None:
        """Add several things at once (tests, the benchmark)."""
        for route in routes:
            self.add_route(route)
        for user in users:
            self.set_user(user)
        for token_hash, info in tokens:
            self.set_token(token_hash, info)
