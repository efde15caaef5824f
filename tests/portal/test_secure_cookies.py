"""Every cookie the portal sets is Secure under an https:// public URL (or cookie_secure).

``effective_cookie_secure`` decides for all of them: the session cookie, the
sign-in form's cookie and the OpenID Connect sign-in's flow cookie (state,
nonce, PKCE verifier and ``next``), which a browser would otherwise send over
plain http (the first visit before HSTS is learnt, an ``http://`` link, a
proxy that also listens on port 80).
"""

from __future__ import annotations

from typing import Any

import httpx

from helpers import PASSWORD
from labgate.identity.base import IdentityProvider, Redirect
from labgate.portal.origin import LOGIN_COOKIE, SECURE_LOGIN_COOKIE
from labgate.portal.ui.federated import FLOW_COOKIE, SECURE_FLOW_COOKIE
from labgate.security import SESSION_COOKIES


class RedirectProvider(IdentityProvider):
    """A redirect provider that sends the browser to an authorization URL."""

    kind = "redirect"

    def __init__(self) -> None:  # no configuration needed for start()
        self.name = "uni"

    @property
    def label(self) -> str:
        return "University"

    async def start(self, redirect_uri: str) -> Redirect:
        return Redirect(
            url="https://idp.example/authorize?state=s",
            keep={"state": "s", "nonce": "n", "verifier": "v" * 43},
        )

    async def close(self) -> None:
        return None


def cookie_attributes(response: httpx.Response) -> dict[str, list[str]]:
    """Each cookie set by ``response``: its attributes, lowered."""
    found = {}
    for value in response.headers.get_list("set-cookie"):
        pair, *attributes = value.split(";")
        found[pair.split("=", 1)[0].strip()] = [a.strip().lower() for a in attributes]
    return found


async def portal_cookies(
    client: httpx.AsyncClient, names: tuple[str, str] = (LOGIN_COOKIE, FLOW_COOKIE)
) -> dict[str, list[str]]:
    """Every cookie a visitor gets: the form's, the flow's and the session's (cass's)."""
    cookies: dict[str, list[str]] = {}
    form = await client.get("/login", headers={"Accept": "text/html"})
    cookies.update(cookie_attributes(form))
    started = await client.get("/login/uni/start", params={"next": "/instances"})
    assert started.status_code == 303, started.text
    cookies.update(cookie_attributes(started))
    login = await client.post("/api/v1/auth/login", json={"username": "cass", "password": PASSWORD})
    assert login.status_code == 200, login.text
    cookies.update(cookie_attributes(login))
    assert set(names) <= set(cookies), cookies
    assert set(SESSION_COOKIES) & set(cookies), cookies  # __Host-labgate-session on https
    client.cookies.clear()
    return cookies


async def test_every_portal_cookie_is_secure_under_an_https_public_url(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    await make_user("cass")  # before https: the test's client does not send Secure cookies
    portal = app.state.portal
    portal.settings.public_url = "https://lab.example.org"
    assert not portal.settings.cookie_secure and portal.settings.effective_cookie_secure
    portal.providers["uni"] = RedirectProvider()
    # Under __Host- names (no other host can plant them; the prefix asks for Path=/).
    cookies = await portal_cookies(client, (SECURE_LOGIN_COOKIE, SECURE_FLOW_COOKIE))
    for name, attributes in cookies.items():
        assert "secure" in attributes, f"{name} is sent over plain http too: {attributes}"
        assert not any(a.startswith("domain") for a in attributes), (name, attributes)
    assert "httponly" in cookies[SECURE_FLOW_COOKIE] and "path=/" in cookies[SECURE_FLOW_COOKIE]


async def test_cookies_are_plain_over_a_plain_http_public_url(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """Over http (a test or a lab network), no cookie is Secure: a browser would drop it."""
    await make_user("cass")
    portal = app.state.portal
    assert not portal.settings.effective_cookie_secure
    portal.providers["uni"] = RedirectProvider()
    cookies = await portal_cookies(client)
    for name, attributes in cookies.items():
        assert "secure" not in attributes, (name, attributes)
