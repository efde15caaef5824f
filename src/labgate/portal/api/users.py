"""Users: admins manage everyone; a user reads and changes their own account."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import ExternalIdentity, GroupMember, InstanceShare, User
from labgate.errors import Forbidden, NotFound, Unauthorized
from labgate.portal.accounts import (
    create_user,
    ensure_not_last_admin,
    generate_password,
    get_user,
    set_disabled,
    set_password,
    user_out,
)
from labgate.portal.api.auth import set_session_cookie, verify_credentials
from labgate.portal.auth import Caller, Principal, require
from labgate.portal.openapi import errors
from labgate.portal.schemas import (
    IdentityOut,
    PasswordIn,
    UserCreated,
    UserIn,
    UserOut,
    UserPatch,
)
from labgate.portal.state import Portal, get_portal

router = APIRouter(prefix="/users", tags=["users"])


def _name(caller: Principal, name: str) -> str:
    return caller.name if name == "me" else name


@router.get("", response_model=list[UserOut])
async def list_users(
    caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> list[UserOut]:
    """Every user (admins); reserved accounts (``_pool``, owner of warm pools) left out."""
    return await portal.run_db(
        lambda s: [
            user_out(u)
            for u in s.scalars(
                select(User).where(~User.name.startswith("_", autoescape=True)).order_by(User.name)
            )
        ]
    )


@router.post("", response_model=UserCreated, status_code=201, responses=errors(409))
async def add_user(
    body: UserIn, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> UserCreated:
    """Create a user; without a password one is generated and returned once.

    A given password must meet the policy (length, not common, not the name): 422.
    """
    generated = None if body.password is not None else generate_password()
    password_hash = await portal.passwords.hash_new(body.password or generated or "", body.name)

    def create(session: Session) -> UserCreated:
        user = create_user(session, body.name, password_hash, is_admin=body.is_admin)
        if portal.routes is not None:
            portal.routes.user_changed(user)
        return UserCreated(**user_out(user).model_dump(), password=generated)

    return await portal.run_db(create)


@router.get("/{name}", response_model=UserOut, responses=errors(403))
async def show_user(name: str, caller: Caller, portal: Portal = Depends(get_portal)) -> UserOut:
    """One user: yourself (``me``), or anyone for admins."""
    name = _name(caller, name)
    if name != caller.name:
        caller.require("admin")

    def show(session: Session) -> UserOut:
        user = get_user(session, name)
        links = session.scalars(
            select(ExternalIdentity)
            .where(ExternalIdentity.user_id == user.id)
            .order_by(ExternalIdentity.provider)
        )
        identities = [
            IdentityOut(
                provider=i.provider,
                subject=i.subject,
                email=i.email,
                created_at=i.created_at,
                last_login_at=i.last_login_at,
            )
            for i in links
        ]
        return user_out(user).model_copy(update={"identities": identities})

    return await portal.run_db(show)


@router.delete("/{name}/identities/{provider}", status_code=204, responses=errors(404))
async def unlink_identity(
    name: str,
    provider: str,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Unlink a user's account at a provider (admins); their next sign-in there links anew."""

    def unlink(session: Session) -> None:
        user = get_user(session, name)
        link = session.scalar(
            select(ExternalIdentity).where(
                ExternalIdentity.user_id == user.id, ExternalIdentity.provider == provider
            )
        )
        if link is None:
            raise NotFound(f"{name} has no account linked at {provider!r}", code="not_linked")
        session.delete(link)

    await portal.run_db(unlink)
    return Response(status_code=204)


@router.patch("/{name}", response_model=UserOut, responses=errors(409))
async def change_user(
    name: str,
    body: UserPatch,
    caller: Principal = require("admin"),
    portal: Portal = Depends(get_portal),
) -> UserOut:
    """Disable, enable, or change the admin flag or data-provider role of a user (admins)."""
    name = _name(caller, name)

    def change(session: Session) -> UserOut:
        user = get_user(session, name)
        if (body.disabled or body.is_admin is False) and user.is_admin:
            ensure_not_last_admin(session, user)
        if body.disabled is not None:
            set_disabled(user, body.disabled)
        if body.is_admin is not None:
            user.is_admin = body.is_admin
        if body.data_provider is not None:
            user.data_provider = body.data_provider
        session.flush()
        if portal.routes is not None:
            portal.routes.user_changed(user)
        return user_out(user)

    return await portal.run_db(change)


@router.put("/{name}/password", status_code=204)
async def change_password(
    name: str,
    body: PasswordIn,
    caller: Caller,
    request: Request,
    portal: Portal = Depends(get_portal),
) -> Response:
    """Set a password: your own (with the current one) or anyone's (admins).

    Every session of the user ends except the one making the change, which
    gets a renewed cookie; API tokens are kept.
    """
    name = _name(caller, name)
    own = name == caller.name
    if not own:
        caller.require("admin")
    else:
        caller.require("account")
    await portal.run_db(lambda s: get_user(s, name))
    if own and not (caller.is_admin and "admin" in caller.scopes):
        if body.current_password is None:
            raise Forbidden("give your current password to change it", code="current_password")
        try:
            # Rate limited like a sign-in: a stolen session cannot guess the password here.
            await verify_credentials(portal, request, name, body.current_password)
        except Unauthorized:
            raise Unauthorized(
                "the current password is wrong", code="invalid_credentials"
            ) from None
    password_hash = await portal.passwords.hash_new(body.password, name)

    def change(session: Session) -> None:
        user = get_user(session, name)
        set_password(session, user, password_hash)
        session.flush()
        if portal.routes is not None:
            portal.routes.user_changed(user)

    await portal.run_db(change)
    response = Response(status_code=204)
    if own and caller.session_id is not None:
        # Issued after sessions_valid_after moved: this session goes on, the others end.
        set_session_cookie(portal, response, caller.user_id, caller.session_id)
    return response


@router.delete("/{name}", status_code=204, responses=errors(409))
async def remove_user(
    name: str, caller: Principal = require("admin"), portal: Portal = Depends(get_portal)
) -> Response:
    """Delete a user and their tokens (admins). Their running instances are stopped first.

    What was shared with them goes too, and the routers drop them from every
    instance's access list at once. User ids are never given out again.
    """
    name = _name(caller, name)
    user = await portal.run_db(lambda s: get_user(s, name))
    await portal.instances.stop_all_of(user.id)

    def delete(session: Session) -> None:
        row = get_user(session, name)
        ensure_not_last_admin(session, row)
        user_id = row.id
        # Through the ORM rather than the database's cascade alone, so that every portal
        # replica hears of the shares and memberships that go (labgate.db.changes).
        shares = select(InstanceShare).where(InstanceShare.user_id == user_id)
        members = select(GroupMember).where(GroupMember.user_id == user_id)
        for gone in [*session.scalars(shares), *session.scalars(members)]:
            session.delete(gone)
        session.delete(row)
        session.flush()
        if portal.routes is not None:
            # Off every access list that named them, and their tokens off the routers.
            portal.routes.user_removed(user_id, session)

    await portal.run_db(delete)
    return Response(status_code=204)
