"""Who is asking, and may they use this instance: decided in memory.

A request is authenticated by, in order:

1. an API token in ``Authorization: token lg_…`` or ``Authorization: Bearer
   lg_…``, looked up by its SHA-256 in the route table, with the
   ``instances:access`` (or ``admin``) scope, not expired;
2. the portal's signed session cookie (``labgate-session``, or
   ``__Host-labgate-session`` when cookies are Secure: the router is told
   which): signature and age checked once per cookie value (then cached),
   session id not revoked, user known and not disabled, issued no earlier
   than the user's ``sessions_valid_after``. A ``Cookie`` header holding
   the name more than once counts as no session: the second is a cookie
   another host tossed in (``Domain=<parent>``), and which one would win is
   the attacker's choice.

On an instance's own host name (``instance_host``), the portal's session
cookie is never taken: an API token, else the router's instance cookie
(``labgate-instance``, or ``__Host-labgate-instance`` when cookies are
Secure, which no sibling host can plant; signed, naming that instance, its
host, the user and their portal session, checked once per value and then
cached; sent more than once, it counts for nothing either).

Then the instance's access list decides: the owner, users listed in
``Route.access``, and admins. But a portal session cookie on ``/i/<id>/``
(the portal's own origin) opens only its user's own instances: the tool's
pages run there with the visitor's session, so admins and shares get in
with an API token or on instance hosts only, unless the operator opted in
(``share_on_portal_origin``). Nothing here blocks or allocates much; the
cached signature check is what makes cookie auth cheap on the hot path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Final, Literal

from labgate.router.hosts import InstanceHosts
from labgate.router.http import header_safe
from labgate.security import (
    HANDOFF_COOKIE,
    INSTANCE_COOKIE,
    INSTANCE_COOKIES,
    SESSION_COOKIE,
    SESSION_COOKIES,
    TOKEN_PREFIX,
    HandoffCode,
    InstanceClaim,
    InstanceGrants,
    SessionClaim,
    SessionSigner,
    hash_token,
    pkce_challenge,
)
from labgate.wire.routes import Route, RouteTable, UserInfo

ACCESS_SCOPES: Final = frozenset({"instances:access", "admin"})
_COOKIE_NAME: Final = SESSION_COOKIE.encode()
#: Both names of the session cookie: whichever the portal uses, neither reaches a tool.
_SESSION_NAMES: Final = frozenset(name.encode() for name in SESSION_COOKIES)
#: What both names hold: a ``Cookie`` header without it has no session cookie at all.
_SESSION_MARK: Final = b"labgate-session"
_INSTANCE_COOKIE: Final = INSTANCE_COOKIE.encode()
#: Every cookie of labgate's: none reaches a tool on an instance host.
_LABGATE_COOKIES: Final = (
    _SESSION_NAMES | {name.encode() for name in INSTANCE_COOKIES} | {HANDOFF_COOKIE.encode()}
)
_TOKEN_PREFIX: Final = TOKEN_PREFIX.encode()
_CLAIM_CACHE_SIZE: Final = 65536

Via = Literal["session", "token", "instance"]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user, how they proved it, and until when that holds.

    ``session_id`` names the portal session a session or instance cookie
    stands for (empty for a token): revoking it is what ends such an identity.
    """

    user: UserInfo
    via: Via
    valid_until: float = math.inf
    session_id: str = ""
    head_line: bytes = field(init=False, repr=False, compare=False)
    #: ``user.id``, as this compiled class's own attribute (read on every request).
    user_id: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        line = b"X-Labgate-User: " + header_safe(self.user.name) + b"\r\n"
        object.__setattr__(self, "head_line", line)
        object.__setattr__(self, "user_id", self.user.id)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The labgate credentials found in a request's headers.

    ``sessions`` are the values of the session cookie (of the instance
    cookie on an instance host), as many as the header holds: only exactly
    one counts. ``cookie_rest`` is the ``Cookie`` header without labgate's
    session cookie, under either name (None when nothing is left); ``token``
    is a labgate API token given in ``Authorization`` (other schemes are not
    labgate's and stay with the tool).
    """

    sessions: tuple[str, ...] = ()
    cookie_rest: bytes | None = None
    token: str | None = None


def split_cookies(
    cookie: bytes | None, session_cookie: bytes = _COOKIE_NAME
) -> tuple[tuple[str, ...], bytes | None]:
    """The values of ``session_cookie`` in a ``Cookie`` header, and the header without it.

    Both names of the session cookie are taken out of what goes on (the
    other one may be a stale cookie from before the switch to https, or one
    planted by another host: a tool has no business with either).
    """
    if not cookie:
        return (), cookie
    if _SESSION_MARK not in cookie:
        return (), cookie
    sessions: list[str] = []
    kept: list[bytes] = []
    for part in cookie.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        name = name.rstrip()
        if sep and name in _SESSION_NAMES:
            if name == session_cookie:
                # Quoted cookie values are legal; the signer's alphabet never needs them.
                sessions.append(value.strip().strip(b'"').decode("latin-1"))
        elif part.strip():
            kept.append(part.strip())
    return tuple(sessions), (b"; ".join(kept) if kept else None)


def split_instance_cookies(
    cookie: bytes | None, name_wanted: bytes = _INSTANCE_COOKIE
) -> tuple[tuple[str, ...], bytes | None]:
    """Values of the instance cookie ``name_wanted`` in a ``Cookie`` header, and the header
    without labgate's cookies.

    On an instance host none of labgate's cookies (session, instance under
    either name, hand-off) goes on to the tool.
    """
    if not cookie or b"labgate-" not in cookie:
        return (), cookie
    values: list[str] = []
    kept: list[bytes] = []
    for part in cookie.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        name = name.rstrip()
        if sep and name in _LABGATE_COOKIES:
            if name == name_wanted:
                values.append(value.strip().strip(b'"').decode("latin-1"))
        elif part.strip():
            kept.append(part.strip())
    return tuple(values), (b"; ".join(kept) if kept else None)


def labgate_token(authorization: bytes | None) -> str | None:
    """The labgate API token in an ``Authorization`` value, if it carries one."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() in (b"token", b"bearer") and value.startswith(_TOKEN_PREFIX):
        return value.decode("latin-1")
    return None


