"""Who is calling: session cookies and API tokens turned into a :class:`Principal`.

Every API route depends on :func:`principal` (or one of the ``require_*``
helpers). Cookie-authenticated state changes must carry the session's CSRF
token; token-authenticated requests need none (a browser never sends a
token by itself).

The session cookie is ``__Host-labgate-session`` when cookies are Secure
(``session_cookie_name``), which no other host can plant; a request that
holds its name more than once has no session (:func:`session_cookie`), so
a cookie tossed in by a sibling host never picks who the caller is.

The ``router`` scope is not a user's: only the router token (derived from
the signing key, held by router processes) carries it, and that token is
good for the route stream and activity reports alone (:func:`router_caller`).
No session or API token, an admin's included, can hold it: the stream
carries every instance's upstream secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import ApiToken, RevokedSession, User, utcnow
from labgate.errors import Forbidden, Unauthorized
from labgate.portal.state import Portal, get_portal
from labgate.security import (
    CSRF_FORM_FIELD,
    CSRF_HEADER,
    ROUTER_SCOPE,
    ROUTER_TOKEN_PREFIX,
    SCOPES,
    cookie_count,
    hash_token,
    router_token,
    same,
    session_cookie_name,
)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Scopes only admins hold: ``sites:report`` decides what gets mounted into instances.
ADMIN_ONLY_SCOPES = frozenset({"admin", "sites:report"})
USER_SCOPES = frozenset(SCOPES) - ADMIN_ONLY_SCOPES
#: Every scope an admin's session or token may hold (never ``router``).
ADMIN_SCOPES = frozenset(SCOPES)
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    user_id: int
    name: str
    is_admin: bool
    scopes: frozenset[str]
    via: str
    session_id: str | None = None
    token_id: int | None = None

    def has(self, scope: str) -> bool:
        """Whether the caller holds ``scope`` (``admin`` holds all but ``router``)."""
        if scope == ROUTER_SCOPE:
            return self.via == "router"
        return "admin" in self.scopes or scope in self.scopes

    def require(self, scope: str) -> None:
        """Refuse unless the caller holds ``scope``."""
        if not self.has(scope):
            raise Forbidden(f"this needs the {scope!r} scope", code="insufficient_scope")

    def can_manage(self, owner_id: int) -> bool:
        """Whether the caller may act on things owned by ``owner_id``."""
        return owner_id == self.user_id or (self.is_admin and "admin" in self.scopes)


def scopes_of(user: User) -> frozenset[str]:
    """Every scope a user may hold."""
    return ADMIN_SCOPES if user.is_admin else USER_SCOPES


def token_from_header(value: str | None) -> str | None:
    """The token in an ``Authorization: token X`` or ``Bearer X`` header."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() in ("token", "bearer") and token.strip():
        return token.strip()
    return None


def authenticate_token(session: Session, token: str) -> Principal | None:
    """The principal behind an API token, if it is valid."""
    row = session.execute(
        select(ApiToken, User)
        .join(User, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == hash_token(token))
    ).first()
    if row is None:
        return None
    api_token, user = row
    now = utcnow()
    if user.disabled or (api_token.expires_at is not None and api_token.expires_at <= now):
        return None
    if api_token.last_used_at is None or now - api_token.last_used_at > TOKEN_TOUCH_INTERVAL:
        api_token.last_used_at = now
        session.commit()
    scopes = frozenset(api_token.scopes) & scopes_of(user)
    return Principal(user.id, user.name, user.is_admin, scopes, "token", token_id=api_token.id)


def authenticate_session(portal: Portal, session: Session, cookie: str) -> Principal | None:
    """The principal behind a session cookie, if it is valid."""
    claim = portal.signer.check(cookie)
    if claim is None:
        return None
    user = session.get(User, claim.user_id)
    if user is None or user.disabled:
        return None
    if claim.issued_at < user.sessions_valid_after.timestamp():
        return None
    if session.get(RevokedSession, claim.session_id) is not None:
        return None
    return Principal(
        user.id, user.name, user.is_admin, scopes_of(user), "session", session_id=claim.session_id
    )


def router_principal(portal: Portal, token: str) -> Principal | None:
    """The principal of a router process, when ``token`` is the router token."""
    if not same(token, router_token(portal.signer.key)):
        return None
    return Principal(0, "router", False, frozenset({ROUTER_SCOPE}), "router")


