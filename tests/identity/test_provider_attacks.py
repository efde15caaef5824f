"""Institutional sign-in, as its attackers see it: holes found in a review, each held shut.

- an account another provider made is not an account an admin made: ``existing``
  never links it by name (account pre-hijacking through an open provider);
- one directory entry, many spellings of its name: they share one set of
  sign-in limits (a guesser cannot multiply them with full-width or circled letters);
- an e-mail address the provider marks unverified in any spelling proves no domain;
- a provider's error is believed, and shown, only with the ``state`` of this
  browser's own sign-in (no attacker's text on labgate's page);
- a provider's odd ``groups`` claim is no 500 and no group;
- the sign-in flow cookie is one no sibling host can plant (login CSRF).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from idp_servers import BASE, Directory, oidc_config
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.config import IdentityProviderConfig
from labgate.db.models import ExternalIdentity, User
from labgate.db.session import Database
from labgate.errors import Forbidden
from labgate.identity.linking import sign_in
from labgate.identity.oidc import OpenIDConnect


def oidc(name: str, first_login: str, **extra: Any) -> IdentityProviderConfig:
    return IdentityProviderConfig(
        name=name,
        kind="oidc",
        first_login=first_login,
        options={"issuer": f"https://{name}.example", "client_id": "labgate"},
        **extra,
    )


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add(User(name="admin", is_admin=True, password_hash="x"))
            session.flush()
            yield session
    finally:
        db.dispose()


def test_existing_never_links_an_account_another_provider_made(session: Session) -> None:
    """Pre-hijacking: mallory names herself carol at an open provider before carol signs in.

    ``existing`` is for accounts an administrator made. One that a sign-in at
    another provider made (no labgate password, linked there) is mallory's: were
    it linked to carol's institutional subject, both would share it for good.
    """
    social = oidc("social", "open")
    uni = oidc("uni", "existing")
    squat = sign_in(
        session,
        social,
        OpenIDConnect(social).account_from({"sub": "m-666", "preferred_username": "carol"}),
    )
    assert squat.name == "carol" and squat.password_hash == ""
    carol = OpenIDConnect(uni).account_from({"sub": "c-9d21", "preferred_username": "carol"})
    with pytest.raises(Forbidden) as refused:
        sign_in(session, uni, carol)
    assert refused.value.code == "no_account"
    session.rollback()
    linked = session.scalars(
        select(ExternalIdentity.provider).where(ExternalIdentity.provider == "uni")
    ).all()
    assert linked == []
    # An account an administrator made (it has a labgate password) is linked as before.
    session.add(User(name="dave", password_hash="x"))
    session.flush()
    dave = OpenIDConnect(uni).account_from({"sub": "d-1", "preferred_username": "dave"})
    assert sign_in(session, uni, dave).name == "dave"


def test_an_address_marked_unverified_in_any_spelling_proves_no_domain(session: Session) -> None:
    """``email_verified`` as a string (``"false"``, as some providers send it) or null."""
    campus = oidc("campus", "domains", allowed_domains=["uni.example"])
    provider = OpenIDConnect(campus)
    for flag in ("false", "False", " FALSE ", None, 0, "no"):
        account = provider.account_from(
            {"sub": f"m-{flag!r}", "email": "mallory@uni.example", "email_verified": flag}
        )
        assert account.email == "" and account.domain == "", flag
        with pytest.raises(Forbidden) as refused:
            sign_in(session, campus, account)
        assert refused.value.code == "domain_not_allowed"
    for flag in (True, "true", "TRUE"):
        account = provider.account_from(
            {"sub": "a-1", "email": "alice@uni.example", "email_verified": flag}
        )
        assert account.domain == "uni.example", flag


def test_with_require_verified_email_an_address_without_the_claim_proves_no_domain(
    session: Session,
) -> None:
    """By default a provider that never sends ``email_verified`` vouches for its addresses;
    with ``require_verified_email`` only a ``true`` does."""
    claims = {"sub": "m-1", "email": "mallory@uni.example"}
    lenient = OpenIDConnect(oidc("campus", "domains", allowed_domains=["uni.example"]))
    assert lenient.account_from(claims).domain == "uni.example"
    strict_config = IdentityProviderConfig(
        name="strict",
        kind="oidc",
        first_login="domains",
        allowed_domains=["uni.example"],
        options={
            "issuer": "https://strict.example",
            "client_id": "labgate",
            "require_verified_email": True,
        },
    )
    strict = OpenIDConnect(strict_config)
    account = strict.account_from(claims)
    assert account.email == "" and account.domain == ""
    with pytest.raises(Forbidden) as refused:
        sign_in(session, strict_config, account)
    assert refused.value.code == "domain_not_allowed"
    verified = strict.account_from({**claims, "sub": "a-1", "email_verified": True})
    assert verified.domain == "uni.example"


@pytest.mark.parametrize("groups", [5, True, 1.5, {"labgate-admins": True}])
def test_a_groups_claim_that_is_no_list_gives_no_groups_and_no_error(groups: Any) -> None:
    """A provider sending ``groups`` as a number or an object: no 500, no group, no admin."""
    provider = OpenIDConnect(oidc("uni", "open", admin_groups=["labgate-admins"]))
    account = provider.account_from({"sub": "a-1", "preferred_username": "ada", "groups": groups})
    assert account.groups == frozenset()


async def test_ldap_spellings_of_one_name_share_its_sign_in_limits(
    slapd: Directory, portal_with: Any
) -> None:
    """The directory binds bob in full-width or circled letters as bob: the limits count alike."""
    config = IdentityProviderConfig(
        name="dir",
        kind="ldap",
        first_login="open",
        options={"url": slapd.ldap_url, "user_dn_template": f"uid={{username}},ou=people,{BASE}"},
    )
    app = await portal_with([config], login_limit_account_address="3/minute")
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as guesser:
        for _ in range(3):
            wrong = await guesser.post(
                "/api/v1/auth/login", json={"username": "bob", "password": "guess"}
            )
            assert wrong.status_code == 401, wrong.text
        # Full-width, circled, full-width capitals, an em space after, capitals.
        for spelling in (
            "\uff42\uff4f\uff42",
            "\u24d1ob",
            "\uff22\uff2f\uff22",
            "bob\u2003",
            "BOB",
        ):
            # The right password, even: the limit is used up for this entry, however spelt.
            again = await guesser.post(
                "/api/v1/auth/login", json={"username": spelling, "password": "bob-ldap-pw"}
            )
            assert again.status_code == 429, (spelling, again.status_code, again.text)
            assert int(again.headers["Retry-After"]) >= 1


async def test_a_provider_error_counts_only_with_this_browsers_state(
    oidc_issuer: str, portal_with: Any
) -> None:
    """Another site's link to the callback with an ``error`` puts no text of its own on the page."""
    app = await portal_with([oidc_config("uni", oidc_issuer, first_login="open")])
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as victim:
        # The attacker's page opened /login/uni/start first, so the victim has a flow cookie.
        started = await victim.get("/login/uni/start")
        assert started.status_code == 303
        text = "Your account is locked. Call the help desk on +1 555 0100"
        for state in ("not-the-state", None):
            params = {"error": "access_denied", "error_description": text}
            if state is not None:
                params["state"] = state
            await victim.get("/login/uni/start")
            pushed = await victim.get("/login/uni/callback", params=params)
            assert pushed.status_code == 403, pushed.text
            assert 'data-code="csrf_failed"' in pushed.text
            assert "555 0100" not in pushed.text
        # The provider's own error, with this browser's state, is still shown.
        started = await victim.get("/login/uni/start")
        state = dict(httpx.URL(started.headers["location"]).params)["state"]
        refused = await victim.get(
            "/login/uni/callback",
            params={"error": "access_denied", "error_description": "denied", "state": state},
        )
        assert refused.status_code == 401 and 'data-code="identity_provider_refused"' in (
            refused.text
        )


