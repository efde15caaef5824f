"""API tokens: create (shown once), list and revoke your own; admins see all."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Path, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import ApiToken, User
from labgate.errors import NotFound, Unauthorized
from labgate.portal.accounts import create_token, get_user, token_out
from labgate.portal.auth import Principal, expiry_from_now, require
from labgate.portal.schemas import TokenCreated, TokenIn, TokenOut
from labgate.portal.state import Portal, get_portal
from labgate.types import MAX_ID

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.post("", response_model=TokenCreated, status_code=201)
async def new_token(
    body: TokenIn, caller: Principal = require("account"), portal: Portal = Depends(get_portal)
) -> TokenCreated:
    """Create a token for yourself with some of your scopes; the token is shown once.

    A token made with a token (not a session) has none of the scopes the creating token
    lacks and expires no later than it: ``expires_in`` beyond that, or none, gives the
    creating token's expiry. A short-lived token never mints a longer-lived one.
    """

    def create(session: Session) -> TokenCreated:
        user = get_user(session, caller.name)
        expires_at = expiry_from_now(body.expires_in)
        if caller.via != "session":  # a token: the new one is bounded by it
            creator = session.get(ApiToken, caller.token_id) if caller.token_id else None
            if creator is None or creator.user_id != user.id:
                raise Unauthorized("invalid or expired token", code="invalid_token")
            expires_at = earliest(expires_at, creator.expires_at)
        row, token = create_token(
            session,
            user,
            note=body.note,
            scopes=body.scopes,
            expires_at=expires_at,
            allowed=caller.scopes,
        )
        if portal.routes is not None:
            portal.routes.token_changed(row)
        return TokenCreated(**token_out(row, user.name).model_dump(), token=token)

    return await portal.run_db(create)


def earliest(first: datetime | None, second: datetime | None) -> datetime | None:
    """The earlier of two expiry times; None (never) only when both are."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


@router.get("", response_model=list[TokenOut])
async def list_tokens(
    caller: Principal = require("account"),
    portal: Portal = Depends(get_portal),
    all_users: bool = Query(False, alias="all", description="Every user's tokens (admins)."),
) -> list[TokenOut]:
    """Your tokens, or everyone's with ``?all=true`` (admins)."""
    if all_users:
        caller.require("admin")

    def query(session: Session) -> list[TokenOut]:
        stmt = select(ApiToken, User.name).join(User).order_by(ApiToken.id)
        if not all_users:
            stmt = stmt.where(ApiToken.user_id == caller.user_id)
        return [token_out(token, name) for token, name in session.execute(stmt)]

    return await portal.run_db(query)


@router.delete("/{token_id}", status_code=204)
async def revoke_token(
    token_id: int = Path(ge=1, le=MAX_ID),
    caller: Principal = require("account"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Revoke one of your tokens (admins: anyone's)."""

    def revoke(session: Session) -> None:
        row = session.get(ApiToken, token_id)
        if row is None or not caller.can_manage(row.user_id):
            raise NotFound(f"no token {token_id}", code="unknown_token")
        session.delete(row)
        if portal.routes is not None:
            portal.routes.token_removed(row.token_hash)

    await portal.run_db(revoke)
    return Response(status_code=204)
