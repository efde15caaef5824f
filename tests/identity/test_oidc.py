"""OpenID Connect sign-in against npm's oidc-provider: PKCE, subjects, policies, login CSRF."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import httpx
from idp_servers import oidc_config
from sqlalchemy import select

from labgate.db.models import ExternalIdentity, User

#: The provider's accounts are known by subject (tests/identity/oidc_provider.mjs).
SUBJECTS = {"alice": "a-1f3e", "bob": "b-77c0", "carol": "c-9d21"}


async def at_provider(auth_url: str, login: str) -> str:
    """Sign in as ``login`` on the provider's own page; the callback URL it sends back to."""
    async with httpx.AsyncClient(timeout=10) as idp:
        response = await idp.get(auth_url)
        for _ in range(10):
            if response.status_code in (302, 303):
                location = response.headers["location"]
                if "/callback" in location:
                    return location
                response = await idp.get(httpx.URL(str(response.url)).join(location))
                continue
            form = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            assert form is not None, response.text
            action = httpx.URL(str(response.url)).join(form.group(1).replace("&amp;", "&"))
            response = await idp.post(
                action, data={"prompt": "login", "login": SUBJECTS[login], "password": "any"}
            )
    raise AssertionError("the provider never sent the browser back")


async def sign_in(client: httpx.AsyncClient, provider: str, login: str) -> httpx.Response:
    """The whole round trip as a browser makes it; the portal's answer to the callback."""
    started = await client.get(f"/login/{provider}/start", params={"next": "/instances"})
    assert started.status_code == 303, started.text
    auth_url = started.headers["location"]
    query = dict(httpx.URL(auth_url).params)
    assert query["code_challenge_method"] == "S256" and query["code_challenge"]
    assert "code_verifier" not in auth_url
    callback = urlsplit(await at_provider(auth_url, login))
    return await client.get(f"{callback.path}?{callback.query}")


async def whoami(client: httpx.AsyncClient) -> str:
    response = await client.get("/api/v1/auth/session")
    assert response.status_code == 200, response.text
    return str(response.json()["user"]["name"])