def session_cookie_of(portal: Portal) -> str:
    """The session cookie's name on this portal (``__Host-`` when cookies are Secure)."""
    return session_cookie_name(portal.settings.effective_cookie_secure)


def session_cookie_count(portal: Portal, request: Request) -> int:
    """How many session cookies the request holds (more than one: one was planted)."""
    return cookie_count(request.headers.getlist("cookie"), session_cookie_of(portal))


def session_cookie(portal: Portal, request: Request) -> str | None:
    """The request's session cookie; None when it has none, or more than one.

    Two cookies of the name are the browser's own and one a page on another
    host set for a parent domain (cookie tossing). Which one a parser keeps
    (Starlette: the last) is then the attacker's choice, so neither counts.
    """
    if session_cookie_count(portal, request) != 1:
        return None
    return request.cookies.get(session_cookie_of(portal))


async def optional_principal(request: Request) -> Principal | None:
    """The calling user if authenticated, else None (CSRF enforced for sessions).

    The router token is no user: it gets 403 here, so everywhere but the two
    endpoints that take it (:func:`router_caller`).
    """
    caller = await identify(request)
    if caller is not None and caller.via == "router":
        raise Forbidden(
            "the router token is good for /api/v1/router/* only", code="insufficient_scope"
        )
    return caller


async def identify(request: Request) -> Principal | None:
    """Whoever sent the request: a user, the router token, or None (CSRF enforced)."""
    if hasattr(request.state, "principal"):
        cached: Principal | None = request.state.principal
        return cached
    portal = get_portal(request)
    token = token_from_header(request.headers.get("authorization"))
    cookie = session_cookie(portal, request)
    result: Principal | None = None
    if token is not None and token.startswith(ROUTER_TOKEN_PREFIX):
        result = router_principal(portal, token)
        if result is None:
            raise Unauthorized("invalid router token", code="invalid_token")
    elif token is not None:
        result = await portal.run_db(lambda s: authenticate_token(s, token))
        if result is None:
            raise Unauthorized("invalid or expired token", code="invalid_token")
    elif cookie:
        result = await portal.run_db(lambda s: authenticate_session(portal, s, cookie))
        if result is not None and request.method not in SAFE_METHODS:
            await _check_csrf(portal, request, result)
    request.state.principal = result
    return result


async def _check_csrf(portal: Portal, request: Request, principal: Principal) -> None:
    if principal.session_id is None:
        raise RuntimeError("a CSRF check needs a session")
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FORM_FIELD)
        given = value if isinstance(value, str) else None
    if not portal.signer.check_csrf(principal.session_id, given):
        raise Forbidden(
            f"missing or wrong {CSRF_HEADER} header for a cookie-authenticated request",
            code="csrf_failed",
        )


async def principal(
    caller: Annotated[Principal | None, Depends(optional_principal)],
) -> Principal:
    """The authenticated caller (a user); 401 otherwise, 403 for the router token."""
    if caller is None:
        raise Unauthorized("sign in or send an API token (Authorization: token ...)")
    return caller


async def router_caller(
    caller: Annotated[Principal | None, Depends(identify)],
) -> Principal:
    """A router process (the router token); every user, admins included, gets 403."""
    if caller is None:
        raise Unauthorized("send the router token (Authorization: token lgr_...)")
    if caller.via != "router":
        raise Forbidden(
            "only router processes may use this (the router token derived from the "
            "secret key); no user token or session can",
            code="insufficient_scope",
        )
    return caller


class ScopeCheck:
    """A dependency: the caller, who must hold ``scope`` (the OpenAPI document shows its 403)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    async def __call__(self, caller: Annotated[Principal, Depends(principal)]) -> Principal:
        """The caller, once it is known to hold the scope."""
        caller.require(self.scope)
        return caller


def require(scope: str) -> Any:
    """A dependency: the caller, who must hold ``scope``."""
    return Depends(ScopeCheck(scope))


def expiry_from_now(seconds: int | None) -> datetime | None:
    """``seconds`` from now as a UTC datetime, or None."""
    return None if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)


Caller = Annotated[Principal, Depends(principal)]
