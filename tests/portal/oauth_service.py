"""A service registered with labgate's OpenID Connect provider, for the provider's tests."""

from __future__ import annotations

from typing import Any

import httpx

from helpers import PASSWORD, answer, wait_for_state
from labgate.config import OAuthClientConfig, Settings
from labgate.db.models import Instance

SERVICE = "svc"
SERVICE_SECRET = "svc-secret-123"
CALLBACK = "http://service.test/callback"


def with_service(settings: Settings) -> Settings:
    """``settings`` with the service registered besides the instances' clients."""
    service = OAuthClientConfig(
        client_id=SERVICE, client_secret=SERVICE_SECRET, redirect_uris=[CALLBACK]
    )
    return settings.model_copy(update={"oauth_clients": [service]})


async def code_for(
    browser: httpx.AsyncClient,
    client_id: str = SERVICE,
    redirect_uri: str = CALLBACK,
    *,
    consent: bool = False,
    **extra: str,
) -> str:
    """The code ``/oauth/authorize`` sends the browser back to the client with.

    ``consent``: labgate asks first (someone else's instance), and the person allows.
    """
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": "s",
        **extra,
    }
    back = await browser.get("/oauth/authorize", params=params)
    if consent:
        back = await answer(browser, back, "allow")
    assert back.status_code == 303, back.text
    location = httpx.URL(back.headers["location"])
    assert str(location).startswith(redirect_uri) and "code" in location.params, location
    return str(location.params["code"])


async def instance_client(
    app: Any, client: httpx.AsyncClient, owner: dict[str, str]
) -> tuple[str, str, str]:
    """A running ``demo`` of ``owner``'s as a client: its id, its secret (what a shell in the
    instance reads) and a callback under its own prefix."""
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=owner)
    assert launched.status_code == 202, launched.text
    iid = str(launched.json()["id"])
    await wait_for_state(client, owner, iid, {"running"})
    portal = app.state.portal
    row = await portal.run_db(lambda s: s.get(Instance, iid))
    secret = str(portal.box.open(iid, row.secret))
    return iid, secret, portal.settings.instance_url(iid) + "oauth/callback"


async def signed_in(app: Any, name: str) -> tuple[httpx.AsyncClient, dict[str, str]]:
    """A browser with ``name``'s portal session, and its CSRF header (close it after)."""
    browser = httpx.AsyncClient(base_url=app.state.test_url, timeout=30)
    login = await browser.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return browser, {"X-CSRF-Token": login.json()["csrf_token"]}


async def userinfo(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """``GET /oauth/userinfo`` with ``token``."""
    return await client.get("/oauth/userinfo", headers={"Authorization": f"Bearer {token}"})