async def test_a_sign_in_flow_cookie_another_host_planted_signs_no_one_in(
    oidc_issuer: str, portal_with: Any
) -> None:
    """Login CSRF through a sibling host (a tool on ``<id>.apps.example.org``).

    The attacker starts a sign-in of their own, stops at the provider's
    redirect (their code and state), and has a page on a sibling host set
    their flow cookie for the parent domain (``Domain=example.org``, which
    any host under it may set, unlike a ``__Host-`` cookie), then sends the
    victim to the callback. The victim must not be signed in as the attacker.
    """
    from test_oidc import at_provider

    app = await portal_with(
        [oidc_config("uni", oidc_issuer, first_login="open")], cookie_secure=True
    )
    url = app.state.test_url
    async with httpx.AsyncClient(base_url=url, timeout=10) as attacker:
        started = await attacker.get("/login/uni/start")
        assert started.status_code == 303
        flow = next(
            value.split(";", 1)[0].partition("=")[2]
            for value in started.headers.get_list("set-cookie")
            if "signin-flow=" in value.split(";", 1)[0]
        )
        callback = urlsplit(await at_provider(started.headers["location"], "bob"))
    # What the victim's browser sends: the cookie the sibling host planted under the
    # only name such a host can plant.
    async with httpx.AsyncClient(base_url=url, timeout=10) as victim:
        pushed = await victim.get(
            f"{callback.path}?{callback.query}",
            headers={"Cookie": f"labgate-signin-flow={flow}"},
        )
        session_cookies = [
            value for value in pushed.headers.get_list("set-cookie") if "labgate-session=" in value
        ]
        assert pushed.status_code == 403 and 'data-code="csrf_failed"' in pushed.text
        assert session_cookies == []


