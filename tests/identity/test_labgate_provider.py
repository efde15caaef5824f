"""labgate as an OpenID Connect provider, checked with labgate's own OIDC client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from helpers import ADMIN_PASSWORD, PASSWORD
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