async def test_first_sign_in_creates_the_account_and_links_it_by_subject(
    oidc_issuer: str, portal_with: Any
) -> None:
    app = await portal_with(
        [oidc_config("uni", oidc_issuer, first_login="open", group_map={"physics": "phys"})]
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        done = await sign_in(browser, "uni", "alice")
        assert done.status_code == 303 and done.headers["location"] == "/instances"
        assert await whoami(browser) == "alice"
    portal = app.state.portal
    links = await portal.run_db(
        lambda s: [
            (i.provider, i.subject, i.user.name) for i in s.scalars(select(ExternalIdentity))
        ]
    )
    assert links == [("uni", "a-1f3e", "alice")]
    # Renamed in labgate, the same person still lands in the same account: the subject decides.
    await portal.run_db(
        lambda s: setattr(s.scalar(select(User).where(User.name == "alice")), "name", "ada")
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        await sign_in(browser, "uni", "alice")
        assert await whoami(browser) == "ada"
        groups = (await browser.get("/api/v1/users/ada/limits")).json()["groups"]
        assert [g["name"] for g in groups] == ["phys"]


async def test_two_providers_side_by_side_each_a_button(oidc_issuer: str, portal_with: Any) -> None:
    app = await portal_with(
        [
            oidc_config("uni", oidc_issuer, first_login="open"),
            oidc_config("campus", oidc_issuer, first_login="open"),
        ]
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        page = await browser.get("/login")
        assert 'id="provider-uni"' in page.text and 'id="provider-campus"' in page.text
        assert 'name="password"' not in page.text  # no local passwords configured
        done = await sign_in(browser, "campus", "bob")
        assert done.status_code == 303
        assert await whoami(browser) == "bob"


async def test_existing_users_only_and_listed_domains(oidc_issuer: str, portal_with: Any) -> None:
    app = await portal_with(
        [
            oidc_config("uni", oidc_issuer, first_login="existing"),
            oidc_config(
                "campus", oidc_issuer, first_login="domains", allowed_domains=["uni.example"]
            ),
        ]
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        refused = await sign_in(browser, "uni", "bob")
        assert refused.status_code == 403 and 'data-code="no_account"' in refused.text
        elsewhere = await sign_in(browser, "campus", "bob")  # bob@elsewhere.example
        assert elsewhere.status_code == 403 and "domain_not_allowed" in elsewhere.text
        welcome = await sign_in(browser, "campus", "alice")  # alice@uni.example
        assert welcome.status_code == 303
        assert await whoami(browser) == "alice"
    # alice exists now, but campus's sign-in made her account, not an administrator:
    # "existing" does not link it by name (whoever signed in at campus chose the name).
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        refused = await sign_in(browser, "uni", "alice")
        assert refused.status_code == 403 and 'data-code="no_account"' in refused.text
    # Once an administrator vouches for it (gives it a password, as PUT
    # /api/v1/users/alice/password does), uni links it, by name.
    await app.state.portal.run_db(
        lambda s: setattr(
            s.scalar(select(User).where(User.name == "alice")), "password_hash", "set-by-admin"
        )
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        assert (await sign_in(browser, "uni", "alice")).status_code == 303
        assert await whoami(browser) == "alice"


async def test_an_open_provider_never_takes_over_an_existing_account(
    oidc_issuer: str, portal_with: Any
) -> None:
    # The admin is "admin"; a provider account named like a local one gets a name of its own.
    app = await portal_with([oidc_config("uni", oidc_issuer, first_login="open")])
    await app.state.portal.run_db(lambda s: s.add(User(name="bob", password_hash="")))
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        await sign_in(browser, "uni", "bob")
        assert await whoami(browser) == "bob-2"


async def test_provider_groups_make_admins(oidc_issuer: str, portal_with: Any) -> None:
    app = await portal_with(
        [oidc_config("uni", oidc_issuer, first_login="open", admin_groups=["labgate-admins"])]
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        await sign_in(browser, "uni", "carol")
        session = (await browser.get("/api/v1/auth/session")).json()
        assert session["user"]["is_admin"] is True and "admin" in session["scopes"]


async def test_a_callback_started_by_someone_else_is_refused(
    oidc_issuer: str, portal_with: Any
) -> None:
    """Login CSRF: an attacker's own code and state, pushed into the victim's browser."""
    app = await portal_with([oidc_config("uni", oidc_issuer, first_login="open")])
    url = app.state.test_url
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as attacker,
        httpx.AsyncClient(base_url=url, timeout=10) as victim,
    ):
        started = await attacker.get("/login/uni/start")
        callback = urlsplit(await at_provider(started.headers["location"], "bob"))
        # The victim has started a sign-in of their own (so has a flow cookie), or none.
        await victim.get("/login/uni/start")
        pushed = await victim.get(f"{callback.path}?{callback.query}")
        assert pushed.status_code == 403 and 'data-code="csrf_failed"' in pushed.text
        assert (await victim.get("/api/v1/auth/session")).status_code == 401
        # Without any flow cookie: refused as well.
        victim.cookies.clear()
        pushed = await victim.get(f"{callback.path}?{callback.query}")
        assert pushed.status_code == 403


async def test_an_id_token_the_provider_did_not_sign_is_refused(oidc_issuer: str) -> None:
    """Signature, then claims: a token signed with another key, or with none, is no sign-in."""
    import base64
    import json
    import time

    import pytest
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    from labgate.identity.base import ProviderError
    from labgate.identity.oidc import OpenIDConnect

    provider = OpenIDConnect(oidc_config("uni", oidc_issuer))
    now = int(time.time())
    claims = {
        "iss": oidc_issuer,
        "aud": "labgate",
        "sub": "a-1f3e",
        "nonce": "n-1",
        "iat": now,
        "exp": now + 300,
    }
    forged = jwt.encode({"alg": "RS256", "kid": "x"}, claims, RSAKey.generate_key(2048))
    with pytest.raises(ProviderError):
        await provider._check_id_token(forged, "n-1")

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    unsigned = f"{part({'alg': 'none'})}.{part(claims)}."
    with pytest.raises(ProviderError):
        await provider._check_id_token(unsigned, "n-1")
    await provider.close()


async def test_an_admin_sees_and_unlinks_a_users_provider_account(
    oidc_issuer: str, portal_with: Any
) -> None:
    from helpers import ADMIN_PASSWORD, PASSWORD
    from labgate.config import IdentityProviderConfig

    app = await portal_with(
        [
            oidc_config("uni", oidc_issuer, first_login="existing"),
            IdentityProviderConfig(name="local"),
        ]
    )
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as admin:
        signed = await admin.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin.headers["X-CSRF-Token"] = signed.json()["csrf_token"]
        made = await admin.post("/api/v1/users", json={"name": "alice", "password": PASSWORD})
        assert made.status_code == 201
        async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
            assert (await sign_in(browser, "uni", "alice")).status_code == 303
            mine = (await browser.get("/api/v1/users/me")).json()["identities"]
            assert [(i["provider"], i["subject"]) for i in mine] == [("uni", "a-1f3e")]
            refused = await browser.delete("/api/v1/users/alice/identities/uni")
            assert refused.status_code == 403
        assert (await admin.delete("/api/v1/users/alice/identities/uni")).status_code == 204
        assert (await admin.get("/api/v1/users/alice")).json()["identities"] == []
        gone = await admin.delete("/api/v1/users/alice/identities/uni")
        assert gone.status_code == 404 and gone.json()["error"] == "not_linked"
