"""Sign in and out with a password (local or a password provider such as LDAP); who am I.

Redirect providers (OpenID Connect) sign in through the browser pages instead
(:mod:`labgate.portal.ui.federated`), and end in :func:`complete_sign_in` too.
"""

from __future__ import annotations

import unicodedata
from datetime import timedelta

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labgate.db.models import RevokedSession, User, utcnow
from labgate.errors import BadRequest, Unauthorized
from labgate.identity.base import IdentityProvider, ProviderAccount
from labgate.identity.linking import sign_in
from labgate.portal.accounts import user_out
from labgate.portal.auth import Caller, scopes_of, session_cookie_of
from labgate.portal.openapi import errors
from labgate.portal.origin import check_same_origin
from labgate.portal.schemas import LoginIn, SessionOut
from labgate.portal.state import Portal, get_portal

router = APIRouter(prefix="/auth", tags=["auth"])


def client_address(request: Request) -> str:
    """The address a sign-in comes from, for its rate limits.

    Behind labgate's router (``labgate serve``) this is the address the router
    saw: the router replaces any ``X-Forwarded-For`` a client sends with the
    peer it accepted (or, from a proxy in ``trusted_proxies``, the client that
    proxy names), and uvicorn serves the portal trusting that header.
    """
    return request.client.host if request.client is not None else "unknown"


def limit_name(username: str) -> str:
    """The name a password provider's sign-in limits count ``username`` under.

    A directory matches names loosely: OpenLDAP binds ``bob``, ``BOB``, bob in
    full-width or circled letters, and ``bob`` with spaces around as one entry.
    Each spelling must count against that entry's limits, or a guesser gets a
    fresh budget per spelling. So: compatibility forms and marks dropped
    (NFKD), format characters dropped, case folded, spaces around removed and
    runs of them made one. Folding more than a directory does only joins limits.
    """
    decomposed = unicodedata.normalize("NFKD", username)
    bare = "".join(
        c
        for c in decomposed
        if not unicodedata.combining(c) and unicodedata.category(c) not in ("Cf", "Cc")
    )
    return " ".join(unicodedata.normalize("NFKC", bare).casefold().split())


