"""labgate as an OpenID Connect provider, checked with labgate's own OIDC client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from helpers import ADMIN_PASSWORD, PASSWORD, answer
from labgate.config import IdentityProviderConfig, OAuthClientConfig
from labgate.identity.base import ProviderError
from labgate.identity.oidc import OpenIDConnect

CALLBACK = "http://service.test/callback"


async def test_a_service_learns_who_its_user_is_and_their_groups(portal_with: Any) -> None:
    client = OAuthClientConfig(
        client_id="svc", client_secret="svc-secret-123", redirect_uris=[CALLBACK], name="Svc"
    )
    app = await portal_with([IdentityProviderConfig(name="local")], oauth_clients=[client])
    url = app.state.test_url
    async with httpx.AsyncClient(base_url=url, timeout=10) as admin:
        signed = await admin.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin.headers["X-CSRF-Token"] = signed.json()["csrf_token"]
        await admin.post("/api/v1/users", json={"name": "alice", "password": PASSWORD})
        await admin.post("/api/v1/groups", json={"name": "physics"})
        await admin.put("/api/v1/groups/physics/members/alice")

    service = OpenIDConnect(
        IdentityProviderConfig(
            name="lab",
            kind="oidc",
            options={
                "issuer": url,
                "client_id": "svc",
                "client_secret": "svc-secret-123",
                "scopes": "openid profile groups",
            },
        )
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as browser:
        # Not signed in: labgate's sign-in page first, then back to the authorization.
        started = await service.start(CALLBACK)
        first = await browser.get(started.url)
        assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
        await browser.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})

        async def code_for(started: Any) -> dict[str, str]:
            back = await browser.get(started.url)
            assert back.status_code == 303, back.text
            location = httpx.URL(back.headers["location"])
            assert str(location).startswith(CALLBACK)
            return dict(location.params)

        params = await code_for(started)
        account = await service.finish(CALLBACK, params, started.keep)
        assert account.username == "alice" and account.groups == {"physics"}
        # A code is good once.
        with pytest.raises(ProviderError):
            await service.finish(CALLBACK, params, started.keep)
        # PKCE: a code taken by someone without the verifier is worth nothing.
        again = await service.start(CALLBACK)
        stolen = await code_for(again)
        with pytest.raises(ProviderError):
            await service.finish(CALLBACK, stolen, {**again.keep, "verifier": "x" * 64})
        # An address the client did not register gets labgate's error page, no redirect.
        elsewhere = str(httpx.URL(again.url).copy_set_param("redirect_uri", "http://evil.test/"))
        refused = await browser.get(elsewhere)
        assert refused.status_code == 400 and "location" not in refused.headers
    await service.close()


async def test_a_tool_learns_who_of_its_users_is_visiting(portal_with: Any) -> None:
    """An instance is a client (its id, its instance token), for those who may use it."""
    from helpers import wait_for_state
    from labgate.db.models import Instance

    app = await portal_with([IdentityProviderConfig(name="local")])
    url = app.state.test_url
    portal = app.state.portal
    async with httpx.AsyncClient(base_url=url, timeout=30) as admin:
        signed = await admin.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin.headers["X-CSRF-Token"] = signed.json()["csrf_token"]
        for name in ("alice", "bob"):
            await admin.post("/api/v1/users", json={"name": name, "password": PASSWORD})

    browsers = {name: httpx.AsyncClient(base_url=url, timeout=30) for name in ("alice", "bob")}
    try:
        csrf = {}
        for name, browser in browsers.items():
            login = await browser.post(
                "/api/v1/auth/login", json={"username": name, "password": PASSWORD}
            )
            csrf[name] = {"X-CSRF-Token": login.json()["csrf_token"]}
        alice, bob = browsers["alice"], browsers["bob"]
        launched = await alice.post(
            "/api/v1/instances", json={"tool": "demo"}, headers=csrf["alice"]
        )
        iid = launched.json()["id"]
        await wait_for_state(alice, {}, iid, {"running"})
        row = await portal.run_db(lambda s: s.get(Instance, iid))
        secret = portal.box.open(iid, row.secret)
        tool = OpenIDConnect(
            IdentityProviderConfig(
                name="lab",
                kind="oidc",
                options={"issuer": url, "client_id": iid, "client_secret": secret},
            )
        )
        callback = f"{url}/i/{iid}/hub/oauth_callback"

        async def sign_in(browser: httpx.AsyncClient) -> Any:
            started = await tool.start(callback)
            back = await browser.get(started.url)
            if back.status_code == 200:  # someone else's tool: labgate asks them first
                back = await answer(browser, back, "allow")
            if back.status_code != 303:
                return back.status_code
            params = dict(httpx.URL(back.headers["location"]).params)
            return await tool.finish(callback, params, started.keep)

        account = await sign_in(alice)
        assert account.username == "alice"
        assert await sign_in(bob) == 404  # not shared with bob: the tool learns nothing
        await alice.post(
            f"/api/v1/instances/{iid}/shares",
            json={"user": "bob", "access": "use"},
            headers=csrf["alice"],
        )
        assert (await sign_in(bob)).username == "bob"
        # Only back into this instance, and only with its own token.
        other = str(
            httpx.URL((await tool.start(callback)).url).copy_set_param(
                "redirect_uri", f"{url}/i/someotherinstance/cb"
            )
        )
        assert (await alice.get(other)).status_code == 400
        wrong = OpenIDConnect(
            IdentityProviderConfig(
                name="lab",
                kind="oidc",
                options={"issuer": url, "client_id": iid, "client_secret": "not-the-token"},
            )
        )
        started = await wrong.start(callback)
        back = await alice.get(started.url)
        with pytest.raises(ProviderError):
            await wrong.finish(
                callback, dict(httpx.URL(back.headers["location"]).params), started.keep
            )
        await tool.close()
        await wrong.close()
        await alice.delete(f"/api/v1/instances/{iid}", headers=csrf["alice"])
        await wait_for_state(alice, {}, iid, {"stopped"})
    finally:
        for browser in browsers.values():
            await browser.aclose()
