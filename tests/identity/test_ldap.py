"""LDAP sign-in against a real slapd: bind as the user, search then bind, TLS, groups."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from idp_servers import BASE, Directory

from labgate.config import IdentityProviderConfig
from labgate.identity.base import ProviderUnavailable
from labgate.identity.ldap import LDAP

GROUPS = {"group_search_base": f"ou=groups,{BASE}", "group_filter": "(member={dn})"}


def bind_as_user(directory: Directory, **policy: Any) -> IdentityProviderConfig:
    return IdentityProviderConfig(
        name="dir",
        kind="ldap",
        options={
            "url": directory.ldap_url,
            "user_dn_template": f"uid={{username}},ou=people,{BASE}",
            **GROUPS,
        },
        **policy,
    )


def search_then_bind(directory: Directory, url: str, **tls: Any) -> IdentityProviderConfig:
    return IdentityProviderConfig(
        name="dir",
        kind="ldap",
        options={
            "url": url,
            "bind_dn": f"cn=reader,{BASE}",
            "bind_password": "reader-pw",
            "user_search_base": f"ou=people,{BASE}",
            "ca_file": directory.ca_file,
            **GROUPS,
            **tls,
        },
        first_login="open",
    )


async def test_bind_as_the_user_gives_the_entry_and_its_groups(slapd: Directory) -> None:
    provider = LDAP(bind_as_user(slapd))
    account = await provider.check_password("alice", "alice-ldap-pw")
    assert account is not None
    assert account.username == "alice" and account.email == "alice@lab.example"
    assert account.groups == {"physics"}
    # The subject is the entry's entryUUID, not its name.
    assert account.subject != "alice" and len(account.subject) == 36
    assert await provider.check_password("alice", "wrong") is None
    assert await provider.check_password("nobody", "alice-ldap-pw") is None


async def test_an_empty_password_is_refused_before_any_bind(slapd: Directory) -> None:
    # To LDAP an empty password is an unauthenticated bind, which succeeds.
    provider = LDAP(bind_as_user(slapd))
    assert await provider.check_password("alice", "") is None


@pytest.mark.parametrize("how", ["starttls", "ldaps"])
async def test_search_then_bind_over_tls(slapd: Directory, how: str) -> None:
    if how == "ldaps":
        config = search_then_bind(slapd, slapd.ldaps_url)
    else:
        config = search_then_bind(slapd, slapd.ldap_url, start_tls=True)
    provider = LDAP(config)
    account = await provider.check_password("bob", "bob-ldap-pw")
    assert account is not None and account.username == "bob" and account.groups == set()
    # A filter injection in the name finds nobody.
    assert await provider.check_password("*)(uid=*", "bob-ldap-pw") is None


async def test_a_certificate_nobody_vouched_for_is_refused(slapd: Directory) -> None:
    config = search_then_bind(slapd, slapd.ldaps_url, ca_file="")
    with pytest.raises(ProviderUnavailable):
        await LDAP(config).check_password("bob", "bob-ldap-pw")


async def test_ldap_sign_in_through_the_portal_maps_groups_and_is_rate_limited(
    slapd: Directory, portal_with: Any
) -> None:
    config = bind_as_user(
        slapd, first_login="open", group_map={"physics": "physicists"}, admin_groups=[]
    )
    app = await portal_with(
        [IdentityProviderConfig(name="local"), config], login_limit_account_address="3/minute"
    )
    async with httpx.AsyncClient(base_url=app.state.test_url) as client:
        page = await client.get("/login")
        assert 'option value="dir"' in page.text and 'option value="local"' in page.text
        signed = await client.post(
            "/api/v1/auth/login",
            json={"username": "alice", "password": "alice-ldap-pw", "provider": "dir"},
        )
        assert signed.status_code == 200, signed.text
        assert signed.json()["user"]["name"] == "alice"
        limits = await client.get("/api/v1/users/alice/limits")
        assert limits.status_code == 200, limits.text
        assert [g["name"] for g in limits.json()["groups"]] == ["physicists"]
        for _ in range(3):
            wrong = await client.post(
                "/api/v1/auth/login",
                json={"username": "bob", "password": "nope", "provider": "dir"},
            )
            assert wrong.status_code == 401
        over = await client.post(
            "/api/v1/auth/login",
            json={"username": "bob", "password": "bob-ldap-pw", "provider": "dir"},
        )
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1


async def test_ldap_existing_links_only_the_directorys_own_user_name(
    slapd: Directory, database_url: str
) -> None:
    from labgate.db.models import User
    from labgate.db.session import Database
    from labgate.errors import Forbidden
    from labgate.identity.linking import sign_in

    by_dn = bind_as_user(slapd, first_login="existing")
    # Found by e-mail address, with no user name attribute to read: the name
    # labgate would make of the address ("alice") claims no existing account.
    by_mail = search_then_bind(slapd, slapd.ldap_url, start_tls=True).model_copy(
        update={"name": "mail", "first_login": "existing"}
    )
    by_mail.options.update(user_filter="(mail={username})", username_attribute="nickName")
    alice = await LDAP(by_dn).check_password("alice", "alice-ldap-pw")
    bob = await LDAP(by_dn).check_password("bob", "bob-ldap-pw")
    mailed = await LDAP(by_mail).check_password("alice@lab.example", "alice-ldap-pw")
    assert alice is not None and bob is not None and mailed is not None
    assert mailed.username == "alice"
    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add_all([User(name="alice"), User(name="bob", is_admin=True)])
            session.flush()
            with pytest.raises(Forbidden):
                sign_in(session, by_mail, mailed)
            with pytest.raises(Forbidden):  # an admin's account: never automatically
                sign_in(session, by_dn, bob)
            assert sign_in(session, by_dn, alice).name == "alice"
    finally:
        db.dispose()
