"""A page on an instance host cannot sign its visitor into another account (cookie tossing).

With ``instance_host = "{id}.apps.example.org"`` beside
``public_url = "https://labgate.example.org"`` (the setting the docs show), a
tool's JavaScript runs on ``<id>.apps.example.org`` and may write
``document.cookie = "labgate-session=<the attacker's own session>;
Domain=example.org; Path=/"``. The router cannot strip that (it is no
``Set-Cookie`` of the tool's); the browser keeps it beside the victim's
host-only cookie and sends both to the portal. Starlette keeps the last value
of a name, so the victim was signed in as the attacker: login CSRF by a
sibling site.

So when cookies are Secure the session cookie is ``__Host-labgate-session``,
which a browser takes only from the host itself (Secure, ``Path=/``, no
``Domain``), and a request holding the session cookie's name more than once
has no session at all, whichever name is in use.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import httpx

from helpers import PASSWORD
from labgate.security import SECURE_SESSION_COOKIE, SESSION_COOKIE, session_cookie_name


def _session_cookie(response: httpx.Response) -> tuple[str, str, str]:
    """The session cookie ``response`` sets: its name, value and whole Set-Cookie line."""
    for header in response.headers.get_list("set-cookie"):
        pair = header.split(";", 1)[0]
        name, _, value = pair.partition("=")
        if name.strip().endswith("labgate-session") and value:
            return name.strip(), value, header
    raise AssertionError(f"no session cookie in {response.headers.get_list('set-cookie')}")


async def _sign_in(app: Any, name: str) -> tuple[str, str, str]:
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as browser:
        done = await browser.post(
            "/api/v1/auth/login", json={"username": name, "password": PASSWORD}
        )
        assert done.status_code == 200, done.text
        return _session_cookie(done)


def _can_be_planted_by_a_sibling_host(name: str) -> bool:
    """Whether a browser takes a cookie of this name from another host with Domain=<parent>."""
    return not name.startswith(("__Host-", "__Secure-"))  # __Secure- still allows Domain,
    # but only from a secure origin: the sibling instance host is one, so it could.


async def _who(app: Any, cookie: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as browser:
        return await browser.get("/api/v1/auth/session", headers={"Cookie": cookie})


async def test_an_instance_host_cannot_plant_a_session_for_the_portal(
    app: Any, make_user: Any
) -> None:
    await make_user("victim")
    await make_user("mallory")
    # The deployment the docs show (users made first: the test client speaks plain http).
    settings = app.state.portal.settings
    settings.public_url = "https://labgate.example.org"
    settings.instance_host = "{id}.apps.example.org"
    assert settings.effective_cookie_secure
    victim_name, victim_value, _ = await _sign_in(app, "victim")
    mallory_name, mallory_value, _ = await _sign_in(app, "mallory")
    assert victim_name == mallory_name == SECURE_SESSION_COOKIE

    # What the victim's browser sends to labgate.example.org after a page on
    # mallory's instance host tossed her session cookie for example.org.
    cookies = [f"{victim_name}={victim_value}"]
    if _can_be_planted_by_a_sibling_host(mallory_name):
        cookies.append(f"{mallory_name}={mallory_value}")
    who = await _who(app, "; ".join(cookies))
    assert who.status_code == 200, (cookies, who.text)
    name = who.json()["user"]["name"]
    assert name == "victim", (
        f"the portal took the cookie a sibling host planted: signed in as {name}"
    )
    # Under the plain name, which a sibling host could plant, mallory's session is none here.
    plain = await _who(app, f"{SESSION_COOKIE}={mallory_value}")
    assert plain.status_code == 401


async def test_the_session_cookie_is_host_prefixed_when_cookies_are_secure(
    app: Any, make_user: Any
) -> None:
    await make_user("ada")
    settings = app.state.portal.settings
    assert session_cookie_name(settings.effective_cookie_secure) == SESSION_COOKIE
    name, _, _ = await _sign_in(app, "ada")
    assert name == SESSION_COOKIE  # over plain http a __Host- cookie would be refused
    settings.cookie_secure = True
    name, value, line = await _sign_in(app, "ada")
    assert name == "__Host-labgate-session"
    attributes = SimpleCookie(line)[name]
    # What a browser demands of a __Host- cookie, or it drops it.
    assert attributes["secure"] and attributes["path"] == "/" and not attributes["domain"]
    assert attributes["httponly"]
    # Signing out clears it by the same name, Secure (else the browser ignores the clearing).
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as browser:
        csrf = (
            await browser.get("/api/v1/auth/session", headers={"Cookie": f"{name}={value}"})
        ).json()["csrf_token"]
        out = await browser.post(
            "/api/v1/auth/logout", headers={"Cookie": f"{name}={value}", "X-CSRF-Token": csrf}
        )
    assert out.status_code == 204, out.text
    cleared = [c for c in out.headers.get_list("set-cookie") if c.startswith(f"{name}=")]
    assert cleared and "Secure" in cleared[0] and "Max-Age=0" in cleared[0], cleared


async def test_a_session_cookie_sent_twice_is_no_session(app: Any, make_user: Any) -> None:
    """Over plain http (no __Host-), a tossed duplicate cannot pick the identity either."""
    await make_user("victim")
    await make_user("mallory")
    settings = app.state.portal.settings
    settings.public_url = "http://labgate.example.org"
    settings.instance_host = "{id}.apps.example.org"
    assert not settings.effective_cookie_secure
    _, victim, _ = await _sign_in(app, "victim")
    _, mallory, _ = await _sign_in(app, "mallory")
    assert (await _who(app, f"{SESSION_COOKIE}={victim}")).json()["user"]["name"] == "victim"
    for cookie in (
        f"{SESSION_COOKIE}={victim}; {SESSION_COOKIE}={mallory}",
        f"{SESSION_COOKIE}={mallory}; {SESSION_COOKIE}={victim}",
        f"{SESSION_COOKIE}={victim}; theme=dark; {SESSION_COOKIE}={victim}",
    ):
        assert (await _who(app, cookie)).status_code == 401, cookie
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as browser:
        twice = {"Cookie": f"{SESSION_COOKIE}={victim}; {SESSION_COOKIE}={mallory}"}
        # Split over two Cookie headers (as HTTP/2 may send them): still twice.
        split = [
            ("Cookie", f"{SESSION_COOKIE}={victim}"),
            ("Cookie", f"{SESSION_COOKIE}={mallory}"),
        ]
        assert (await browser.get("/api/v1/auth/session", headers=split)).status_code == 401
        page = await browser.get("/instances", headers={**twice, "Accept": "text/html"})
        assert page.status_code in (302, 303, 307) and "/login" in page.headers["location"]
        # The sign-in page clears the tossed copies (for the portal's host and its parent
        # domains), so the browser can sign in again, and its own cookie.
        login = await browser.get("/login", headers={**twice, "Accept": "text/html"})
    assert login.status_code == 200
    lines = [c for c in login.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)]
    domains = {SimpleCookie(line)[SESSION_COOKIE]["domain"] for line in lines}
    assert domains == {"", "labgate.example.org", "example.org"}, lines
    assert all("Max-Age=0" in line for line in lines)
    # Also where a copy planted with Path=/login would sit: the page it blocks.
    placed = {
        (SimpleCookie(line)[SESSION_COOKIE]["domain"], SimpleCookie(line)[SESSION_COOKIE]["path"])
        for line in lines
    }
    assert {("example.org", "/"), ("example.org", "/login")} <= placed, lines
