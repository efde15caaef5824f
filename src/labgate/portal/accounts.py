"""Accounts and API tokens: the operations behind the API (and later the UI).

Each function takes an open SQLAlchemy session; the caller commits. Functions
that change what the router must know return what changed so the caller can
feed the router.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labgate.db.models import ApiToken, User, utcnow
from labgate.errors import BadRequest, Conflict, Forbidden, NotFound
from labgate.portal.schemas import TokenOut, UserOut
from labgate.security import ROUTER_SCOPE, SCOPES, hash_token, new_api_token

log = logging.getLogger(__name__)


def user_out(user: User) -> UserOut:
    """The public view of a user."""
    return UserOut(
        name=user.name,
        is_admin=user.is_admin,
        data_provider=user.data_provider,
        disabled=user.disabled,
        created_at=user.created_at,
        last_login_at=user.last_login_at,
    )


def token_out(token: ApiToken, owner: str) -> TokenOut:
    """The public view of a token (never the token itself)."""
    return TokenOut(
        id=token.id,
        prefix=token.prefix,
        note=token.note,
        scopes=sorted(token.scopes),
        created_at=token.created_at,
        expires_at=token.expires_at,
        last_used_at=token.last_used_at,
        user=owner,
    )


def generate_password() -> str:
    """A random password good enough to hand to a person once."""
    return secrets.token_urlsafe(12)


def get_user(session: Session, name: str) -> User:
    """The user called ``name``; 404 otherwise.

    Reserved accounts (``_pool``, which owns warm-pool instances) are not
    users anyone may read, change, delete or put in a group: 404 as well.
    """
    user = None if name.startswith("_") else session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user called {name!r}", code="unknown_user")
    return user


def create_user(session: Session, name: str, password_hash: str, *, is_admin: bool = False) -> User:
    """Create a user with an already hashed (and policy-checked) password."""
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"a user called {name!r} already exists", code="user_exists")
    user = User(name=name, password_hash=password_hash, is_admin=is_admin)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a user called {name!r} already exists", code="user_exists") from None
    return user


def set_password(session: Session, user: User, password_hash: str) -> None:
    """Change a password; every session of the user issued until now ends.

    The caller renews the cookie of the session that made the change, if any,
    so that one goes on. API tokens are kept: they are separate credentials,
    listed and revoked on their own.
    """
    user.password_hash = password_hash
    user.sessions_valid_after = utcnow()


def set_disabled(user: User, disabled: bool) -> None:
    """Disable or enable an account; disabling ends its sessions."""
    if disabled and not user.disabled:
        user.sessions_valid_after = utcnow()
    user.disabled = disabled


def ensure_not_last_admin(session: Session, user: User) -> None:
    """Refuse to remove the last enabled admin."""
    if not user.is_admin or user.disabled:
        return
    others = session.scalars(
        select(User.id).where(User.is_admin, ~User.disabled, User.id != user.id)
    ).first()
    if others is None:
        raise Conflict(
            "this is the last enabled admin; make another admin first", code="last_admin"
        )


def create_token(
    session: Session,
    user: User,
    *,
    note: str,
    scopes: list[str] | None,
    expires_at: datetime | None,
    allowed: frozenset[str],
) -> tuple[ApiToken, str]:
    """Create an API token within the scopes ``allowed`` to the creator."""
    if scopes is None:
        scopes = sorted(allowed - {"admin"})
    if ROUTER_SCOPE in scopes:
        raise Forbidden(
            f"no API token can carry the {ROUTER_SCOPE!r} scope: it belongs to router "
            "processes, which use the router token derived from the secret key",
            code="reserved_scope",
        )
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise BadRequest(
            f"unknown scopes: {', '.join(unknown)} (known: {', '.join(sorted(SCOPES))})",
            code="unknown_scope",
        )
    beyond = sorted(set(scopes) - allowed)
    if beyond:
        raise Forbidden(f"you cannot grant scopes you do not hold: {', '.join(beyond)}")
    token = new_api_token()
    row = ApiToken(
        user=user,
        token_hash=hash_token(token),
        prefix=token[:8],
        note=note,
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, token


def no_users(session: Session) -> bool:
    """Whether the database has no users yet (first start)."""
    return session.scalar(select(User.id).limit(1)) is None


def bootstrap_admin(session: Session, name: str, password_hash: str) -> bool:
    """Create the first admin when there are still no users; whether it was created."""
    if not no_users(session):
        return False
    create_user(session, name, password_hash, is_admin=True)
    return True
