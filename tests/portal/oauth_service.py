"""A service registered with labgate's OpenID Connect provider, for the provider's tests."""

from __future__ import annotations

import httpx

from labgate.config import OAuthClientConfig, Settings

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
    **extra: str,
) -> str:
    """The code ``/oauth/authorize`` sends the browser back to the client with."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": "s",
        **extra,
    }
    back = await browser.get("/oauth/authorize", params=params)
    assert back.status_code == 303, back.text
    location = httpx.URL(back.headers["location"])
    assert str(location).startswith(redirect_uri) and "code" in location.params, location
    return str(location.params["code"])