async def test_over_plain_http_a_flow_cookie_sent_twice_signs_no_one_in(
    oidc_issuer: str, portal_with: Any
) -> None:
    """Without Secure cookies the plain name is the only one: a planted copy beside the
    victim's own flow cookie, in either order, makes the callback refuse, never pick."""
    from test_oidc import at_provider

    app = await portal_with([oidc_config("uni", oidc_issuer, first_login="open")])
    url = app.state.test_url

    async def flow_and_callback(who: str) -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as browser:
            started = await browser.get("/login/uni/start")
            flow = next(
                value.split(";", 1)[0].partition("=")[2]
                for value in started.headers.get_list("set-cookie")
                if value.startswith("labgate-signin-flow=")
            )
            back = urlsplit(await at_provider(started.headers["location"], who))
        return flow, f"{back.path}?{back.query}"

    attackers, callback = await flow_and_callback("bob")
    victims, _ = await flow_and_callback("alice")
    for cookie in (
        f"labgate-signin-flow={victims}; labgate-signin-flow={attackers}",
        f"labgate-signin-flow={attackers}; labgate-signin-flow={victims}",
    ):
        async with httpx.AsyncClient(base_url=url, timeout=10) as victim:
            pushed = await victim.get(callback, headers={"Cookie": cookie})
        assert pushed.status_code == 403 and 'data-code="csrf_failed"' in pushed.text
        assert not [c for c in pushed.headers.get_list("set-cookie") if "labgate-session=" in c]


async def test_first_sign_ins_of_one_subject_at_once_make_one_account(app: Any) -> None:
    """Two tabs (or a double click) finishing the first sign-in of one person together:
    both inserted the account, and the loser's unique-key error was a 500."""
    from types import SimpleNamespace

    from labgate.identity.base import ProviderAccount
    from labgate.portal.api.auth import complete_sign_in

    portal = app.state.portal
    provider: Any = SimpleNamespace(config=oidc("uni", "open"))
    account = ProviderAccount(subject="s-race", username="racer", provider_name="racer")
    users = await asyncio.gather(*(complete_sign_in(portal, provider, account) for _ in range(8)))
    assert {user.id for user in users} == {users[0].id}

    def accounts(session: Session) -> list[str]:
        return list(session.scalars(select(User.name).where(User.name.like("racer%"))))

    assert await portal.run_db(accounts) == ["racer"]
