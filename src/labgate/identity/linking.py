"""From what a provider vouches for to a labgate account.

Accounts are linked by ``(provider, subject)``: a provider's stable subject,
never a display name or e-mail address, which can change hands. The first
sign-in with an unknown subject follows the provider's ``first_login``:

- ``existing``: only a user an admin already created, named exactly as the
  provider's own user name (``ProviderAccount.provider_name``: no case
  folding, cleaning, or name made from an e-mail address), not an admin, and
  not yet linked to another subject of this provider. The provider is trusted
  to own those names (an institution's directory). An account another
  provider's sign-in made (no labgate password, linked there) is not one an
  admin created: whoever signed in there chose its name.
- ``domains``: a new account, when the e-mail domain is in ``allowed_domains``.
- ``open``: a new account for anyone the provider knows.

A new account never takes over an existing one: when the name is taken it
gets a ``-2``, ``-3``... suffix. At every sign-in, membership of the labgate
groups named in ``group_map`` follows the provider's groups (other groups are
left alone) and, when ``admin_groups`` is set, so does the admin flag (the
last enabled admin keeps it, so the settings can still be fixed).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.config import IdentityProviderConfig
from labgate.db.models import ExternalIdentity, Group, GroupMember, User, utcnow
from labgate.errors import Forbidden, Unauthorized
from labgate.identity.base import ProviderAccount, existing_name

log = logging.getLogger(__name__)


def sign_in(session: Session, config: IdentityProviderConfig, account: ProviderAccount) -> User:
    """The labgate user for ``account`` (linked or created now), its groups brought up to date.

    403 when the first-login policy keeps the person out; 401 for a disabled account.
    """
    link = session.scalar(
        select(ExternalIdentity).where(
            ExternalIdentity.provider == config.name, ExternalIdentity.subject == account.subject
        )
    )
    if link is None:
        user = _first_login(session, config, account)
        link = ExternalIdentity(user_id=user.id, provider=config.name, subject=account.subject)
        session.add(link)
    else:
        user = link.user
    if user.disabled:
        raise Unauthorized(
            "this account is disabled; ask an administrator", code="account_disabled"
        )
    apply_groups(session, config, user, account.groups)
    link.last_login_at = user.last_login_at = utcnow()
    if account.email:
        link.email = account.email
    session.flush()
    return user


def _first_login(
    session: Session, config: IdentityProviderConfig, account: ProviderAccount
) -> User:
    if config.first_login == "existing":
        return _existing_account(session, config, account)
    if config.first_login == "domains" and account.domain not in config.allowed_domains:
        raise Forbidden(
            "accounts from your e-mail domain cannot sign in here; ask an administrator",
            code="domain_not_allowed",
        )
    user = User(name=_free_name(session, account.username), password_hash="")
    session.add(user)
    session.flush()
    return user


def _existing_account(
    session: Session, config: IdentityProviderConfig, account: ProviderAccount
) -> User:
    """``existing``: the account named exactly by the provider's own user name.

    Never by a cleaned or e-mail-derived name, which another person's name can
    share, and never an admin's account: an administrator links that one.
    """
    name = existing_name(account)
    user = None if name is None else session.scalar(select(User).where(User.name == name))
    if user is None or user.name != name or user.name.startswith("_"):
        if not account.provider_name:
            raise Forbidden(
                f"{config.name} sent no user name to find your labgate account by; "
                "ask an administrator",
                code="no_account",
            )
        raise Forbidden(
            f"there is no labgate account named exactly {account.provider_name[:64]!r} (your "
            f"user name at {config.name}); ask an administrator to create one",
            code="no_account",
        )
    if user.is_admin:
        log.warning(
            "%s: %s signed in as %r, an admin account; not linked automatically",
            config.name,
            account.subject,
            name,
        )
        raise Forbidden(
            f"{name!r} is an administrator's account, never linked to {config.name} "
            "automatically: an administrator links it by taking its admin rights away "
            f'(PATCH /api/v1/users/{name} {{"is_admin": false}}) for its owner\'s first '
            "sign-in here, then giving them back",
            code="no_account",
        )
    made_by = _made_by_another_provider(session, config, user)
    if made_by is not None:
        # Whoever first signed in at that provider owns it: linked by name to this
        # provider's subject, both would share it (account pre-hijacking).
        log.warning(
            "%s: %s signed in as %r, an account a sign-in at %s made; not linked",
            config.name,
            account.subject,
            name,
            made_by,
        )
        raise Forbidden(
            f"the labgate account {name!r} was made by a sign-in at {made_by}, not by an "
            "administrator, so it is not linked by name; ask an administrator",
            code="no_account",
        )
    linked = session.scalar(
        select(ExternalIdentity.id).where(
            ExternalIdentity.user_id == user.id, ExternalIdentity.provider == config.name
        )
    )
    if linked is not None:
        raise Forbidden(
            f"there is no labgate account named exactly {name!r} (your user name at "
            f"{config.name}); ask an administrator to create one",
            code="no_account",
        )
    return user


def _made_by_another_provider(
    session: Session, config: IdentityProviderConfig, user: User
) -> str | None:
    """The provider whose first sign-in made ``user`` (no labgate password, linked there).

    Accounts an administrator makes always have a password (a generated one when
    none is given); accounts ``open`` and ``domains`` make have none. An
    administrator vouches for such an account by giving it a password, or by
    unlinking the other provider.
    """
    if user.password_hash:
        return None
    return session.scalar(
        select(ExternalIdentity.provider)
        .where(ExternalIdentity.user_id == user.id, ExternalIdentity.provider != config.name)
        .order_by(ExternalIdentity.id)
        .limit(1)
    )


def _last_admin(session: Session, user: User) -> bool:
    others = session.scalar(
        select(User.id).where(User.is_admin, ~User.disabled, User.id != user.id).limit(1)
    )
    return others is None


def _free_name(session: Session, wanted: str) -> str:
    taken = set(session.scalars(select(User.name).where(User.name.like(f"{wanted}%"))))
    if wanted not in taken:
        return wanted
    number = 2
    while f"{wanted}-{number}" in taken:
        number += 1
    return f"{wanted}-{number}"


def apply_groups(
    session: Session, config: IdentityProviderConfig, user: User, groups: frozenset[str]
) -> None:
    """Mapped group memberships and the admin flag, as the provider's groups say."""
    if config.admin_groups:
        admin = bool(groups & set(config.admin_groups))
        if user.is_admin and not admin and _last_admin(session, user):
            # Taking the last admin's rights would leave nobody to fix the settings.
            log.warning("%s stays an admin: the last enabled one", user.name)
            admin = True
        user.is_admin = admin
    if not config.group_map:
        return
    wanted = {target for source, target in config.group_map.items() if source in groups}
    for name in sorted(set(config.group_map.values())):
        group = session.scalar(select(Group).where(Group.name == name))
        if group is None:
            if name not in wanted:
                continue
            group = Group(name=name, description=f"members of {config.name} groups")
            session.add(group)
            session.flush()
        member = session.get(GroupMember, (group.id, user.id))
        if name in wanted and member is None:
            session.add(GroupMember(group_id=group.id, user_id=user.id))
        elif name not in wanted and member is not None:
            session.delete(member)
    session.flush()
