"""Sign in and out with a password; who am I."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import RevokedSession, User, utcnow
from labgate.errors import Unauthorized
from labgate.portal.accounts import user_out
from labgate.portal.auth import Caller, scopes_of
from labgate.portal.openapi import errors
from labgate.portal.schemas import LoginIn, SessionOut
from labgate.portal.state import Portal, get_portal
from labgate.security import SESSION_COOKIE, hash_password, verify_password

router = APIRouter(prefix="/auth", tags=["auth"])

# Verifying against a real hash when the user does not exist keeps the time
# of a failed sign-in the same, so it does not tell which names exist.
_DUMMY_HASH = hash_password("labgate-timing-equaliser")


def check_password(session: Session, username: str, password: str) -> User:
    """The user whose name and password match; one vague error otherwise."""
    user = session.scalar(select(User).where(User.name == username.strip().lower()))
    if user is None or not user.password_hash:
        verify_password(_DUMMY_HASH, password)
        raise Unauthorized("wrong user name or password", code="invalid_credentials")
    if not verify_password(user.password_hash, password):
        raise Unauthorized("wrong user name or password", code="invalid_credentials")
    if user.disabled:
        raise Unauthorized(
            "this account is disabled; ask an administrator", code="account_disabled"
        )
    user.last_login_at = utcnow()
    return user


def set_session_cookie(portal: Portal, response: Response, user_id: int) -> str:
    """Start a browser session; returns its id."""
    value, session_id = portal.signer.issue(user_id)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=portal.settings.session_max_age,
        httponly=True,
        samesite="lax",
        secure=portal.settings.cookie_secure,
        path="/",
    )
    return session_id


@router.post("/login", response_model=SessionOut, responses=errors(401, 429))
async def login(
    body: LoginIn, response: Response, portal: Portal = Depends(get_portal)
) -> SessionOut:
    """Check a password and start a browser session (a signed cookie)."""
    user = await portal.run_db(lambda s: check_password(s, body.username, body.password))
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
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/session", response_model=SessionOut)
async def whoami(caller: Caller, portal: Portal = Depends(get_portal)) -> SessionOut:
    """The caller, its scopes, and the CSRF token of its session."""
    user = await portal.run_db(lambda s: s.get(User, caller.user_id))
    assert user is not None
    csrf = portal.signer.csrf_token(caller.session_id) if caller.session_id else None
    return SessionOut(
        user=user_out(user), csrf_token=csrf, scopes=sorted(caller.scopes), via=caller.via
    )