def _account(session: Session, name: str) -> tuple[int, str, bool] | None:
    row = session.execute(
        select(User.id, User.password_hash, User.disabled).where(User.name == name)
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def _signed_in(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise Unauthorized("wrong user name or password", code="invalid_credentials")
    user.last_login_at = utcnow()
    return user


async def verify_credentials(
    portal: Portal, request: Request, username: str, password: str
) -> tuple[int, bool]:
    """The id and disabled flag of the local user whose name and password match.

    One vague 401 otherwise. Rate limited (429 with ``Retry-After``) per
    account, per client address and per both; the hash is checked on the
    bounded password workers.
    """
    name = username.strip().lower()
    address = client_address(request)
    limits = portal.login_limits
    # A refusal costs nothing while the limits are used up ...
    await limits.check(name, address)
    account = await portal.run_db(lambda s: _account(s, name))
    stored = account[1] if account is not None and account[1] else None
    async with portal.passwords.slot():
        # ... and checking again with a slot held means no more guesses are in
        # flight than there are slots, however many requests arrive at once.
        await limits.check(name, address)
        # With no stored hash a dummy one is checked: a failed sign-in takes as
        # long whether or not the name exists, so it does not tell which do.
        matches = await portal.passwords.verify(stored, password)
        if account is None or stored is None or not matches:
            await limits.failed(name, address)
            raise Unauthorized("wrong user name or password", code="invalid_credentials")
    await limits.succeeded(name, address)
    return account[0], account[2]


async def verify_with_provider(
    portal: Portal, request: Request, provider: IdentityProvider, username: str, password: str
) -> User:
    """The user a password provider (LDAP) vouches for, linked or created now.

    The same limits as local passwords (the account key is ``provider/name``,
    the name as :func:`limit_name` folds it), and the directory is asked with
    one of the password workers' slots held, so a flood of sign-ins cannot tie
    up more than that many binds.
    """
    key = f"{provider.name}/{limit_name(username)}"
    address = client_address(request)
    limits = portal.login_limits
    await limits.check(key, address)
    async with portal.passwords.slot():
        await limits.check(key, address)
        account = await provider.check_password(username, password)
        if account is None:
            await limits.failed(key, address)
            raise Unauthorized("wrong user name or password", code="invalid_credentials")
    await limits.succeeded(key, address)
    return await complete_sign_in(portal, provider, account)


async def complete_sign_in(
    portal: Portal, provider: IdentityProvider, account: ProviderAccount
) -> User:
    """Link (or create) the account's user, update its groups, and tell the routers."""

    def link(session: Session) -> User:
        user = sign_in(session, provider.config, account)
        session.flush()
        if portal.routes is not None:
            portal.routes.user_changed(user)
            portal.routes.memberships_changed(session, user.id)
        session.expunge(user)
        return user

    try:
        return await portal.run_db(link)
    except IntegrityError:
        # Two first sign-ins of one subject (or of names that clean alike) at the same
        # moment: the other one's rows are there now, and this one links to them or takes
        # the next free name.
        return await portal.run_db(link)


def password_provider(portal: Portal, name: str | None) -> IdentityProvider:
    """The password provider called ``name`` (the first one when None); 400 otherwise."""
    found = [p for p in portal.providers.values() if p.kind == "password"]
    if name is not None:
        found = [p for p in found if p.name == name]
    if not found:
        raise BadRequest(
            f"no password sign-in {'called ' + repr(name) + ' ' if name else ''}is configured",
            code="unknown_provider",
        )
    return found[0]


async def check_password(
    portal: Portal, request: Request, username: str, password: str, provider: str | None = None
) -> User:
    """The enabled user whose name and password match, now signed in; 401 otherwise."""
    chosen = password_provider(portal, provider)
    if not chosen.checks_local_passwords:
        return await verify_with_provider(portal, request, chosen, username, password)
    user_id, disabled = await verify_credentials(portal, request, username, password)
    if disabled:
        raise Unauthorized(
            "this account is disabled; ask an administrator", code="account_disabled"
        )
    return await portal.run_db(lambda s: _signed_in(s, user_id))


def set_session_cookie(
    portal: Portal, response: Response, user_id: int, session_id: str | None = None
) -> str:
    """Start a browser session (or renew ``session_id``'s cookie); returns its id.

    Named ``__Host-labgate-session`` when cookies are Secure: host-only,
    ``Path=/``, Secure, so a browser takes no cookie of that name from
    another host (an instance host beside the portal).
    """
    value, session_id = portal.signer.issue(user_id, session_id)
    response.set_cookie(
        session_cookie_of(portal),
        value,
        max_age=portal.settings.session_max_age,
        httponly=True,
        samesite="lax",
        secure=portal.settings.effective_cookie_secure,
        path="/",
    )
    return session_id


@router.post("/login", response_model=SessionOut, responses=errors(400, 401, 403, 429, 502))
async def login(
    body: LoginIn, request: Request, response: Response, portal: Portal = Depends(get_portal)
) -> SessionOut:
    """Check a password and start a browser session (a signed cookie).

    Refused (403) when a page of another site sent it (``Origin`` or
    ``Referer``); refused (429) after too many failures.
    """
    check_same_origin(request, portal.settings.effective_public_url)
    user = await check_password(portal, request, body.username, body.password, body.provider)
    session_id = set_session_cookie(portal, response, user.id)
    return SessionOut(
        user=user_out(user),
        csrf_token=portal.signer.csrf_token(session_id),
        scopes=sorted(scopes_of(user)),
        via="session",
    )


@router.post("/logout", status_code=204)
async def logout(
    caller: Caller, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """End the current browser session everywhere, the router included."""
    if caller.session_id is not None:
        sid, uid = caller.session_id, caller.user_id
        expires = utcnow() + timedelta(seconds=portal.settings.session_max_age)

        def revoke(session: Session) -> None:
            if session.get(RevokedSession, sid) is None:
                session.add(RevokedSession(session_id=sid, user_id=uid, expires_at=expires))

        await portal.run_db(revoke)
        if portal.routes is not None:
            portal.routes.session_revoked(sid, expires.timestamp())
    response = Response(status_code=204)
    clear_session_cookie(portal, response)
    return response


def clear_session_cookie(portal: Portal, response: Response) -> None:
    """Make the browser drop its session cookie (Secure when it was: a ``__Host-`` cookie
    is only cleared by a Set-Cookie that has everything it had to have)."""
    response.delete_cookie(
        session_cookie_of(portal),
        path="/",
        secure=portal.settings.effective_cookie_secure,
        httponly=True,
        samesite="lax",
    )


@router.get("/session", response_model=SessionOut)
async def whoami(caller: Caller, portal: Portal = Depends(get_portal)) -> SessionOut:
    """The caller, its scopes, and the CSRF token of its session."""
    user = await portal.run_db(lambda s: s.get(User, caller.user_id))
    if user is None:
        raise Unauthorized("your account no longer exists")
    csrf = portal.signer.csrf_token(caller.session_id) if caller.session_id else None
    return SessionOut(
        user=user_out(user), csrf_token=csrf, scopes=sorted(caller.scopes), via=caller.via
    )