def credentials(
    cookie: bytes | None, authorization: bytes | None, session_cookie: bytes = _COOKIE_NAME
) -> Credentials:
    """Pick labgate's credentials out of a request's ``Cookie`` and ``Authorization``."""
    sessions, rest = split_cookies(cookie, session_cookie)
    return Credentials(sessions=sessions, cookie_rest=rest, token=labgate_token(authorization))


class Authenticator:
    """Checks credentials against a :class:`RouteTable`, in memory.

    ``session_cookie`` is the portal's session cookie's name
    (``security.session_cookie_name``), ``instance_cookie`` the router's own
    on instance hosts (``security.instance_cookie_name``);
    ``share_on_portal_origin`` lets a
    portal session into other users' instances on ``/i/`` paths too (the
    operator's opt-in, see :meth:`may_access`).
    """

    def __init__(
        self,
        table: RouteTable,
        signer: SessionSigner,
        *,
        session_cookie: str = SESSION_COOKIE,
        instance_cookie: str = INSTANCE_COOKIE,
        share_on_portal_origin: bool = False,
    ) -> None:
        self.table = table
        self.signer = signer
        self.session_cookie = session_cookie.encode("latin-1")
        #: The instance cookie's name, as the hand-off sets it and requests must send it.
        self.instance_cookie = instance_cookie
        self._instance_cookie = instance_cookie.encode("latin-1")
        self.share_on_portal_origin = share_on_portal_origin
        self._claims: dict[str, SessionClaim] = {}
        self._decisions: dict[
            tuple[bytes | None, bytes | None], tuple[int, Identity | None, Credentials]
        ] = {}
        self.grants = InstanceGrants(signer.key, signer.max_age)
        self._instance_claims: dict[str, InstanceClaim] = {}
        self._instance_decisions: dict[
            tuple[str, bytes | None, bytes | None], tuple[int, Identity | None, Credentials]
        ] = {}
        #: Hand-off codes already redeemed here, with when they expire anyway.
        self._used_codes: dict[str, float] = {}

    def check(
        self, cookie: bytes | None, authorization: bytes | None, now: float
    ) -> tuple[Identity | None, Credentials]:
        """Who sent these ``Cookie`` and ``Authorization`` headers, and their credentials.

        Decisions are cached by the header values until the table's
        ``generation`` moves or the identity's own expiry passes, so a
        kept-alive client pays for parsing and lookups once.
        """
        key = (cookie, authorization)
        known = self._decisions.get(key)
        generation = self.table.generation
        if known is not None and known[0] == generation:
            identity = known[1]
            if identity is None or now < identity.valid_until:
                return identity, known[2]
        creds = credentials(cookie, authorization, self.session_cookie)
        identity = self.identify(creds, now)
        if len(self._decisions) >= _CLAIM_CACHE_SIZE:
            self._decisions.clear()
        self._decisions[key] = (generation, identity, creds)
        return identity, creds

    def check_instance(
        self,
        instance_id: str,
        hosts: InstanceHosts,
        cookie: bytes | None,
        authorization: bytes | None,
        now: float,
    ) -> tuple[Identity | None, Credentials]:
        """Who sent these headers to ``instance_id``'s own host (named by ``hosts``).

        An API token, else an instance cookie for this instance and host;
        the portal's session cookie counts for nothing here. Cached like
        :meth:`check`.
        """
        key = (instance_id, cookie, authorization)
        known = self._instance_decisions.get(key)
        generation = self.table.generation
        if known is not None and known[0] == generation:
            identity = known[1]
            if identity is None or now < identity.valid_until:
                return identity, known[2]
        values, rest = split_instance_cookies(cookie, self._instance_cookie)
        creds = Credentials(sessions=values, cookie_rest=rest, token=labgate_token(authorization))
        found = self.identify_on_host(creds, instance_id, hosts, now)
        if len(self._instance_decisions) >= _CLAIM_CACHE_SIZE:
            self._instance_decisions.clear()
        self._instance_decisions[key] = (generation, found, creds)
        return found, creds

    def identify_on_host(
        self, creds: Credentials, instance_id: str, hosts: InstanceHosts, now: float
    ) -> Identity | None:
        """The user behind ``creds`` on ``instance_id``'s own host, or None.

        ``creds.sessions`` are the instance cookies' values here: one counts,
        two or more are none (a sibling instance host may toss one in with
        ``Domain=<parent>``). A labgate token, if any, decides alone, as in
        :meth:`identify`.
        """
        if creds.token is not None:
            return self._token_identity(creds.token, now)
        if len(creds.sessions) != 1:
            return None
        return self._instance_identity(
            creds.sessions[0], instance_id, hosts.netloc(instance_id), now
        )

    def recheck(
        self,
        identity: Identity,
        creds: Credentials,
        route: Route | None,
        hosts: InstanceHosts | None,
        now: float,
    ) -> Identity | None:
        """Who ``creds`` (which proved ``identity``) prove now, if still let into ``route``.

        Asked of an open WebSocket when credentials may have stopped holding
        (the table changed) or its identity's time ran out: the checks of a
        new request with the same credentials (:meth:`identify`, or
        :meth:`identify_on_host` when it came to the instance's own host, then
        :meth:`may_access`), for the same user as before. None: close it.
        """
        if route is None:
            return None
        if hosts is None:
            again = self.identify(creds, now)
        else:
            again = self.identify_on_host(creds, route.instance_id, hosts, now)
        if again is None or again.user.id != identity.user.id or not self.may_access(again, route):
            return None
        return again

    def _instance_identity(
        self, value: str, instance_id: str, netloc: str, now: float
    ) -> Identity | None:
        claim = self._instance_claims.get(value)
        if claim is None:
            claim = self.grants.check_cookie(value)
            if claim is None:
                return None
            if len(self._instance_claims) >= _CLAIM_CACHE_SIZE:
                self._instance_claims.clear()
            self._instance_claims[value] = claim
        if claim.instance_id != instance_id or claim.host != netloc:
            return None
        return self._user_of_session(claim.user_id, claim.session_id, claim.issued_at, now)

    def _user_of_session(
        self, user_id: int, session_id: str, issued_at: float, now: float
    ) -> Identity | None:
        """The user of a portal session (or a cookie made from one) if it still holds."""
        if issued_at + self.signer.max_age < now or session_id in self.table.revoked:
            return None
        user = self.table.users.get(user_id)
        if user is None or user.disabled or issued_at < user.sessions_valid_after:
            return None
        return Identity(user, "instance", issued_at + self.signer.max_age, session_id)

    def redeem(
        self, value: str, instance_id: str, netloc: str, verifier: str, now: float
    ) -> HandoffCode | None:
        """A hand-off code's claim, once: genuine, unexpired, for this instance and host.

        ``verifier`` is the PKCE verifier the router kept in the browser's
        hand-off cookie; the code carries its challenge, so a code taken
        from the URL is worth nothing to another browser.
        """
        code = self.grants.check_code(value, now)
        if code is None or code.instance_id != instance_id or code.host != netloc:
            return None
        if code.challenge != pkce_challenge(verifier):
            return None
        if code.nonce in self._used_codes:
            return None
        if len(self._used_codes) > 4096:
            for nonce in [n for n, until in self._used_codes.items() if until <= now]:
                del self._used_codes[nonce]
        self._used_codes[code.nonce] = code.expires_at
        if self._user_of_session(code.user_id, code.session_id, now, now) is None:
            return None
        return code

    def identify(self, creds: Credentials, now: float | None = None) -> Identity | None:
        """The user behind ``creds``, or None.

        A labgate token that is present but not valid is final: the cookie is
        not tried instead, so a script with a revoked token fails loudly. A
        session cookie sent more than once is no session: which of them is
        the browser's own, and which one another host planted, cannot be told.
        """
        now = time.time() if now is None else now
        if creds.token is not None:
            return self._token_identity(creds.token, now)
        if len(creds.sessions) != 1:
            return None
        return self._session_identity(creds.sessions[0], now)

    def _token_identity(self, token: str, now: float) -> Identity | None:
        info = self.table.tokens.get(hash_token(token))
        if info is None or (info.expires_at is not None and info.expires_at <= now):
            return None
        if not info.scopes & ACCESS_SCOPES:
            return None
        user = self.table.users.get(info.user_id)
        if user is None or user.disabled:
            return None
        # An admin-scoped token of a user who is no longer an admin keeps only
        # what its other scopes give.
        if "instances:access" not in info.scopes and not user.is_admin:
            return None
        return Identity(user, "token", math.inf if info.expires_at is None else info.expires_at)

    def _session_identity(self, value: str, now: float) -> Identity | None:
        claim = self._claims.get(value)
        if claim is None:
            claim = self.signer.check(value)
            if claim is None:
                return None
            if len(self._claims) >= _CLAIM_CACHE_SIZE:
                self._claims.clear()
            self._claims[value] = claim
        if claim.issued_at + self.signer.max_age < now:
            self._claims.pop(value, None)
            return None
        if claim.session_id in self.table.revoked:
            return None
        user = self.table.users.get(claim.user_id)
        # The claim's issue time is precise (it travels in the signed payload),
        # so a session issued just before a password change is refused.
        if user is None or user.disabled or claim.issued_at < user.sessions_valid_after:
            return None
        return Identity(user, "session", claim.issued_at + self.signer.max_age, claim.session_id)

    def lacks_access_scope(self, creds: Credentials, now: float) -> bool:
        """Whether ``creds`` hold a valid token that only lacks the ``instances:access`` scope.

        Asked only for refused requests, so that such a token gets a 403
        saying which scope to add rather than a 401 that suggests logging in.
        """
        info = self.table.tokens.get(hash_token(creds.token)) if creds.token else None
        if info is None or (info.expires_at is not None and info.expires_at <= now):
            return False
        user = self.table.users.get(info.user_id)
        return user is not None and not user.disabled

    def may_access(self, identity: Identity, route: Route) -> bool:
        """Whether ``identity`` may use the instance behind ``route``.

        Its owner always. Others (admins, the users of its access list) not
        with a portal session cookie, which only ``/i/<id>/`` paths take: there
        the tool's pages run on the portal's own origin with the visitor's
        session and could act in their name (as JupyterHub's ``admin_access``,
        off unless the operator sets ``share_on_portal_origin``). An API token
        (a header no page can make the browser send) or an instance cookie
        (the instance's own origin) lets them in.
        """
        user = identity.user
        if user.id == route.owner_id:
            return True
        if identity.via == "session" and not self.share_on_portal_origin:
            return False
        return user.is_admin or route.allows(user.id)

    def needs_own_origin(self, identity: Identity, route: Route) -> bool:
        """Whether :meth:`may_access` refused ``identity`` only for coming with a portal session.

        Asked for refused requests only, so that such a visitor is told why
        (another user's instance opens in the browser only on its own host)
        rather than that the instance does not exist.
        """
        user = identity.user
        return (
            identity.via == "session"
            and not self.share_on_portal_origin
            and (user.is_admin or route.allows(user.id))
        )
