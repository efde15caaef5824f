"""``first_login = "existing"``: an existing account only by the provider's exact user name.

On a real database, through ``sign_in`` (what the OpenID Connect callback and
the LDAP form call) with accounts made by ``OpenIDConnect.account_from``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.config import IdentityProviderConfig
from labgate.db.models import ExternalIdentity, User
from labgate.db.session import Database
from labgate.errors import Forbidden
from labgate.identity.base import ProviderAccount, clean_username
from labgate.identity.linking import sign_in
from labgate.identity.oidc import OpenIDConnect


def provider(first_login: str = "existing", **extra: Any) -> IdentityProviderConfig:
    return IdentityProviderConfig(
        name="uni",
        kind="oidc",
        first_login=first_login,
        options={"issuer": "https://idp.example", "client_id": "labgate"},
        **extra,
    )


def account(config: IdentityProviderConfig, **claims: Any) -> ProviderAccount:
    return OpenIDConnect(config).account_from(claims)


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    """A database with an admin ``admin`` and a user ``kate``."""
    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add_all(
                [
                    User(name="admin", is_admin=True, password_hash="x"),
                    User(name="kate", password_hash="x"),
                ]
            )
            session.flush()
            yield session
    finally:
        db.dispose()


def links(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ExternalIdentity)) or 0


# A provider user whose name only *cleans* to a local name, or who sent no
# user name at all (an e-mail address then names a new account), is not that user.
LOOK_ALIKES = [
    {"preferred_username": "{name}@attacker.example"},
    {"preferred_username": "{NAME}!"},
    {"preferred_username": "{name}_"},
    {"email": "{name}@gmail.com", "email_verified": True},
    {"preferred_username": "{NAME}"},
    {"preferred_username": " {name}"},
]


@pytest.mark.parametrize("target", ["kate", "admin"])
@pytest.mark.parametrize("template", LOOK_ALIKES)
def test_existing_never_links_a_name_that_only_cleans_to_a_local_one(
    session: Session, target: str, template: dict[str, Any]
) -> None:
    config = provider()
    claims = {
        key: value.format(name=target, NAME=target.upper()) if isinstance(value, str) else value
        for key, value in template.items()
    }
    who = account(config, sub="evil", **claims)
    assert who.username == target  # as a new account's name, it would be this one's
    with pytest.raises(Forbidden) as refused:
        sign_in(session, config, who)
    assert refused.value.code == "no_account"
    assert links(session) == 0


def test_existing_never_links_the_kelvin_sign_to_k(session: Session) -> None:
    # U+212A KELVIN SIGN: str.lower() makes it an ASCII "k", NFKC a "K".
    config = provider()
    who = account(config, sub="kelvin", preferred_username="\u212aate")
    assert who.username != "kate" and clean_username("\u212aATE") != "kate"
    with pytest.raises(Forbidden):
        sign_in(session, config, who)
    assert links(session) == 0
    # An open provider gives the look-alike an account of its own.
    made = sign_in(session, provider("open"), who)
    assert made.name not in ("kate", "admin") and not made.is_admin


def test_existing_links_the_exact_name_once(session: Session) -> None:
    config = provider()
    kate = session.scalar(select(User).where(User.name == "kate"))
    assert kate is not None
    first = sign_in(session, config, account(config, sub="k-1", preferred_username="kate"))
    assert first.id == kate.id
    again = sign_in(session, config, account(config, sub="k-1", preferred_username="kate"))
    assert again.id == kate.id and links(session) == 1
    # Another subject with the same name does not get the account that is linked already.
    with pytest.raises(Forbidden):
        sign_in(session, config, account(config, sub="k-2", preferred_username="kate"))
    assert links(session) == 1


def test_existing_never_links_an_admin_account_automatically(session: Session) -> None:
    config = provider()
    admin = session.scalar(select(User).where(User.name == "admin"))
    assert admin is not None
    who = account(config, sub="a-1", preferred_username="admin")
    with pytest.raises(Forbidden) as refused:
        sign_in(session, config, who)
    assert "is_admin" in refused.value.detail and links(session) == 0
    # What the message says: an admin takes the rights away for the first sign-in.
    admin.is_admin = False
    session.add(User(name="root2", is_admin=True, password_hash="x"))
    session.flush()
    assert sign_in(session, config, who).id == admin.id
    admin.is_admin = True
    session.flush()
    assert sign_in(session, config, who).id == admin.id  # linked: the subject decides now


def test_open_and_domains_still_name_new_accounts_after_cleaned_names(session: Session) -> None:
    config = provider("open")
    made = sign_in(session, config, account(config, sub="o-1", preferred_username="ADMIN!"))
    assert made.name == "admin-2" and not made.is_admin
    domains = provider("domains", allowed_domains=["uni.example"])
    who = account(domains, sub="d-1", email="Kate@uni.example")
    assert sign_in(session, domains, who).name == "kate-2"
